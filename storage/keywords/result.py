"""What a keyword write returns or raises."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path


class KeywordWriteError(Exception):
    """A keyword write that did not happen; the message is one line: ``<path>: <reason>``.

    Whenever this is raised the photo and any existing sidecar are byte-identical to before.
    """

    def __init__(self, path: Path | str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = Path(path)
        self.reason = reason


@dataclass(frozen=True)
class PendingWrite:
    """What a keyword write is about to put in place, passed to ``before_replace`` just before
    the rename, so the caller can record it first (a crash may come between rename and record).

    ``keywords``: the leaves phototag will own (as WrittenKeywords.keywords). ``size`` and
    ``sha256``: the photo's new size and content hash for an embedded rewrite; None for a
    sidecar (the photo itself is not touched).
    """

    keywords: list[str]
    size: int | None = None
    sha256: str | None = None


BeforeReplace = Callable[[PendingWrite], None]


@dataclass
class WrittenKeywords:
    """Outcome of a successful write.

    ``keywords``: the dc:subject leaves phototag now owns in that file — store them (e.g. as
    Photo.written_keywords) and pass them back as ``previous`` next time. ``size``/``mtime_ns``:
    the photo after the write (embedded mode changes its size; mtime is kept) so the indexer
    does not mistake our own write for a user's edit.
    """

    photo: Path
    target: Path  # the file written: the sidecar, or the photo itself
    mode: str  # "sidecar" | "embedded" (what was actually done)
    keywords: list[str]
    size: int
    mtime_ns: int
    xpkeywords: bool = False  # EXIF XPKeywords written too
    notes: list[str] = field(default_factory=list)  # e.g. why XPKeywords or embedding was skipped
    sha256: str | None = None  # embedded: the content hash of the rewritten photo
