"""Plain result types shared by the tagger's parts and its callers (no torch here)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class ClassScore:
    """One ImageNet-1k class with its softmax probability."""

    index: int
    wnid: str
    name: str
    score: float


@dataclass(frozen=True)
class TagScore:
    """A friendly or broader tag with its score (the summed probability of the classes under it)."""

    name: str
    zh: str
    score: float
    broader: tuple[str, ...] = ()  # the tag's direct broader tags, e.g. cat -> ("animal", "pet")


@dataclass
class ImageResult:
    """What the tagger found for one file; ``error`` is set (and the rest empty) if it failed."""

    path: Path
    classes: list[ClassScore] = field(default_factory=list)
    tags: list[TagScore] = field(default_factory=list)
    width: int | None = None  # of the original image, after EXIF orientation
    height: int | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None
