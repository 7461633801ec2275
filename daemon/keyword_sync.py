"""Keywords between the database and the photos: write phototag's tags out, read the user's in.

Writing (``write_photo``, ``write_due``): a photo's model tags become keyword paths through the
tag hierarchy (``cat`` -> ``("animal", "cat")``) and go to its sidecar or embedded XMP via
``storage.keywords.write_keywords``. Afterwards the photo's row records the leaves phototag now
owns (``written_keywords``, so the next write replaces only those) and, after an embedded write,
the file's new size and content hash (its mtime is kept), so that the scanner and the watcher do
not take our own write for a user's edit and tag the photo again, in a loop. The new size and
hash are committed as ``own_write`` just before the rewrite is renamed into place: a scanner that
meets the new file before the write is recorded (another thread, another process, or the next
start after a crash in between) recognises it as ours (``storage.library.adopt_own_write``).

``keywords_written_at`` is when phototag last wrote, or tried to write, a photo's keywords; a
photo tagged after that is due (``due_photo_ids``). A failed write is not retried until the
photo is tagged again or ``phototag write-tags`` is run, so a read-only photo is not retried
after every batch.

Reading (``read_photo_keywords``, ``store_keywords``): the keywords a photo already carries
(sidecars, embedded XMP, EXIF XPKeywords), minus the ones phototag wrote itself, become tags with
source ``keyword``, so that ``phototag search`` finds photos by the user's own keywords.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import Engine, and_, delete, func, or_, select
from sqlalchemy.orm import Session

from daemon.config import MetadataConfig
from storage import library
from storage.db import read_session, write_session
from storage.keywords import (
    EMBEDDED,
    MODES,
    KeywordWriteError,
    PendingWrite,
    WrittenKeywords,
    has_shared_name,
    normalize_tags,
    read_keywords,
    sidecar_state,
    write_keywords,
)
from storage.models import (
    SOURCE_KEYWORD,
    SOURCE_MODEL,
    TAGGED,
    AlbumRoot,
    Photo,
    PhotoTag,
    Tag,
    TagParent,
)

log = logging.getLogger(__name__)

OFF = "off"
KEYWORD_SCORE = 1.0  # a keyword the user set is certain

Broader = Mapping[str, Sequence[str]]  # tag name -> its broader tags, main one first


# --- tag paths ------------------------------------------------------------------------------


def broader_order(tags: Iterable) -> dict[str, tuple[str, ...]]:
    """tag name -> its broader tags in the label mapping's order, from TagInfo-like objects
    (``tagger.labels.LabelMap.all_tags()``): the mapping lists a tag's main broader tag first."""
    return {tag.name: tuple(tag.broader) for tag in tags}


def tag_paths(session: Session, broader: Broader | None = None) -> dict[int, tuple[str, ...]]:
    """tag id -> its keyword path, broadest first: ``("animal", "cat")``.

    A tag with several broader tags (cat -> animal, pet) gets one path, the same for every
    photo so that photo tools show one tree: through the first of its broader tags in
    ``broader`` (the label mapping's order, see ``broader_order``) that the database knows;
    failing that, through the parent with the longest chain above it, ties going to the name
    that sorts first. Cycles (an edited mapping) are cut.
    """
    broader = broader or {}
    names = dict(session.execute(select(Tag.id, Tag.name)).all())
    parents: dict[int, list[int]] = {}
    for tag_id, parent_id in session.execute(select(TagParent.tag_id, TagParent.parent_id)):
        if parent_id != tag_id:
            parents.setdefault(tag_id, []).append(parent_id)
    chains: dict[int, tuple[int, ...]] = {}  # tag id -> ids along its path, broadest first

    def chain_of(tag_id: int, visiting: frozenset[int]) -> tuple[int, ...]:
        known = chains.get(tag_id)
        if known is not None and visiting.isdisjoint(known):
            return known
        options = {p: chain_of(p, visiting | {tag_id})
                   for p in parents.get(tag_id, ()) if p not in visiting and p in names}
        by_name = {names[p]: chain for p, chain in options.items()}
        preferred = [by_name[n] for n in broader.get(names[tag_id], ()) if n in by_name]
        best = preferred[0] if preferred else min(
            options.values(), key=lambda c: (-len(c), [names[i] for i in c]), default=())
        chain = (*best, tag_id)
        if not visiting:  # below the top, a chain may be cut short by the cycle check
            chains[tag_id] = chain
        return chain

    paths: dict[int, tuple[str, ...]] = {}
    for tag_id in names:
        paths[tag_id] = tuple(names[i] for i in chain_of(tag_id, frozenset()))
    return paths


