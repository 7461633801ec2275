"""Entry points: write phototag's keywords to a photo, read the keywords a photo already has."""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Collection, Iterable
from pathlib import Path

from . import exif, jpeg, xmp
from .atomic import is_writable
from .embedded import write_embedded
from .result import BeforeReplace, KeywordWriteError, WrittenKeywords
from .sidecar import APPEND, NAMINGS, REPLACE, read_sidecar, sidecar_path, write_sidecar
from .tagpaths import TagInput, dedupe, normalize_tags

log = logging.getLogger(__name__)

SIDECAR = "sidecar"
EMBEDDED = "embedded"
MODES = (SIDECAR, EMBEDDED)
_JPEG_MAGIC = b"\xff\xd8\xff"


def write_keywords(
    photo: Path | str,
    tags: Iterable[TagInput],
    *,
    mode: str,
    previous: Collection[str] = (),
    sidecar_name: str = APPEND,
    expect_size: int | None = None,
    expect_mtime_ns: int | None = None,
    before_replace: BeforeReplace | None = None,
) -> WrittenKeywords:
    """Write ``tags`` (``"cat"`` or paths like ``("animal", "cat")``) as the photo's keywords.

    ``mode="sidecar"`` merges them into the XMP sidecar; ``mode="embedded"`` writes them into a
    JPEG's XMP segment (and EXIF XPKeywords where provably safe); other formats get a sidecar.
    ``previous``: the leaves phototag wrote last time (WrittenKeywords.keywords) — only those and
    hierarchical keywords under the ``phototag`` root are replaced. ``expect_size`` /
    ``expect_mtime_ns``: the photo as it was tagged; if it changed, nothing is written.
    ``before_replace(PendingWrite)``: called after every check, just before the new file is
    renamed into place, with the keywords phototag will own and, for an embedded rewrite, the
    photo's new size and content hash: to record the write before it happens, so that a crash
    between the rename and the caller's own record loses nothing. If it raises, nothing is
    written.

    Raises KeywordWriteError (``"<path>: <reason>"``) and then nothing was changed.
    """
    photo = Path(photo)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
    if sidecar_name not in NAMINGS:
        raise ValueError(f"sidecar_name must be one of {NAMINGS}, not {sidecar_name!r}")
    try:
        keywords = normalize_tags(tags)
    except ValueError as exc:
        raise KeywordWriteError(photo, f"bad tag: {exc}; not written") from None
    previous = list(previous)

    try:
        st = os.stat(photo)
    except FileNotFoundError:
        raise KeywordWriteError(photo, "photo no longer exists; not written") from None
    except OSError as exc:
        raise KeywordWriteError(photo, f"cannot stat ({exc.strerror}); not written") from None
    if not stat.S_ISREG(st.st_mode):
        raise KeywordWriteError(photo, "not a regular file; not written")
    _check_expected(photo, st, expect_size, expect_mtime_ns)

    photo_unchanged = _unchanged_guard(photo, st)
    notes: list[str] = []
    if mode == EMBEDDED:
        if _has_jpeg_magic(photo):
            return _write_embedded(photo, keywords, previous, expect_size, expect_mtime_ns,
                                   before_replace)
        notes.append("not a JPEG: keywords written to a sidecar instead")

    try:
        target, owned = write_sidecar(photo, st, keywords, previous, sidecar_name, photo_unchanged,
                                      before_replace)
    except OSError as exc:
        side = sidecar_path(photo, sidecar_name)
        raise KeywordWriteError(side, f"could not write sidecar ({exc.strerror or exc})") from None
    return WrittenKeywords(
        photo, target, SIDECAR, owned, st.st_size, st.st_mtime_ns, notes=notes
    )


def _check_expected(
    photo: Path, st: os.stat_result, size: int | None, mtime_ns: int | None
) -> None:
    if (size is not None and st.st_size != size) or (
        mtime_ns is not None and st.st_mtime_ns != mtime_ns
    ):
        raise KeywordWriteError(photo, "photo changed since it was tagged; not written")


