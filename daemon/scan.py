"""The file system side of indexing: which files are photos, walking album folders, file facts.

Nothing here touches the database or the model.
"""

from __future__ import annotations

import fnmatch
import hashlib
import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path, PurePosixPath

from daemon.filenames import NOT_UTF8, shown, storable_name
from storage.schema import CONTENT_HASH

log = logging.getLogger(__name__)


class PhotoFilter:
    """Decides from its path alone whether a file is a photo to index.

    A path is excluded when any of its components matches one of the ``exclude`` patterns
    (fnmatch, case-sensitive: ``@eaDir``, ``.*``, ``*.part``); otherwise it is kept when its
    extension is one of ``extensions`` (case-insensitive).
    """

    def __init__(self, exclude: Iterable[str], extensions: Iterable[str]) -> None:
        self.exclude = tuple(exclude)
        self.extensions = frozenset(
            e.lower() if e.startswith(".") else "." + e.lower() for e in extensions)

    def excluded_name(self, name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, pattern) for pattern in self.exclude)

    def wanted_name(self, name: str) -> bool:
        return os.path.splitext(name)[1].lower() in self.extensions and not self.excluded_name(name)

    def wanted(self, relpath: str) -> bool:
        """For a path relative to an album root (the daemon checks its events with this).
        A name that is not UTF-8 is not wanted: the scans warn about it."""
        parts = PurePosixPath(relpath).parts
        return bool(parts) and self.wanted_name(parts[-1]) and storable_name(relpath) and not any(
            self.excluded_name(part) for part in parts[:-1])

    def wanted_sidecar(self, relpath: str) -> bool:
        """An XMP sidecar (``IMG_1.jpg.xmp``, ``IMG_1.xmp``) outside the excluded folders: the
        daemon follows them to pick up keywords the user edits in digiKam, darktable..."""
        from storage.keywords import is_sidecar_name

        parts = PurePosixPath(relpath).parts
        return bool(parts) and is_sidecar_name(parts[-1]) and storable_name(relpath) and not any(
            self.excluded_name(part) for part in parts)


@dataclass(frozen=True)
class FileStat:
    size: int
    mtime_ns: int


@dataclass
class ScanResult:
    """The photos found under a folder: relpath (relative to the album root) -> size and mtime.

    ``unreadable`` lists folders (relpaths) that could not be listed; their photos must not be
    taken for deleted. ``problems`` holds one line per such folder or file, for warnings.
    """

    files: dict[str, FileStat] = field(default_factory=dict)
    sidecars: dict[str, FileStat] = field(default_factory=dict)  # the XMP sidecars found
    unreadable: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def sidecar_state(self, relpath: str) -> str | None:
        """``storage.keywords.sidecar_state`` of the photo at ``relpath``, from this listing."""
        from storage.keywords import sidecar_state

        return sidecar_state(relpath, self._sidecar_stat) if self.sidecars else None

    def _sidecar_stat(self, relpath: str) -> tuple[int, int] | None:
        found = self.sidecars.get(relpath)
        return (found.size, found.mtime_ns) if found else None


def scan_tree(root: Path, photo_filter: PhotoFilter, under: str = "") -> ScanResult:
    """Walk ``root``/``under`` recursively with os.scandir, not following symlinked folders."""
    result = ScanResult()
    for relpath, stat in walk_photos(root, photo_filter, under, result):
        result.files[relpath] = FileStat(stat.st_size, stat.st_mtime_ns)
    return result


def walk_photos(root: Path, photo_filter: PhotoFilter, under: str = "",
                result: ScanResult | None = None) -> Iterator[tuple[str, os.stat_result]]:
    """The photos under ``root``/``under`` as (relpath, stat), found lazily; folders and files
    that cannot be read are noted in ``result`` (unreadable, problems) and skipped, the XMP
    sidecars met on the way in its ``sidecars``."""
    from storage.keywords import is_sidecar_name

    result = result if result is not None else ScanResult()
    start = root.joinpath(*PurePosixPath(under).parts) if under else root
    stack: list[tuple[Path, str]] = [(start, under)]
    while stack:
        folder, relfolder = stack.pop()
        try:
            with os.scandir(folder) as entries:
                entries = list(entries)
        except OSError as e:
            result.unreadable.append(relfolder)
            result.problems.append(f"{folder}: cannot list folder: {e.strerror or e}")
            continue
        for entry in entries:
            if photo_filter.excluded_name(entry.name):
                continue
            relpath = f"{relfolder}/{entry.name}" if relfolder else entry.name
            try:
                if entry.is_dir(follow_symlinks=False):
                    if _storable(entry, result):
                        stack.append((Path(entry.path), relpath))
                    continue
                if is_sidecar_name(entry.name) and entry.is_file():
                    if storable_name(entry.name):  # (its photo's name is the one to warn about)
                        stat = entry.stat()
                        result.sidecars[relpath] = FileStat(stat.st_size, stat.st_mtime_ns)
                    continue
                if (not photo_filter.wanted_name(entry.name) or not entry.is_file()
                        or not _storable(entry, result)):
                    continue
                stat = entry.stat()
            except OSError as e:
                result.problems.append(f"{entry.path}: cannot read: {e.strerror or e}")
                continue
            yield relpath, stat