def photo_keyword_paths(session: Session, photo_id: int, paths: dict[int, tuple[str, ...]],
                        broader: Broader | None = None) -> list[tuple[str, ...]]:
    """The keyword paths for a photo's model tags, best score first. ``paths`` (from
    ``tag_paths``) is refreshed in place if a tag was added since it was computed."""
    tag_ids = list(session.scalars(
        select(PhotoTag.tag_id)
        .where(PhotoTag.photo_id == photo_id, PhotoTag.source == SOURCE_MODEL)
        .order_by(PhotoTag.score.desc(), PhotoTag.tag_id)))
    if not paths.keys() >= set(tag_ids):
        paths.update(tag_paths(session, broader))
    return [paths[tag_id] for tag_id in tag_ids if _writable(paths[tag_id])]


def _writable(path: tuple[str, ...]) -> bool:
    """A tag (from a user's label file) whose name holds a path separator cannot be a keyword:
    it is left out of the photo's keywords rather than stopping the photo being written."""
    try:
        normalize_tags([path])
    except ValueError as exc:
        log.warning("tag %s left out of the keywords: %s", "|".join(path), exc)
        return False
    return True


def previous_keywords(photo: Photo) -> list[str]:
    """The leaves phototag last wrote for ``photo`` (Photo.written_keywords, a JSON list)."""
    if not photo.written_keywords:
        return []
    try:
        value = json.loads(photo.written_keywords)
    except ValueError:
        log.warning("photo %s: written_keywords is not JSON; treated as empty", photo.id)
        return []
    return [k for k in value if isinstance(k, str)] if isinstance(value, list) else []


# --- writing --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """A photo to write, as read from the database (``dry_run`` prints these)."""

    photo_id: int
    path: Path
    keywords: list[tuple[str, ...]]
    previous: list[str]
    size: int
    mtime_ns: int


@dataclass
class WriteSummary:
    written: int = 0
    failed: int = 0
    errors: list[KeywordWriteError] = field(default_factory=list)

    def line(self) -> str:
        return f"{self.written} written, {self.failed} failed"


def target(session: Session, photo: Photo, paths: dict[int, tuple[str, ...]],
           broader: Broader | None = None) -> Target:
    return Target(photo.id, library.absolute_path(photo.root, photo.relpath),
                  photo_keyword_paths(session, photo.id, paths, broader),
                  previous_keywords(photo), photo.size, photo.mtime_ns)


