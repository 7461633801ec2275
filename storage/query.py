"""The search language: ``parse_query`` (pure) and ``search`` (compiled to one SQL SELECT).

Split in two modules: ``storage.query_parse`` (shell words -> Query) and ``storage.query_sql``
(Query -> SQLAlchemy SELECT, tag hierarchy, results). This module is the public face of both.
"""

from __future__ import annotations

from storage.query_parse import (
    FIELDS,
    SORT_FIELDS,
    DateTerm,
    PathTerm,
    Query,
    QueryError,
    ScoreTerm,
    SortKey,
    StatusTerm,
    TagTerm,
    parse_query,
    parse_sort,
    split_query,
)
from storage.query_sql import (
    Hit,
    PhotoTagScore,
    TagIndex,
    UnknownTagError,
    build_select,
    search,
    tags_of,
)

__all__ = [
    "FIELDS", "SORT_FIELDS", "DateTerm", "Hit", "PathTerm", "PhotoTagScore", "Query",
    "QueryError", "ScoreTerm", "SortKey", "StatusTerm", "TagIndex", "TagTerm", "UnknownTagError",
    "build_select", "parse_query", "parse_sort", "search", "split_query", "tags_of",
]