def _storable(entry: os.DirEntry, result: ScanResult) -> bool:
    """Whether ``entry``'s name can be stored; if not, the scan's problems say so."""
    if storable_name(entry.name):
        return True
    result.problems.append(f"{shown(entry.path)}: skipped: {NOT_UTF8}")
    return False


def root_available(root: Path) -> bool:
    """Whether an album root can be trusted to show what was deleted.

    A share that is not mounted shows up as a missing folder or as its empty mount point; either
    way its photos must not be removed from the index.
    """
    try:
        with os.scandir(root) as entries:
            return any(True for _ in entries)
    except OSError:
        return False


@dataclass(frozen=True)
class FileFacts:
    """What the indexer reads from a photo besides its pixels."""

    content_hash: str | None
    taken_at: datetime | None
    error: str | None = None
    keywords: list[str] = field(default_factory=list)  # the user's own, from sidecars/EXIF/XMP
    sidecar_state: str | None = None  # of the sidecars the keywords were read from


def file_facts(path: Path) -> FileFacts:
    """The file's content hash, EXIF DateTimeOriginal and existing keywords; ``error`` if the file
    cannot be read. Keyword sources that cannot be parsed are logged and skipped."""
    from daemon.keyword_sync import read_photo_keywords
    from storage.keywords.jpeg import open_regular

    try:
        with open_regular(path) as f:  # a FIFO swapped in would block a plain open() forever
            digest = hashlib.file_digest(f, CONTENT_HASH).hexdigest()
    except OSError as e:
        return FileFacts(None, None, error=f"cannot read: {e.strerror or e}")
    keywords, state = read_photo_keywords(path)
    return FileFacts(digest, read_taken_at(path), keywords=keywords, sidecar_state=state)


# EXIF tags: DateTimeOriginal and DateTimeDigitized live in the Exif IFD (0x8769).
_EXIF_IFD = 0x8769
_DATETIME_ORIGINAL = 0x9003
_DATETIME_DIGITIZED = 0x9004
_heif_registered = False


def read_taken_at(path: Path) -> datetime | None:
    """When the photo was taken, from EXIF (the camera's local time, naive); None if unknown.

    Pillow only reads the file's header here, not its pixels.
    """
    from PIL import Image, UnidentifiedImageError

    _register_heif()
    try:
        with Image.open(path) as image:
            # A PNG's own getexif() first decodes all its pixels, looking for an eXIf chunk
            # after them; the generic one reads what the header gave (eXIf, ImageMagick's
            # "Raw profile type exif"), which is where cameras and converters put the date.
            exif = Image.Image.getexif(image) if image.format == "PNG" else image.getexif()
            exif_ifd = exif.get_ifd(_EXIF_IFD)
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError):
        return None
    except Exception:  # a malformed EXIF block must not cost the photo its tags
        log.debug("cannot read EXIF of %s", path, exc_info=True)
        return None
    for tag in (_DATETIME_ORIGINAL, _DATETIME_DIGITIZED):
        taken = parse_exif_datetime(exif_ifd.get(tag))
        if taken is not None:
            return taken
    return None


def parse_exif_datetime(value: object) -> datetime | None:
    """``"2023:06:01 14:03:22"`` -> datetime; None for blanks, zeros and other junk."""
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    if not isinstance(value, str):
        return None
    value = value.strip().rstrip("\x00").strip()
    for fmt in ("%Y:%m:%d %H:%M:%S", "%Y-%m-%d %H:%M:%S", "%Y:%m:%d %H:%M"):
        try:
            return datetime.strptime(value[:19], fmt)
        except ValueError:
            continue
    return None


def _register_heif() -> None:
    global _heif_registered
    if not _heif_registered:
        _heif_registered = True
        try:
            import pillow_heif
        except ImportError:
            return
        pillow_heif.register_heif_opener()


def chunks(items: Sequence, size: int) -> Iterable[Sequence]:
    for start in range(0, len(items), size):
        yield items[start:start + size]