def write_photo(engine: Engine, photo_id: int, *, mode: str, sidecar_name: str,
                broader: Broader | None = None,
                paths: dict[int, tuple[str, ...]] | None = None) -> WrittenKeywords | None:
    """Write one tagged photo's keywords and record the write; None if it is no longer tagged.

    ``broader``: see ``tag_paths``; ``paths``: tag paths computed before (writing many photos).

    Three short transactions, none held during the file write: plan; just before the rename,
    record what is being written (``record_intent``); then record the outcome. A crash at any
    point leaves the database describing either the old file or the new one (``own_write``).

    Raises KeywordWriteError: the file is then unchanged and the attempt is recorded.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
    with write_session(engine) as session:
        photo = session.get(Photo, photo_id)
        if photo is None or photo.status != TAGGED:
            return None
        _adopt_finished_write(photo)
        if paths is None:
            paths = tag_paths(session, broader)
        planned = target(session, photo, paths, broader)
    # A photo tagged again from here on is due for another write (see due_photo_ids).
    planned_at = library.utcnow()
    recorded: list[PendingWrite] = []

    def record_intent(pending: PendingWrite) -> None:
        """Runs just before the new file is renamed into place: from then on the database
        claims the keywords being written, and knows an embedded rewrite as ours."""
        with write_session(engine) as session:
            photo = session.get(Photo, photo_id)
            if photo is None:
                raise KeywordWriteError(planned.path, "left the index while writing; not written")
            photo.written_keywords = json.dumps(pending.keywords, ensure_ascii=False)
            if pending.size is not None and pending.sha256 is not None:
                photo.own_write = library.own_write_facts(pending.size, pending.sha256)
        recorded.append(pending)

    written: WrittenKeywords | None = None
    failure: KeywordWriteError | None = None
    try:
        written = write_keywords(
            planned.path, planned.keywords, mode=mode, previous=planned.previous,
            sidecar_name=sidecar_name, expect_size=planned.size,
            expect_mtime_ns=planned.mtime_ns, before_replace=record_intent)
    except KeywordWriteError as exc:
        failure = exc
    with write_session(engine) as session:
        photo = session.get(Photo, photo_id)
        if photo is not None:
            if written is not None:
                photo.written_keywords = json.dumps(written.keywords, ensure_ascii=False)
                if written.mode == EMBEDDED:
                    _record_own_write(photo, written)
            elif recorded:  # recorded, then the rename failed: the file still has the old ones
                photo.written_keywords = json.dumps(planned.previous, ensure_ascii=False)
                pending = recorded[0]
                if pending.size is not None and photo.own_write == library.own_write_facts(
                        pending.size, pending.sha256):
                    photo.own_write = None
            photo.keywords_written_at = planned_at
    if failure is not None:
        raise failure
    return written


def _adopt_finished_write(photo: Photo) -> None:
    """An earlier embedded rewrite whose record a crash prevented: if the file is that rewrite,
    take its facts now, or this write would find the photo changed and refuse."""
    if not photo.own_write:
        return
    path = library.absolute_path(photo.root, photo.relpath)
    try:
        st = os.stat(path)
    except OSError:
        return
    library.adopt_own_write(photo, path, st.st_size, st.st_mtime_ns)


def _record_own_write(photo: Photo, written: WrittenKeywords) -> None:
    """The photo file is now our rewrite: store its facts so no scanner sees a user's edit.

    Unless a scanner got there first: it then either adopted our write already (own_write
    cleared, the same facts) or found the file changed again and queued it (own_write cleared,
    the newer facts), and either way its facts stand.
    """
    assert written.sha256 is not None  # an embedded rewrite
    if photo.own_write != library.own_write_facts(written.size, written.sha256):
        return
    photo.size = written.size
    photo.mtime_ns = written.mtime_ns
    if photo.content_hash is not None:
        photo.content_hash = written.sha256
    photo.own_write = None


def write_photos(engine: Engine, photo_ids: Iterable[int], *, mode: str, sidecar_name: str,
                 broader: Broader | None = None, warn: Callable[[str], None] = log.warning,
                 advance: Callable[[int], None] | None = None) -> WriteSummary:
    """Write every photo in ``photo_ids``, one transaction each; errors are counted and warned
    (``<path>: <reason>``), never raised. ``advance(1)`` after each photo."""
    summary = WriteSummary()
    with read_session(engine) as session:
        paths = tag_paths(session, broader)
    for photo_id in photo_ids:
        try:
            if write_photo(engine, photo_id, mode=mode, sidecar_name=sidecar_name,
                           broader=broader, paths=paths) is not None:
                summary.written += 1
        except KeywordWriteError as exc:
            summary.failed += 1
            summary.errors.append(exc)
            warn(str(exc))
        if advance:
            advance(1)
    return summary


def due_photo_ids(session: Session, *, limit: int | None = None) -> list[int]:
    """Tagged photos whose keywords were never written, or were written before their last
    tagging."""
    query = (select(Photo.id)
             .where(Photo.status == TAGGED,
                    or_(Photo.keywords_written_at.is_(None),
                        Photo.keywords_written_at < Photo.tagged_at))
             .order_by(Photo.id))
    if limit is not None:
        query = query.limit(limit)
    return list(session.scalars(query))


def write_due(engine: Engine, metadata: MetadataConfig, *, broader: Broader | None = None,
              limit: int | None = None, warn: Callable[[str], None] = log.warning
              ) -> WriteSummary:
    """Write the keywords of photos tagged since their last write, per ``metadata`` (the
    config's ``[metadata]``: ``write`` off|sidecar|embedded, ``sidecar_name``). A no-op when
    writing is off. For the daemon, after each batch it commits; ``broader``: see
    ``broader_order``."""
    if metadata.write == OFF:
        return WriteSummary()
    with read_session(engine) as session:
        ids = due_photo_ids(session, limit=limit)
    return write_photos(engine, ids, mode=metadata.write, sidecar_name=metadata.sidecar_name,
                        broader=broader, warn=warn)


def selected_photo_ids(session: Session, under: Path | None = None) -> list[int]:
    """Tagged photos with a model tag or with keywords written before (whose tags may all be
    gone now, leaving ours to remove): all of them, or those at/under ``under``."""
    query = (select(Photo.id)
             .where(Photo.status == TAGGED,
                    or_(Photo.id.in_(select(PhotoTag.photo_id)
                                     .where(PhotoTag.source == SOURCE_MODEL)),
                        and_(Photo.written_keywords.is_not(None),
                             Photo.written_keywords != "[]")))
             .order_by(Photo.id))
    if under is None:
        return list(session.scalars(query))
    ids: list[int] = []
    for root, relpath in _places(session, under):
        in_root = query.where(Photo.root_id == root.id)
        if relpath:
            in_root = in_root.where(or_(
                Photo.relpath == relpath,
                Photo.relpath.startswith(relpath + "/", autoescape=True)))
        ids += session.scalars(in_root)
    return sorted(set(ids))


def _places(session: Session, path: Path) -> Iterator[tuple[AlbumRoot, str]]:
    """The album roots covering ``path`` (file or folder) with its relpath in each, and the
    roots inside ``path`` (whole)."""
    full = library.root_path(path)
    for root in library.roots(session):
        try:
            inside = Path(full).relative_to(root.path).as_posix()
        except ValueError:
            try:
                Path(root.path).relative_to(full)
            except ValueError:
                continue
            yield root, ""
            continue
        yield root, "" if inside == "." else inside


def load_targets(session: Session, photo_ids: Collection[int],
                 broader: Broader | None = None) -> list[Target]:
    """What would be written for these photos (for ``--dry-run``)."""
    paths = tag_paths(session, broader)
    targets = []
    for photo_id in photo_ids:
        photo = session.get(Photo, photo_id)
        if photo is not None:
            targets.append(target(session, photo, paths, broader))
    return targets


# --- reading the user's keywords ------------------------------------------------------------


def read_photo_keywords(path: Path | str) -> tuple[list[str], str | None]:
    """Keywords the photo file and its sidecars carry, and the sidecars' state (``sidecar_state``)
    taken just before, so that an edit made while reading is seen by the next scan. No database;
    safe in a worker thread. Unreadable sources are logged and skipped; when a sidecar could not
    be read the state is None, so that the next scan tries again."""
    state = sidecar_state(path)
    unread: list[Path] = []
    keywords = read_keywords(path, unread_sidecars=unread)
    return keywords, None if unread else state


def store_keywords(session: Session, photo_id: int, keywords: Iterable[str], *,
                   sidecar_state: str | None) -> list[str]:
    """Make the photo's ``keyword`` tags exactly ``keywords`` minus those phototag wrote itself,
    and record the state of the sidecars they were read from.

    A keyword matches an existing tag by name, then by name ignoring case, then by Chinese name;
    otherwise a tag is created (``from_mapping=False``). Returns the tag names now attached.
    """
    photo = session.get(Photo, photo_id)
    if photo is None:
        return []
    photo.sidecar_state = sidecar_state
    ours = set(previous_keywords(photo))
    if has_shared_name(sidecar_state):  # IMG_1.xmp also holds what we wrote for IMG_1.heic
        for sibling in _sharing_a_sidecar(session, photo):
            ours.update(previous_keywords(sibling))
    tag_ids: dict[int, str] = {}
    for keyword in keywords:
        keyword = keyword.strip()
        if keyword and keyword not in ours:
            tag = _tag_for_keyword(session, keyword)
            tag_ids.setdefault(tag.id, tag.name)
    session.execute(delete(PhotoTag).where(PhotoTag.photo_id == photo_id,
                                           PhotoTag.source == SOURCE_KEYWORD))
    session.add_all(PhotoTag(photo_id=photo_id, tag_id=tag_id, source=SOURCE_KEYWORD,
                             score=KEYWORD_SCORE) for tag_id in tag_ids)
    session.flush()
    return list(tag_ids.values())


def _sharing_a_sidecar(session: Session, photo: Photo) -> list[Photo]:
    """The other photos of the same folder and name but another extension (IMG_1.jpg for
    IMG_1.heic): with Lightroom's naming they share one sidecar, IMG_1.xmp. Found by listing the
    folder, then looked up by path (a LIKE on relpath would scan the whole table)."""
    folder, name = posixpath.split(photo.relpath)
    stem = os.path.splitext(name)[0]
    try:
        names = os.listdir(library.absolute_path(photo.root, folder))
    except OSError:
        return []
    relpaths = [posixpath.join(folder, other) for other in names
                if other != name and os.path.splitext(other)[0] == stem
                and other.isprintable()]  # not a name the file system could not decode
    if not relpaths:
        return []
    return list(session.scalars(select(Photo).where(Photo.root_id == photo.root_id,
                                                    Photo.relpath.in_(relpaths))))


def import_keywords(session: Session, photo_id: int, path: Path | str) -> list[str]:
    """``store_keywords`` with the keywords read from the photo at ``path`` now."""
    keywords, state = read_photo_keywords(path)
    return store_keywords(session, photo_id, keywords, sidecar_state=state)


def _tag_for_keyword(session: Session, keyword: str) -> Tag:
    tag = session.scalar(select(Tag).where(Tag.name == keyword))
    if tag is None:
        tag = session.scalar(select(Tag).where(func.lower(Tag.name) == keyword.lower())
                             .order_by(Tag.id).limit(1))
    if tag is None:
        tag = session.scalar(select(Tag).where(Tag.zh == keyword).order_by(Tag.id).limit(1))
    if tag is None:
        tag = Tag(name=keyword, from_mapping=False)
        session.add(tag)
        session.flush()
    return tag
