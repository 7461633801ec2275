"""Compile a parsed Query to one SQLAlchemy SELECT and run it.

The tag hierarchy (a few hundred tags) is resolved in Python, so a tag term is a plain list of tag
ids. In each alternative the rarest positive tag term drives the search,
``photo.id IN (SELECT photo_id FROM photo_tag WHERE tag_id IN (<the tag and its narrower tags>))``
from the (tag_id, score) index; the other tag terms are ``[NOT] EXISTS`` checks on each photo's
own few rows (the positive ones inside that subquery, so that only the photos having every tag
are looked up). Dates, paths and status are plain conditions on photo. No SQLite-only SQL.

With ``--limit`` and the path order, a common driving tag (over ESTIMATE_CAP rows) becomes an
``EXISTS`` check too: the database then walks the photos in path order through the
(root_id, relpath) index and stops at the limit (``animal --limit 100``: 1 ms instead of 1 s).
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy import (
    ColumnElement,
    Connection,
    FromClause,
    Select,
    and_,
    false,
    func,
    not_,
    or_,
    select,
    union_all,
)

from storage.query_parse import (
    DateTerm,
    PathTerm,
    Query,
    QueryError,
    ScoreTerm,
    SortKey,
    StatusTerm,
    TagTerm,
    Term,
    parse_query,
)
from storage.schema import album_root, photo, photo_tag, tag, tag_parent


class UnknownTagError(Exception):
    """A tag term names no tag (by name or Chinese name); ``suggestions`` are the nearest ones."""

    def __init__(self, name: str, index: int, suggestions: list[str]):
        self.name = name
        self.index = index
        self.suggestions = suggestions
        message = f"unknown tag {name!r}"
        if suggestions:
            message += f"; did you mean: {', '.join(map(as_term, suggestions))}?"
        else:
            message += "; 'phototag tags' lists the known tags"
        if "," in name and name != ",":
            message += " (an OR is a lone ',' between spaces: cat , dog)"
        super().__init__(message)


def as_term(name: str) -> str:
    """How to search for the tag ``name``: the name itself, or ``tag:name`` when the name alone
    would read as something else (``-dash`` a negation, ``date-`` a sort key, ``a:b`` a field)."""
    try:
        terms = parse_query([name]).alternatives
    except QueryError:
        return f"tag:{name}"
    plain = terms == [[TagTerm(name)]]
    return name if plain else f"tag:{name}"


@dataclass
class TagIndex:
    """All tags and the narrower-than edges, loaded once per query (a few hundred rows)."""

    names: dict[int, str] = field(default_factory=dict)
    zh: dict[int, str] = field(default_factory=dict)
    children: dict[int, set[int]] = field(default_factory=dict)
    _by_name: dict[str, set[int]] = field(default_factory=dict)

    @classmethod
    def load(cls, connection: Connection) -> TagIndex:
        index = cls()
        for tag_id, name, zh in connection.execute(select(tag.c.id, tag.c.name, tag.c.zh)).all():
            index.names[tag_id] = name
            index._by_name.setdefault(name.casefold(), set()).add(tag_id)
            if zh:
                index.zh[tag_id] = zh
                index._by_name.setdefault(zh.casefold(), set()).add(tag_id)
        edges = connection.execute(select(tag_parent.c.tag_id, tag_parent.c.parent_id)).all()
        for tag_id, parent_id in edges:
            index.children.setdefault(parent_id, set()).add(tag_id)
        return index

    def lookup(self, name: str) -> set[int]:
        """The tags called ``name`` (case-insensitive) or whose Chinese name is ``name``."""
        return set(self._by_name.get(name.casefold(), ()))

    def with_narrower(self, tag_ids: Iterable[int]) -> set[int]:
        """``tag_ids`` and every tag narrower than one of them, transitively (cycles are safe)."""
        seen = set(tag_ids)
        stack = list(seen)
        while stack:
            for child in self.children.get(stack.pop(), ()):
                if child not in seen:
                    seen.add(child)
                    stack.append(child)
        return seen

    def resolve(self, term: TagTerm) -> set[int]:
        found = self.lookup(term.name)
        if not found:
            raise UnknownTagError(term.name, term.index, self.suggest(term.name))
        return found if term.exact else self.with_narrower(found)

    def suggest(self, name: str, n: int = 3) -> list[str]:
        candidates = list(self.names.values()) + list(self.zh.values())
        return difflib.get_close_matches(name, candidates, n=n, cutoff=0.6)


@dataclass(slots=True)
class Hit:
    """One photo found by a search."""

    id: int
    root: str
    relpath: str
    taken_at: datetime | None = None  # None also when searched with details=False
    status: str | None = None  # None only when searched with details=False
    score: float | None = None  # the best score among the tag rows the query matched on

    @property
    def path(self) -> str:
        """``os.path.join(root, relpath)`` (an absolute root, a relative POSIX relpath) without
        its cost, a third of the time of printing a hundred thousand paths."""
        separator = "" if self.root.endswith("/") else "/"
        return f"{self.root}{separator}{self.relpath}"


def build_select(query: Query, tags: TagIndex, *, roots: Sequence[tuple[int, str]] = (),
                 extra_sort: Sequence[SortKey] = (), with_score: bool = False,
                 limit: int | None = None, estimate: Estimate | None = None,
                 details: bool = True) -> Select:
    """The SELECT of (id, root, relpath[, taken_at, status][, score]) for ``query``.

    ``roots`` (id, path) pairs let absolute ``path:`` terms become conditions on root_id and
    relpath; ``extra_sort`` comes after the query's own sort keys (``--sort``); ``estimate``
    guesses how many photos have one of a set of tags, to pick which tag term drives the search;
    ``details=False`` leaves out taken_at and status (converting dates costs a fifth of the time
    of a big search that only prints paths).
    """
    sort = list(query.sort) + list(extra_sort)
    with_score = with_score or any(k.field == "score" for k in sort)
    columns = [photo.c.id, album_root.c.path, photo.c.relpath]
    if details:
        columns += [photo.c.taken_at, photo.c.status]
    score = _score_expression(query, tags).label("score") if with_score else None
    if score is not None:
        columns.append(score)
    stmt = select(*columns).join(album_root, photo.c.root_id == album_root.c.id)
    path_order_scan = limit is not None and all(k.field == "path" for k in sort)
    if query.alternatives:
        stmt = stmt.where(_any_of([_alternative(alt, tags, roots, estimate, path_order_scan)
                                   for alt in query.alternatives]))
    order: list[ColumnElement] = []
    for key in sort:
        if key.field == "score":  # by the label: the subquery runs once per row, not twice
            assert score is not None
            order.append((score.desc() if key.descending else score.asc()).nulls_last())
        elif key.field == "date":
            order.append(photo.c.taken_at.is_(None).asc())  # undated photos last either way
            order.append(photo.c.taken_at.desc() if key.descending else photo.c.taken_at.asc())
        else:
            order.extend(c.desc() if key.descending else c.asc()
                         for c in (album_root.c.path, photo.c.relpath))
    if not any(key.field == "path" for key in sort):
        # A stable order for ties. (Root, relpath) is unique, so after a path key there are none;
        # repeating those keys would only make SQLite's sort compare them twice (a third slower).
        order.extend((album_root.c.path.asc(), photo.c.relpath.asc()))
    stmt = stmt.order_by(*order)
    if limit is not None:
        stmt = stmt.limit(limit)
    return stmt


def _tag_rows(tag_ids: set[int] | None, scores: list[ScoreTerm], *, indexed: bool = True,
              rows: FromClause = photo_tag) -> list[ColumnElement[bool]]:
    """Conditions on photo_tag rows: one of ``tag_ids`` (None = any tag), a score in every range.

    ``indexed=False`` writes ``tag_id + 0 IN (...)``: inside a correlated EXISTS the photo's own
    few rows (primary key prefix photo_id) are cheaper to scan than one index seek per tag id,
    and the ``+ 0`` keeps SQLite from choosing the seeks (the documented way to disqualify an
    index there; plain arithmetic for any other database). ``rows``: photo_tag or an alias of it.
    """
    conditions: list[ColumnElement[bool]] = []
    if tag_ids is not None:
        column = rows.c.tag_id if indexed else rows.c.tag_id + 0
        conditions.append(column.in_(sorted(tag_ids)))
    for s in scores:
        if s.low is not None:
            conditions.append(rows.c.score >= s.low)
        if s.high is not None:
            conditions.append(rows.c.score <= s.high)
    return conditions


def _tagged(tag_ids: set[int] | None, scores: list[ScoreTerm],
            also: Sequence[set[int]] = ()) -> Select:
    """``SELECT photo_id FROM photo_tag WHERE tag_id IN ...``, from the tag index: what drives a
    search (``photo.id IN (...)``).

    ``also``: the other tags of an AND, checked inside the subquery on the photo's own rows
    (``EXISTS``), so that only the photos that have them all are looked up in the photo table
    (``cat dog``: 2k look-ups instead of the 9.5k cats; a fifth faster).
    """
    driving = photo_tag.alias("driving")
    checks = []
    for i, ids in enumerate(also):
        other = photo_tag.alias(f"also_{i}")
        checks.append(select(other.c.photo_id).where(
            other.c.photo_id == driving.c.photo_id,
            *_tag_rows(ids, scores, indexed=False, rows=other)).exists())
    return select(driving.c.photo_id).where(*_tag_rows(tag_ids, scores, rows=driving), *checks)


def _exists_tagged(tag_ids: set[int] | None, scores: list[ScoreTerm]) -> ColumnElement[bool]:
    """``EXISTS (the photo's own rows with such a tag)``: a check on photos found otherwise."""
    return (select(photo_tag.c.photo_id)
            .where(photo_tag.c.photo_id == photo.c.id, *_tag_rows(tag_ids, scores, indexed=False))
            .exists())


Estimate = Callable[[set[int]], int]


@dataclass
class _Alternative:
    """One alternative of a query: ``photo.id IN (driving)``, if any, AND ``conditions``."""

    driving: Select | None
    conditions: list[ColumnElement[bool]]


def _any_of(alternatives: list[_Alternative]) -> ColumnElement[bool]:
    """The OR of the alternatives. Those that are nothing but a driving subquery (``cat , bird``,
    ``cat dog , bird``) become one ``IN`` over the ``UNION ALL`` of their subqueries: each photo
    is then looked up once, not once per alternative and merged (`cat , bird`: a tenth faster)."""
    only_driven = [a.driving for a in alternatives if a.driving is not None and not a.conditions]
    branches: list[ColumnElement[bool]] = []
    if only_driven:
        branches.append(photo.c.id.in_(
            only_driven[0] if len(only_driven) == 1 else union_all(*only_driven)))
    for a in alternatives:
        if a.driving is None:
            branches.append(and_(*a.conditions))
        elif a.conditions:
            branches.append(and_(photo.c.id.in_(a.driving), *a.conditions))
    return or_(*branches)


def _alternative(terms: list[Term], tags: TagIndex, roots: Sequence[tuple[int, str]],
                 estimate: Estimate | None, path_order_scan: bool = False) -> _Alternative:
    """One alternative's terms, ANDed.

    The positive tag term expected to match the fewest photos drives the search through the tag
    index (the driver); the other tag terms are checked per photo found (``EXISTS`` inside the
    driver's subquery / ``NOT EXISTS``).
    With nothing to drive (``^dog`` alone) a negated tag becomes ``NOT IN``, whose set is built
    once instead of being looked up for every photo. ``path_order_scan`` (a limit, path order):
    a driver estimated to match many photos is an ``EXISTS`` check as well, so that photos are
    read in path order until the limit.
    """
    scores = [t for t in terms if isinstance(t, ScoreTerm)]
    resolved = {t.index: tags.resolve(t) for t in terms if isinstance(t, TagTerm)}
    positive = [t for t in terms if isinstance(t, TagTerm) and not t.negated]
    driver = None
    if positive:
        if estimate is not None and len(positive) > 1:
            driver = min(positive, key=lambda t: (estimate(resolved[t.index]),
                                                  len(resolved[t.index])))
        else:
            driver = positive[0]
    walk_in_path_order = (driver is not None and path_order_scan and estimate is not None
                          and estimate(resolved[driver.index]) >= ESTIMATE_CAP)
    if walk_in_path_order:
        driver = None
    has_driver = walk_in_path_order or driver is not None or any(
        isinstance(t, DateTerm) and not t.negated for t in terms)
    conditions: list[ColumnElement[bool]] = []
    driving: Select | None = None
    if scores and not positive:
        driving = _tagged(None, scores)  # score:0.9.. alone: any tag that sure
    for term in terms:
        if isinstance(term, TagTerm):
            ids = resolved[term.index]
            if term is driver:
                also = [resolved[t.index] for t in positive if t is not driver]
                driving = _tagged(ids, scores, also)
            elif not term.negated:
                if driver is None:  # with a driver, checked inside its subquery
                    conditions.append(_exists_tagged(ids, scores))
            elif has_driver:
                conditions.append(not_(_exists_tagged(ids, scores)))
            else:
                conditions.append(photo.c.id.not_in(
                    select(photo_tag.c.photo_id).where(*_tag_rows(ids, scores))))
            continue
        if isinstance(term, PathTerm):
            condition = _path_condition(term, roots)
        elif isinstance(term, DateTerm):
            condition = and_(photo.c.taken_at.is_not(None),
                             *([photo.c.taken_at >= term.start] if term.start else []),
                             *([photo.c.taken_at < term.end] if term.end else []))
        elif isinstance(term, StatusTerm):
            condition = photo.c.status == term.status
        else:
            continue  # ScoreTerm: folded into the tag terms above
        conditions.append(not_(condition) if term.negated else condition)
    return _Alternative(driving, conditions)


def _path_condition(term: PathTerm, roots: Sequence[tuple[int, str]]) -> ColumnElement[bool]:
    """Relative: substring of relpath. Absolute: prefix of root + '/' + relpath, compiled per root
    into root_id / relpath-prefix conditions so no string concatenation happens in SQL."""
    if not term.absolute:
        return photo.c.relpath.icontains(term.value, autoescape=True)
    wanted = os.path.expanduser(term.value)
    matches: list[ColumnElement[bool]] = []
    for root_id, root_path in roots:
        root = root_path.rstrip("/") + "/"
        if root.casefold().startswith(wanted.casefold()):
            matches.append(photo.c.root_id == root_id)  # the whole album root is inside
        elif wanted.casefold().startswith(root.casefold()):
            rest = wanted[len(root):]
            matches.append(and_(photo.c.root_id == root_id,
                                photo.c.relpath.istartswith(rest, autoescape=True)))
    return or_(*matches) if matches else false()


def _score_expression(query: Query, tags: TagIndex) -> ColumnElement:
    """Max score over the photo's tag rows that the query's (positive) tag and score terms
    matched on; over all its tags when the query has no such term."""
    per_alternative: list[ColumnElement[bool]] = []
    for alt in query.alternatives:
        scores = [t for t in alt if isinstance(t, ScoreTerm)]
        positive = [t for t in alt if isinstance(t, TagTerm) and not t.negated]
        tag_ids: set[int] | None = None
        if positive:
            tag_ids = set()
            for term in positive:
                tag_ids |= tags.resolve(term)
        conditions = _tag_rows(tag_ids, scores, indexed=False)  # the photo's own few rows
        if conditions:
            per_alternative.append(and_(*conditions))
    stmt = select(func.max(photo_tag.c.score)).where(photo_tag.c.photo_id == photo.c.id)
    if per_alternative:
        stmt = stmt.where(or_(*per_alternative))
    return stmt.scalar_subquery()


def search(connection: Connection, query: Query | Sequence[str] | str, *,
           sort: Sequence[SortKey] = (), limit: int | None = None,
           with_score: bool = False, details: bool = True) -> list[Hit]:
    """Run ``query`` and return the photos found, sorted by its sort keys then ``sort``, then
    path. Raises QueryError (malformed) or UnknownTagError before touching the photo table.

    ``with_score`` fills Hit.score (always filled when sorting by score); ``details=False``
    leaves Hit.taken_at and Hit.status None, which is faster when only paths are wanted.
    """
    if not isinstance(query, Query):
        query = parse_query(query)
    tags = TagIndex.load(connection)
    roots = [tuple(r) for r in connection.execute(select(album_root.c.id, album_root.c.path))]
    stmt = build_select(query, tags, roots=roots, extra_sort=sort, with_score=with_score,
                        limit=limit, estimate=lambda ids: _estimate(connection, ids),
                        details=details)
    rows = connection.execute(stmt).all()
    scored = with_score or any(k.field == "score" for k in list(query.sort) + list(sort))
    if details:
        return [Hit(*row) for row in rows] if scored else [Hit(*row, None) for row in rows]
    if scored:
        return [Hit(i, root, rel, None, None, score) for i, root, rel, score in rows]
    return [Hit(i, root, rel) for i, root, rel in rows]


ESTIMATE_CAP = 20_000


def _estimate(connection: Connection, tag_ids: set[int]) -> int:
    """How many photo_tag rows have one of ``tag_ids``, counted up to ESTIMATE_CAP only: enough to
    tell a rare tag from a common one, at the cost of a short walk of the (tag_id, ...) index."""
    # Selecting tag_id (not photo_id) keeps it an index-only walk of the (tag_id, score) index.
    capped = (select(photo_tag.c.tag_id).where(photo_tag.c.tag_id.in_(sorted(tag_ids)))
              .limit(ESTIMATE_CAP).subquery())
    return connection.execute(select(func.count()).select_from(capped)).scalar_one()


@dataclass
class PhotoTagScore:
    name: str
    zh: str | None
    score: float
    source: str


def tags_of(connection: Connection, photo_ids: Sequence[int],
            chunk: int = 500) -> dict[int, list[PhotoTagScore]]:
    """Each photo's tags, best score first (for --json and --format {tags})."""
    result: dict[int, list[PhotoTagScore]] = {pid: [] for pid in photo_ids}
    ids = list(photo_ids)
    for start in range(0, len(ids), chunk):
        rows = connection.execute(
            select(photo_tag.c.photo_id, tag.c.name, tag.c.zh, photo_tag.c.score,
                   photo_tag.c.source)
            .join(tag, tag.c.id == photo_tag.c.tag_id)
            .where(photo_tag.c.photo_id.in_(ids[start:start + chunk]))
            .order_by(photo_tag.c.photo_id, photo_tag.c.score.desc(), tag.c.name)
        )
        for photo_id, name, zh, score, source in rows:
            result[photo_id].append(PhotoTagScore(name, zh, score, source))
    return result
