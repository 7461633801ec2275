"""Tag paths as phototag writes them: every machine tag lives under one root, ``phototag``.

A tag ``("animal", "cat")`` becomes ``cat`` in dc:subject, ``phototag|animal|cat`` in
lr:hierarchicalSubject and ``phototag/animal/cat`` in digiKam:TagsList — the way digiKam writes
its own tag tree, so the root marks which hierarchical keywords are phototag's to replace.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

ROOT = "phototag"
LR_SEP = "|"
DIGIKAM_SEP = "/"
# '|' and '/' separate path levels; ';' separates EXIF XPKeywords.
_FORBIDDEN = frozenset("|/;")

TagInput = str | Sequence[str]


@dataclass(frozen=True)
class KeywordPath:
    """One tag as a path below the phototag root, e.g. ``("animal", "cat")``."""

    parts: tuple[str, ...]

    @property
    def leaf(self) -> str:
        return self.parts[-1]

    @property
    def lightroom(self) -> str:
        return LR_SEP.join((ROOT, *self.parts))

    @property
    def digikam(self) -> str:
        return DIGIKAM_SEP.join((ROOT, *self.parts))


def is_ours_lightroom(value: str) -> bool:
    return value == ROOT or value.startswith(ROOT + LR_SEP)


def is_ours_digikam(value: str) -> bool:
    return value == ROOT or value.startswith(ROOT + DIGIKAM_SEP)


def _check_part(part: str) -> str:
    if not isinstance(part, str):
        raise ValueError(f"tag part must be a string, not {type(part).__name__}: {part!r}")
    part = part.strip()
    if not part:
        raise ValueError("empty tag or tag path part")
    bad = _FORBIDDEN.intersection(part)
    if bad:
        raise ValueError(f"tag {part!r} contains {''.join(sorted(bad))!r} (a separator)")
    if any(unicodedata.category(ch) in ("Cc", "Cs") for ch in part):
        raise ValueError(f"tag {part!r} contains a control character")
    return part


def normalize_tags(tags: Iterable[TagInput]) -> list[KeywordPath]:
    """Turn ``"cat"`` or ``("animal", "cat")`` inputs into KeywordPaths, dropping duplicates.

    Paths are relative to the root; raises ValueError for empty parts, separators or control
    characters (they would corrupt the hierarchical keywords or the XPKeywords list).
    """
    result: list[KeywordPath] = []
    for tag in tags:
        parts = (tag,) if isinstance(tag, str) else tuple(tag)
        if not parts:
            raise ValueError("empty tag path")
        path = KeywordPath(tuple(_check_part(p) for p in parts))
        if path not in result:
            result.append(path)
    return result


def dedupe(values: Iterable[str]) -> list[str]:
    """Values in first-seen order without duplicates."""
    return list(dict.fromkeys(values))
