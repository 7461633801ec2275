"""Write phototag's keywords to XMP sidecars or into JPEGs, and read the keywords photos carry.

Never re-encodes an image, never removes a keyword someone else set, writes atomically.
See :func:`write_keywords` and :func:`read_keywords`.
"""

from __future__ import annotations

from .result import KeywordWriteError, PendingWrite, WrittenKeywords
from .sidecar import (
    APPEND,
    REPLACE,
    has_shared_name,
    is_sidecar_name,
    photos_of_sidecar,
    sidecar_path,
    sidecar_state,
)
from .tagpaths import ROOT, KeywordPath, normalize_tags
from .writer import EMBEDDED, MODES, SIDECAR, read_keywords, write_keywords

__all__ = [
    "APPEND",
    "EMBEDDED",
    "MODES",
    "REPLACE",
    "ROOT",
    "SIDECAR",
    "KeywordPath",
    "KeywordWriteError",
    "PendingWrite",
    "WrittenKeywords",
    "has_shared_name",
    "is_sidecar_name",
    "normalize_tags",
    "photos_of_sidecar",
    "read_keywords",
    "sidecar_path",
    "sidecar_state",
    "write_keywords",
]
