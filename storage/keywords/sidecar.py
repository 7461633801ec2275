"""XMP sidecars: ``IMG_1234.jpg.xmp`` (digiKam, darktable) or ``IMG_1234.xmp`` (Lightroom)."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Collection
from pathlib import Path

from . import xmp
from .atomic import is_writable, replace_atomically
from .jpeg import NotReadable, open_regular
from .result import BeforeReplace, KeywordWriteError, PendingWrite
from .tagpaths import KeywordPath

APPEND = "append"
REPLACE = "replace"
NAMINGS = (APPEND, REPLACE)


SUFFIX = ".xmp"
# Real sidecars are KB; darktable's and Lightroom's, with long edit histories, a few MB at most.
# 16 MiB is far above any of them, and stops a huge or endless file (a 3 GB file, a link to
# /dev/zero) from being read whole into memory.
MAX_SIDECAR_BYTES = 16 * 1024 * 1024


def is_sidecar_name(name: str) -> bool:
    return name.lower().endswith(SUFFIX) and len(name) > len(SUFFIX)


def photos_of_sidecar(sidecar: Path, extensions: Collection[str]) -> list[Path]:
    """The existing photos ``sidecar`` belongs to: ``IMG_1.jpg`` for ``IMG_1.jpg.xmp``, every
    ``IMG_1.<photo extension>`` for ``IMG_1.xmp``. ``extensions``: lower case, with the dot."""
    stem = sidecar.name[: -len(SUFFIX)]
    if os.path.splitext(stem)[1].lower() in extensions:
        candidates = [sidecar.with_name(stem)]
    else:
        try:
            names = os.listdir(sidecar.parent)
        except OSError:
            return []
        candidates = [sidecar.with_name(name) for name in names
                      if os.path.splitext(name)[0] == stem
                      and os.path.splitext(name)[1].lower() in extensions]
    return sorted(path for path in candidates if path.is_file())


def sidecar_names(photo: str) -> tuple[str, str]:
    """A photo's sidecar in each naming, in NAMINGS order: IMG_1.jpg.xmp, IMG_1.xmp (a name or a
    path in, the same out)."""
    return photo + SUFFIX, os.path.splitext(photo)[0] + SUFFIX


def sidecar_path(photo: Path, naming: str = APPEND) -> Path:
    if naming not in NAMINGS:
        raise ValueError(f"sidecar naming must be one of {NAMINGS}, not {naming!r}")
    return photo.with_name(sidecar_names(photo.name)[NAMINGS.index(naming)])


def sidecar_state(photo: str | os.PathLike,
                  lookup: Callable[[str], tuple[int, int] | None] | None = None) -> str | None:
    """The photo's sidecars, both namings, as ``"<size>:<mtime_ns>"`` each (``-`` for a missing
    one); None when it has neither. Stored with the keywords read from them, so that a scan can
    tell that a sidecar changed since without reading it. ``lookup``: (size, mtime_ns) of a path
    or None, from a folder listing already made (default: os.stat)."""
    lookup = lookup or _size_mtime
    append, replace = sidecar_names(os.fspath(photo))  # a path works as well as a name
    found = lookup(append), lookup(replace)
    if found == (None, None):
        return None
    return " ".join("-" if f is None else f"{f[0]}:{f[1]}" for f in found)


def has_shared_name(state: str | None) -> bool:
    """Whether a ``sidecar_state`` includes a sidecar named the Lightroom way (``IMG_1.xmp``),
    which every photo called IMG_1.<extension> shares (IMG_1.jpg and IMG_1.heic, say)."""
    return state is not None and not state.endswith(" -")


def _size_mtime(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_size, st.st_mtime_ns) if stat.S_ISREG(st.st_mode) else None


def read_sidecar(path: Path) -> tuple[xmp.XmpDoc, os.stat_result] | None:
    """The parsed sidecar and its stat, None if there is none. Raises XmpError / OSError; a
    sidecar that is not a regular file (a FIFO would block forever, a device never end) or is
    larger than MAX_SIDECAR_BYTES raises NotReadable (an OSError) without being read whole."""
    try:
        with open_regular(path) as f:
            st = os.fstat(f.fileno())
            data = b"" if st.st_size > MAX_SIDECAR_BYTES else f.read(MAX_SIDECAR_BYTES + 1)
    except FileNotFoundError:
        return None
    if st.st_size > MAX_SIDECAR_BYTES or len(data) > MAX_SIDECAR_BYTES:
        raise NotReadable(f"larger than {MAX_SIDECAR_BYTES // 2**20} MiB, the limit for a sidecar")
    return xmp.parse(data), st


def write_sidecar(
    photo: Path,
    photo_stat: os.stat_result,
    keywords: list[KeywordPath],
    previous: Collection[str],
    naming: str,
    photo_unchanged,
    before_replace: BeforeReplace | None = None,
) -> tuple[Path, list[str]]:
    """Merge ``keywords`` into the photo's sidecar (created if missing). Returns (path, owned).

    ``before_replace``: see ``write_keywords``."""
    path = sidecar_path(photo, naming)
    folder_st = os.stat(path.parent)
    if not is_writable(path.parent, folder_st):
        raise KeywordWriteError(path, "folder is read-only; sidecar not written")
    try:
        existing = read_sidecar(path)
    except xmp.XmpError as exc:
        raise KeywordWriteError(path, f"existing sidecar is not valid XMP ({exc}); left untouched")
    except NotReadable as exc:
        reason = f"existing sidecar not read ({exc}); left untouched"
        raise KeywordWriteError(path, reason) from None
    if existing is None:
        doc, side_st = xmp.new_doc(), None
        mode = stat.S_IMODE(photo_stat.st_mode) & 0o666
        owner = (photo_stat.st_uid, photo_stat.st_gid)
    else:
        doc, side_st = existing
        if not is_writable(path, side_st):
            raise KeywordWriteError(path, "sidecar is read-only; not written")
        mode, owner = side_st.st_mode, (side_st.st_uid, side_st.st_gid)
    try:
        owned = xmp.merge_keywords(doc, keywords, previous)
    except xmp.XmpError as exc:
        raise KeywordWriteError(path, f"existing sidecar cannot be merged ({exc}); left untouched")
    expected = xmp.get_list(doc, xmp.DC_SUBJECT)
    data = xmp.serialize(doc)

    def verify(tmp: Path) -> None:
        got = xmp.get_list(xmp.parse(tmp.read_bytes()), xmp.DC_SUBJECT)
        if got != expected:
            raise KeywordWriteError(path, "sidecar did not read back as written; not replaced")

    def unchanged() -> None:
        photo_unchanged()
        now = _stat_or_none(path)
        if (now is None) != (side_st is None) or (now and not _same_file(now, side_st)):
            raise KeywordWriteError(path, "sidecar changed while writing; not replaced")
        if before_replace is not None:
            before_replace(PendingWrite(owned))

    replace_atomically(
        path, data, mode=mode, owner=owner, times_ns=None, verify=verify, unchanged=unchanged
    )
    return path, owned


def _stat_or_none(path: Path) -> os.stat_result | None:
    try:
        return os.stat(path)
    except FileNotFoundError:
        return None


def _same_file(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_ino, a.st_size, a.st_mtime_ns) == (b.st_ino, b.st_size, b.st_mtime_ns)