def _unchanged_guard(photo: Path, st: os.stat_result):
    """A check, run just before the rename, that the photo is still the file we read."""

    def photo_unchanged() -> None:
        try:
            now = os.stat(photo)
        except FileNotFoundError:
            raise KeywordWriteError(photo, "photo deleted while writing; not written") from None
        if (now.st_ino, now.st_size, now.st_mtime_ns) != (st.st_ino, st.st_size, st.st_mtime_ns):
            raise KeywordWriteError(photo, "photo changed while writing; not written")

    return photo_unchanged


def _has_jpeg_magic(photo: Path) -> bool:
    try:
        with jpeg.open_regular(photo) as f:  # not a FIFO: that would wait forever
            return f.read(3) == _JPEG_MAGIC
    except OSError as exc:
        raise KeywordWriteError(photo, f"cannot read ({exc.strerror}); not written") from None


def _write_embedded(
    photo: Path,
    keywords,
    previous: list[str],
    expect_size: int | None,
    expect_mtime_ns: int | None,
    before_replace: BeforeReplace | None = None,
) -> WrittenKeywords:
    if photo.is_symlink():
        raise KeywordWriteError(photo, "is a symbolic link; embedded keywords not written")
    try:
        with jpeg.open_regular(photo) as f:
            data = f.read()
            st = os.fstat(f.fileno())
    except FileNotFoundError:
        raise KeywordWriteError(photo, "photo no longer exists; not written") from None
    except OSError as exc:
        raise KeywordWriteError(photo, f"cannot read ({exc.strerror}); not written") from None
    _check_expected(photo, st, expect_size, expect_mtime_ns)
    if not is_writable(photo, st):
        raise KeywordWriteError(photo, "photo is read-only; not written")
    if not is_writable(photo.parent, os.stat(photo.parent)):
        raise KeywordWriteError(photo, "folder is read-only; not written")
    if st.st_nlink > 1:
        # os.replace would leave the other hard links pointing at the old bytes.
        raise KeywordWriteError(photo, f"has {st.st_nlink} hard links; not written")

    photo_unchanged = _unchanged_guard(photo, st)
    result = write_embedded(photo, data, st, keywords, previous, photo_unchanged, before_replace)
    return WrittenKeywords(
        photo,
        photo,
        EMBEDDED,
        result.owned,
        result.size,
        st.st_mtime_ns,
        xpkeywords=result.xpkeywords,
        notes=result.notes,
        sha256=result.sha256,
    )


def read_keywords(photo: Path | str, *, exclude: Collection[str] = (),
                  unread_sidecars: list[Path] | None = None) -> list[str]:
    """Keywords the photo already carries: sidecar and embedded XMP dc:subject, EXIF XPKeywords.

    For indexing a user's own keywords; pass phototag's ``previous`` leaves as ``exclude`` to
    leave out our own. Unreadable sources are logged and skipped, never fatal; the sidecars
    among them are added to ``unread_sidecars`` if given.
    """
    photo = Path(photo)
    found: list[str] = []
    for naming in (APPEND, REPLACE):
        path = sidecar_path(photo, naming)
        try:
            side = read_sidecar(path)
            if side is not None:
                found += xmp.get_list(side[0], xmp.DC_SUBJECT)
        except (OSError, xmp.XmpError) as exc:
            log.warning("%s: sidecar keywords not read (%s)", path, exc)
            if unread_sidecars is not None:
                unread_sidecars.append(path)
    try:
        if _has_jpeg_magic(photo):
            found += _read_jpeg_keywords(photo)
    except (OSError, KeywordWriteError, jpeg.JpegError) as exc:
        log.warning("%s: embedded keywords not read (%s)", photo, exc)
    skip = set(exclude)
    return [k for k in dedupe(found) if k and k not in skip]


def _read_jpeg_keywords(photo: Path) -> list[str]:
    parts = jpeg.read_header(photo)
    found: list[str] = []
    for seg in parts.segments:
        try:
            if seg.is_xmp:
                found += xmp.get_list(xmp.parse(seg.payload[len(jpeg.XMP_ID) :]), xmp.DC_SUBJECT)
            elif seg.is_exif:
                found += exif.decode_xpkeywords(exif.load(seg.payload))
        except Exception as exc:  # a broken XMP or EXIF block must not stop indexing
            log.warning("%s: keywords in a metadata block not read (%s)", photo, exc)
    return found
