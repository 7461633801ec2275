"""Parse a search query (a list of shell words) into a Query; pure, no database.

The language follows beets' query strings: each shell argument is one term; terms are ANDed; a
lone ``,`` separates OR-alternatives (each an AND of terms); ``^term`` or ``-term`` negates;
``field:value`` targets a field; ``field+`` / ``field-`` are sort keys. See README "Searching".
"""

from __future__ import annotations

import calendar
import re
import shlex
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from storage.schema import STATUSES

FIELDS = ("tag", "score", "path", "date", "status")
SORT_FIELDS = ("score", "date", "path")
# The direction a sort key takes when none is given (``--sort score`` = best first).
DEFAULT_DIRECTION = {"score": True, "date": False, "path": False}  # True = descending

_FIELD_RE = re.compile(r"^([A-Za-z_]+):(.*)$", re.DOTALL)
_SORT_RE = re.compile(r"^(score|date|path)([+-])$")
_RELATIVE_RE = re.compile(r"^([+-]?)(\d+)([dwmy])$")
_ABSOLUTE_DATE_RE = re.compile(
    r"^(\d{4})(?:-(\d{1,2})(?:-(\d{1,2})(?:[Tt ](\d{1,2})(?::(\d{1,2})(?::(\d{1,2}))?)?)?)?)?$"
)
# Relative units as beets counts them: a month is 30 days, a year 365.
_UNIT_DAYS = {"d": 1, "w": 7, "m": 30, "y": 365}


class QueryError(Exception):
    """A malformed query. ``index`` is the 0-based position of the offending term (None if the
    query as a whole is wrong), ``term`` its text; ``str()`` is one line naming both."""

    def __init__(self, reason: str, index: int | None = None, term: str | None = None):
        self.reason = reason
        self.index = index
        self.term = term
        super().__init__(self.describe())

    def describe(self) -> str:
        if self.index is None:
            return self.reason
        return f"at term {self.index + 1} {self.term!r}: {self.reason}"


@dataclass(frozen=True)
class TagTerm:
    """Photos with this tag, or with any narrower tag unless ``exact`` (``tag:=cat``)."""

    name: str
    exact: bool = False
    negated: bool = False
    index: int = 0


@dataclass(frozen=True)
class ScoreTerm:
    """Restricts the tag terms of its alternative to scores in [low, high] (None = open)."""

    low: float | None
    high: float | None
    index: int = 0


@dataclass(frozen=True)
class PathTerm:
    """Case-insensitive: a substring of the relative path, or a prefix of the absolute path."""

    value: str
    absolute: bool
    negated: bool = False
    index: int = 0


@dataclass(frozen=True)
class DateTerm:
    """Photos taken in [start, end) (None = open); photos without a date never match."""

    start: datetime | None
    end: datetime | None
    negated: bool = False
    index: int = 0


@dataclass(frozen=True)
class StatusTerm:
    status: str
    negated: bool = False
    index: int = 0


Term = TagTerm | ScoreTerm | PathTerm | DateTerm | StatusTerm


@dataclass(frozen=True)
class SortKey:
    field: str  # one of SORT_FIELDS
    descending: bool


@dataclass
class Query:
    """OR of ``alternatives``, each an AND of terms; no alternative at all matches every photo."""

    alternatives: list[list[Term]] = field(default_factory=list)
    sort: list[SortKey] = field(default_factory=list)


def split_query(text: str) -> list[str]:
    """Split a query typed as one string the way a shell would (for tests and the Python API)."""
    return shlex.split(text)


def parse_query(terms: Sequence[str] | str, *, now: datetime | None = None) -> Query:
    """Parse shell words (or one string, split like a shell) into a Query.

    ``now`` anchors relative dates (``date:-1w..``); default: the local time now.
    """
    if isinstance(terms, str):
        terms = split_query(terms)
    now = now or datetime.now()
    query = Query()
    current: list[Term] = []
    comma_index: int | None = None
    for index, text in enumerate(terms):
        if text == ",":
            if not current:
                where = "at the start of the query" if comma_index is None else "after another ','"
                raise QueryError(f"',' {where} leaves an empty alternative", index, text)
            query.alternatives.append(current)
            current = []
            comma_index = index
            continue
        sort = _SORT_RE.match(text)
        if sort:
            query.sort.append(SortKey(sort.group(1), sort.group(2) == "-"))
            continue
        current.append(_parse_term(text, index, now))
    if current:
        query.alternatives.append(current)
    elif comma_index is not None:
        raise QueryError("',' at the end of the query leaves an empty alternative",
                         comma_index, ",")
    return query


def parse_sort(text: str) -> SortKey:
    """A ``--sort`` value: ``score``, ``date`` or ``path``, optionally followed by + or -."""
    match = _SORT_RE.match(text)
    if match:
        return SortKey(match.group(1), match.group(2) == "-")
    if text in SORT_FIELDS:
        return SortKey(text, DEFAULT_DIRECTION[text])
    raise QueryError(f"unknown sort key {text!r}; use one of {', '.join(SORT_FIELDS)} "
                     "optionally followed by + or -")


