"""Replace a file atomically: temp file in the same folder, fsync, verify, os.replace.

The temp file is a dot-file (``.IMG_1.jpg.<random>.phototag-tmp``) so that file watchers and
photo tools skip it; it is removed on any failure, so the target is either the old bytes or the
new ones, never a mix.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path

TMP_SUFFIX = ".phototag-tmp"


def is_writable(path: Path, st: os.stat_result) -> bool:
    """Writable for us *and* not marked read-only (root ignores the permission bits, we don't)."""
    return bool(st.st_mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH)) and os.access(
        path, os.W_OK
    )


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def replace_atomically(
    target: Path,
    data: bytes,
    *,
    mode: int,
    owner: tuple[int, int] | None,
    times_ns: tuple[int, int] | None,
    verify: Callable[[Path], None],
    unchanged: Callable[[], None],
) -> None:
    """Write ``data`` to ``target`` via a verified temp file.

    ``mode``/``owner``/``times_ns`` are applied to the new file (``times_ns`` None: now).
    ``verify(tmp)`` re-reads the temp file and raises if it is not what was meant; ``unchanged()``
    raises if the target changed meanwhile. Both run before the rename. OSError propagates.
    """
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=TMP_SUFFIX)
    tmp = Path(tmp_name)
    try:
        try:
            _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        verify(tmp)
        if owner is not None and os.geteuid() == 0:
            os.chown(tmp, *owner)
        os.chmod(tmp, stat.S_IMODE(mode))
        if times_ns is not None:
            os.utime(tmp, ns=times_ns)
        unchanged()
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_dir(target.parent)


def _fsync_dir(folder: Path) -> None:
    # Makes the rename durable; some filesystems (SMB/NFS mounts) refuse fsync on a directory.
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