def _parse_term(text: str, index: int, now: datetime) -> Term:
    negated = False
    body = text
    if body[:1] in ("^", "-") and len(body) > 1:
        negated, body = True, body[1:]
        if body[:1] in ("^", "-"):
            raise QueryError("double negation", index, text)
    if not body or body in ("^", "-"):
        raise QueryError("empty term", index, text)

    match = _FIELD_RE.match(body)
    if not match:
        return TagTerm(body.strip(), negated=negated, index=index)
    name, value = match.group(1).lower(), match.group(2)
    if name not in FIELDS:
        raise QueryError(f"unknown field {name!r}; known fields: {', '.join(FIELDS)}",
                         index, text)
    if not value:
        raise QueryError(f"{name}: needs a value", index, text)
    if name == "tag":
        exact = value.startswith("=")
        tag = value[1:] if exact else value
        if not tag.strip():
            raise QueryError("tag: needs a tag name", index, text)
        return TagTerm(tag.strip(), exact=exact, negated=negated, index=index)
    if name == "score":
        if negated:
            raise QueryError("a score range cannot be negated; write the range you want, "
                             "e.g. score:..0.5", index, text)
        low, high = _parse_score(value, index, text)
        return ScoreTerm(low, high, index=index)
    if name == "path":
        absolute = value.startswith(("/", "~"))
        return PathTerm(value, absolute, negated=negated, index=index)
    if name == "date":
        start, end = _parse_date_range(value, index, text, now)
        return DateTerm(start, end, negated=negated, index=index)
    # status
    status = value.lower()
    if status not in STATUSES:
        raise QueryError(f"unknown status {value!r}; use one of {', '.join(STATUSES)}",
                         index, text)
    return StatusTerm(status, negated=negated, index=index)


def _split_range(value: str, index: int, text: str) -> tuple[str | None, str | None, bool]:
    """``a..b`` -> (a, b, True); ``a`` -> (a, None, False); empty sides become None."""
    if ".." not in value:
        return value, None, False
    if value.count("..") > 1:
        raise QueryError("a range has one '..'", index, text)
    low, high = value.split("..")
    if not low and not high:
        raise QueryError("a range needs at least one end", index, text)
    return low or None, high or None, True


def _parse_score(value: str, index: int, text: str) -> tuple[float | None, float | None]:
    """``0.6..``, ``..0.3``, ``0.4..0.8``; a single number means "at least" (like ``0.6..``)."""
    low_text, high_text, _ = _split_range(value, index, text)

    def number(s: str | None) -> float | None:
        if s is None:
            return None
        try:
            n = float(s)
        except ValueError:
            raise QueryError(f"{s!r} is not a number", index, text) from None
        if not 0.0 <= n <= 1.0:
            raise QueryError(f"score {s} is outside 0..1", index, text)
        return n

    low, high = number(low_text), number(high_text)
    if low is not None and high is not None and low > high:
        raise QueryError(f"empty range: {low} is above {high}", index, text)
    return low, high


def _parse_date_range(value: str, index: int, text: str,
                      now: datetime) -> tuple[datetime | None, datetime | None]:
    """Return the half-open interval [start, end) a date query covers.

    An absolute date covers its whole period (``2023`` = the year, ``2023-06`` = June); a range
    runs from the start of its first period to the end of its last. A relative date (``-1w``) is an
    instant; on its own it means "since then" (``date:-1w`` = ``date:-1w..``).
    """
    low_text, high_text, is_range = _split_range(value, index, text)
    if not is_range:
        assert low_text is not None
        if _RELATIVE_RE.match(low_text):
            return _relative(low_text, now), None
        return _period(low_text, index, text)
    start = end = None
    if low_text is not None:
        start = (_relative(low_text, now) if _RELATIVE_RE.match(low_text)
                 else _period(low_text, index, text)[0])
    if high_text is not None:
        end = (_relative(high_text, now) if _RELATIVE_RE.match(high_text)
               else _period(high_text, index, text)[1])
    if start is not None and end is not None and start >= end:
        raise QueryError("empty range: the start is not before the end", index, text)
    return start, end


def _relative(value: str, now: datetime) -> datetime:
    sign, amount, unit = _RELATIVE_RE.match(value).groups()  # type: ignore[union-attr]
    delta = timedelta(days=int(amount) * _UNIT_DAYS[unit])
    return now - delta if sign == "-" else now + delta


def _period(value: str, index: int, text: str) -> tuple[datetime, datetime]:
    """The [start, end) of ``YYYY``, ``YYYY-MM``, ``YYYY-MM-DD`` or ``YYYY-MM-DDTHH[:MM[:SS]]``."""
    match = _ABSOLUTE_DATE_RE.match(value)
    if not match:
        raise QueryError(f"{value!r} is not a date (YYYY, YYYY-MM, YYYY-MM-DD, "
                         "YYYY-MM-DDTHH:MM:SS) nor a relative date like -1w", index, text)
    parts = [int(p) if p is not None else None for p in match.groups()]
    year, month, day, hour, minute, second = parts
    try:
        if month is None:
            start = datetime(year, 1, 1)
            return start, datetime(year + 1, 1, 1)
        start = datetime(year, month, 1)
        if day is None:
            days = calendar.monthrange(year, month)[1]
            return start, start + timedelta(days=days)
        start = datetime(year, month, day, hour or 0, minute or 0, second or 0)
    except ValueError as e:  # month 13, February 30th, hour 25 ...
        raise QueryError(f"{value!r} is not a valid date: {e}", index, text) from None
    if hour is None:
        step = timedelta(days=1)
    elif minute is None:
        step = timedelta(hours=1)
    elif second is None:
        step = timedelta(minutes=1)
    else:
        step = timedelta(seconds=1)
    return start, start + step
