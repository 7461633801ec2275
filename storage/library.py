"""Library operations the indexer and the daemon share: plain functions taking a Session.

Callers own the transactions (``storage.db.write_session``) and keep them short; nothing here
runs the model or walks the disk, except ``find_moved`` which checks that a candidate is gone.

The photo table is also the queue. A photo is ``pending`` from the moment a new or changed file is
seen until ``store_result`` commits its tags; ``store_error`` records a failure and when to retry.
Paths are stored relative to their album root, with ``/`` separators.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import Enum
from pathlib import Path, PurePosixPath
from typing import Protocol

from sqlalchemy import and_, delete, func, literal, or_, select, update
from sqlalchemy.orm import Session

from storage.models import (
    ERROR,
    PENDING,
    SOURCE_MODEL,
    TAGGED,
    AlbumRoot,
    Meta,
    Photo,
    PhotoTag,
    Tag,
    TagParent,
)
from storage.schema import CONTENT_HASH

MAX_RETRY_DOUBLINGS = 10  # a failing photo waits at most retry_after * 2**10 between attempts

# Meta keys: the model and label-mapping version the library was last tagged with.
META_MODEL = "model"
META_MAPPING_VERSION = "mapping_version"


def utcnow() -> datetime:
    """Timestamps are stored as naive UTC (taken_at, from EXIF, is the camera's local time)."""
    return datetime.now(UTC).replace(tzinfo=None)


# --- album roots ---------------------------------------------------------------------------


def root_path(path: str | os.PathLike) -> str:
    """The canonical spelling of a folder: absolute, symlinks resolved."""
    return str(Path(path).expanduser().resolve())


def ensure_root(session: Session, folder: str | os.PathLike) -> tuple[AlbumRoot, str]:
    """The album root that covers ``folder``, and ``folder``'s path inside it ("" for the root).

    A folder inside a known root belongs to that root. A new folder becomes a root, and roots
    inside it are merged into it (their photos keep their rows, ids and tags; paths get a prefix).
    """
    path = root_path(folder)
    for root in session.scalars(select(AlbumRoot)):
        inside = _relative(path, root.path)
        if inside is not None:
            return root, inside
    root = AlbumRoot(path=path, added_at=utcnow())
    session.add(root)
    session.flush()
    for other in session.scalars(select(AlbumRoot).where(AlbumRoot.id != root.id)).all():
        prefix = _relative(other.path, path)
        if prefix is None:
            continue
        session.execute(
            update(Photo)
            .where(Photo.root_id == other.id)
            .values(root_id=root.id, relpath=literal(prefix + "/") + Photo.relpath)
        )
        session.delete(other)
    session.flush()
    return root, ""


def _relative(path: str, root: str) -> str | None:
    """``path`` relative to ``root`` as a posix string, or None if it is not inside it."""
    try:
        relative = Path(path).relative_to(root)
    except ValueError:
        return None
    return "" if relative == Path(".") else relative.as_posix()


def roots(session: Session) -> list[AlbumRoot]:
    return list(session.scalars(select(AlbumRoot).order_by(AlbumRoot.path)))


def absolute_path(root: AlbumRoot, relpath: str) -> Path:
    return Path(root.path, *PurePosixPath(relpath).parts)


def sample_paths(session: Session, n: int) -> list[Path]:
    """Up to ``n`` photos of the library picked at random (absolute paths), leaving out the ones
    that failed: a representative sample to calibrate int8 on."""
    rows = session.execute(select(AlbumRoot.path, Photo.relpath)
                           .join(AlbumRoot, Photo.root_id == AlbumRoot.id)
                           .where(Photo.status != ERROR)
                           .order_by(func.random()).limit(n))
    return [Path(root, *PurePosixPath(relpath).parts) for root, relpath in rows]


def locate(session: Session, path: str | os.PathLike) -> tuple[AlbumRoot, str] | None:
    """The root holding file ``path`` and its relpath there, or None if no root covers it.

    The file need not exist (the daemon locates deleted files); its folder is resolved if it does.
    """
    path = Path(path).expanduser()
    parent = path.parent.resolve() if path.parent.exists() else path.parent.absolute()
    full = str(parent / path.name)
    best: tuple[AlbumRoot, str] | None = None
    for root in session.scalars(select(AlbumRoot)):
        inside = _relative(full, root.path)
        if inside and (best is None or len(root.path) > len(best[0].path)):
            best = (root, inside)
    return best


def photo_at(session: Session, root: AlbumRoot, relpath: str) -> Photo | None:
    return session.scalar(select(Photo).where(Photo.root_id == root.id, Photo.relpath == relpath))


# --- tags ----------------------------------------------------------------------------------


class TagLike(Protocol):
    """What ``sync_tags`` needs of a tag; tagger.labels.TagInfo fits."""

    name: str
    zh: str | None
    broader: Iterable[str]


class ScoredTag(Protocol):
    """What ``store_result`` needs of a tag on a photo; tagger.results.TagScore fits."""

    name: str
    score: float


def sync_tags(session: Session, tags: Iterable[TagLike]) -> dict[str, int]:
    """Make the tag table match the label mapping: names, Chinese names, broader-tag edges.

    Tags no longer in the mapping stay (photos may carry them) but lose their mapping edges.
    Returns name -> tag id for every tag in the table.
    """
    tags = list(tags)
    ids = tag_ids(session)
    wanted = {t.name for t in tags} | {b for t in tags for b in t.broader}
    for name in sorted(wanted - ids.keys()):
        tag = Tag(name=name, from_mapping=True)
        session.add(tag)
        session.flush()
        ids[name] = tag.id
    by_id = {tag.id: tag for tag in session.scalars(select(Tag).where(Tag.name.in_(wanted)))}
    for info in tags:
        tag = by_id[ids[info.name]]
        tag.zh = info.zh or None
        tag.from_mapping = True
    edges = {(ids[t.name], ids[b]) for t in tags for b in t.broader if b != t.name}
    existing = set(session.execute(select(TagParent.tag_id, TagParent.parent_id)).all())
    mapped = {ids[t.name] for t in tags}
    for tag_id, parent_id in existing - edges:
        if tag_id in mapped:  # the mapping now says otherwise about this tag
            session.execute(delete(TagParent).where(
                TagParent.tag_id == tag_id, TagParent.parent_id == parent_id))
    for tag_id, parent_id in sorted(edges - existing):
        session.add(TagParent(tag_id=tag_id, parent_id=parent_id))
    session.flush()
    return ids


def tag_ids(session: Session) -> dict[str, int]:
    return dict(session.execute(select(Tag.name, Tag.id)).all())


def _tag_id(session: Session, name: str, zh: str | None) -> int:
    tag_id = session.scalar(select(Tag.id).where(Tag.name == name))
    if tag_id is None:
        tag = Tag(name=name, zh=zh or None, from_mapping=False)
        session.add(tag)
        session.flush()
        tag_id = tag.id
    return tag_id


# --- files seen on disk --------------------------------------------------------------------


class Change(Enum):
    NEW = "new"
    CHANGED = "changed"
    UNCHANGED = "unchanged"


@dataclass(frozen=True)
class KnownFile:
    """A photo row as the scanner needs it."""

    id: int
    size: int
    mtime_ns: int
    status: str
    content_hash: str | None
    sidecar_state: str | None


def known_files(session: Session, root: AlbumRoot, under: str = "") -> dict[str, KnownFile]:
    """relpath -> KnownFile for the photos of ``root`` (inside folder ``under`` if given)."""
    query = select(Photo.relpath, Photo.id, Photo.size, Photo.mtime_ns, Photo.status,
                   Photo.content_hash, Photo.sidecar_state).where(Photo.root_id == root.id)
    if under:
        query = query.where(Photo.relpath.startswith(under + "/", autoescape=True))
    return {relpath: KnownFile(*rest) for relpath, *rest in session.execute(query).all()}


def upsert_seen_file(session: Session, root: AlbumRoot, relpath: str, size: int,
                     mtime_ns: int) -> tuple[Photo, Change]:
    """Record a file seen on disk. New or changed (size or mtime differ) -> pending.

    An unchanged file keeps its row, status and tags: it is never re-tagged for being seen again.
    """
    photo = photo_at(session, root, relpath)
    if photo is None:
        photo = _new_photo(root.id, relpath, size, mtime_ns)
        session.add(photo)
        session.flush()
        return photo, Change.NEW
    if photo.size == size and photo.mtime_ns == mtime_ns:
        return photo, Change.UNCHANGED
    if adopt_own_write(photo, absolute_path(root, relpath), size, mtime_ns):
        return photo, Change.UNCHANGED
    _mark_changed(photo, size, mtime_ns)
    session.flush()
    return photo, Change.CHANGED


def add_new_files(session: Session, root: AlbumRoot, files: Iterable[tuple[str, int, int]]) -> int:
    """Insert ``(relpath, size, mtime_ns)`` rows as pending photos in one statement (bulk scan)."""
    now = utcnow()
    rows = [dict(root_id=root.id, relpath=relpath, size=size, mtime_ns=mtime_ns, status=PENDING,
                 attempts=0, indexed_at=now) for relpath, size, mtime_ns in files]
    if rows:
        session.execute(Photo.__table__.insert(), rows)
    return len(rows)


def mark_changed(session: Session, photo_id: int, size: int, mtime_ns: int) -> bool:
    """The file at a known path has new content: queue it again (its old tags stay until then).

    False if it was not queued: the row is gone or already has these facts, or the change is
    phototag's own keyword write.
    """
    photo = session.get(Photo, photo_id)
    if photo is None or (photo.size, photo.mtime_ns) == (size, mtime_ns):
        return False  # gone, or recorded meanwhile (the scan's stat may predate this transaction)
    if adopt_own_write(photo, absolute_path(photo.root, photo.relpath), size, mtime_ns):
        return False
    _mark_changed(photo, size, mtime_ns)
    return True


def own_write_facts(size: int, content_hash: str) -> str:
    """The ``Photo.own_write`` value for a rewrite of ``size`` bytes with this content hash."""
    return f"{size} {content_hash}"


def adopt_own_write(photo: Photo, path: Path, size: int, mtime_ns: int) -> bool:
    """If the file at ``path`` is phototag's own keyword rewrite of the photo (``own_write``,
    committed just before its rename: same size, same content hash, and the mtime it kept), take
    its facts as the photo's and return True: the photo keeps its tags and is not re-tagged.
    This makes a crash between that rename and the commit of the write harmless, and lets a
    scanner that sees the new file before the commit recognise it."""
    if not photo.own_write or mtime_ns != photo.mtime_ns:
        return False
    own_size, own_hash = photo.own_write.split(" ", 1)
    if int(own_size) != size:
        return False
    try:
        with open(path, "rb") as f:
            if hashlib.file_digest(f, CONTENT_HASH).hexdigest() != own_hash:
                return False
    except OSError:
        return False
    photo.size = size
    if photo.content_hash is not None:
        photo.content_hash = own_hash
    photo.own_write = None
    return True


def _new_photo(root_id: int, relpath: str, size: int, mtime_ns: int) -> Photo:
    return Photo(root_id=root_id, relpath=relpath, size=size, mtime_ns=mtime_ns, status=PENDING,
                 attempts=0, indexed_at=utcnow())


def _mark_changed(photo: Photo, size: int, mtime_ns: int) -> None:
    photo.size = size
    photo.mtime_ns = mtime_ns
    photo.own_write = None  # whatever phototag was writing, the file is now someone else's
    photo.content_hash = None
    photo.status = PENDING
    photo.error = None
    photo.attempts = 0
    photo.retry_at = None
    photo.attempt_started_at = None
    photo.interruptions = 0
    photo.indexed_at = utcnow()


# --- moves and removals --------------------------------------------------------------------


def find_moved(session: Session, content_hash: str, size: int, *,
               exclude_id: int | None = None) -> Photo | None:
    """A photo with this content whose own file is gone from disk: the file was moved or renamed.

    Only rows that already have their tags (tagged) are worth moving; a photo whose file still
    exists is a duplicate, not a move.
    """
    query = select(Photo).where(Photo.content_hash == content_hash, Photo.size == size,
                                Photo.status == TAGGED)
    if exclude_id is not None:
        query = query.where(Photo.id != exclude_id)
    for photo in session.scalars(query.order_by(Photo.id)):
        if not absolute_path(photo.root, photo.relpath).exists():
            return photo
    return None


def move_photo(session: Session, photo: Photo, root: AlbumRoot, relpath: str, *,
               size: int | None = None, mtime_ns: int | None = None) -> Photo:
    """Give ``photo`` (and its tags) a new path. A row already at the new path is replaced."""
    other = photo_at(session, root, relpath)
    if other is not None and other.id != photo.id:
        session.delete(other)
        session.flush()
    photo.root = root  # the relationship too, not only root_id: callers read photo.root next
    photo.relpath = relpath
    if size is not None:
        photo.size = size
    if mtime_ns is not None:
        photo.mtime_ns = mtime_ns
    session.flush()
    return photo


def remove_photos(session: Session, photo_ids: Collection[int]) -> int:
    """Delete photos (their tags go with them through the foreign keys' ON DELETE CASCADE)."""
    ids = list(photo_ids)
    for start in range(0, len(ids), 500):
        chunk = ids[start:start + 500]
        session.execute(delete(PhotoTag).where(PhotoTag.photo_id.in_(chunk)))
        session.execute(delete(Photo).where(Photo.id.in_(chunk)))
    return len(ids)


def remove_missing(session: Session, root: AlbumRoot, seen: Collection[str], *,
                   under: str = "", keep_under: Iterable[str] = ()) -> list[str]:
    """Delete the photos of ``root`` (inside ``under``) not in ``seen`` and not on disk now.

    ``seen`` is what a scan found; a file that appeared since (the daemon added it) is kept because
    it exists. ``keep_under`` lists folders that could not be read: their photos are kept. The
    caller must first make sure the root itself is there (mounted and not empty).
    Returns the removed relpaths.
    """
    keep_under = list(keep_under)
    if "" in keep_under:  # the root itself could not be listed
        return []
    keep = tuple(folder.rstrip("/") + "/" for folder in keep_under)
    gone = {relpath: known.id for relpath, known in known_files(session, root, under).items()
            if relpath not in seen and not relpath.startswith(keep)
            and not absolute_path(root, relpath).exists()}
    remove_photos(session, gone.values())
    return sorted(gone)


# --- the queue -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Job:
    """A photo to tag, as read in one short transaction and checked again when storing."""

    photo_id: int
    root_id: int
    relpath: str
    path: Path
    size: int
    mtime_ns: int
    content_hash: str | None
    attempt_started_at: datetime | None = None  # an attempt still open (see start_attempt)


def due_filter(now: datetime):
    """Pending photos, and failed ones whose retry time has come."""
    return or_(Photo.status == PENDING,
               and_(Photo.status == ERROR, Photo.retry_at.is_not(None), Photo.retry_at <= now))


def pending_jobs(session: Session, limit: int | None = None, *, now: datetime | None = None,
                 root: AlbumRoot | None = None, under: str = "", include_errors: bool = True,
                 after_id: int = 0, sizes: Collection[int] | None = None) -> list[Job]:
    """The next photos to tag, oldest first. Nothing is locked: a photo stays pending until
    ``store_result`` commits, so a crash loses nothing; ``after_id`` pages through a long queue.
    ``sizes`` keeps only files of those sizes (candidates for a move).
    """
    now = now or utcnow()
    condition = due_filter(now) if include_errors else Photo.status == PENDING
    query = (select(Photo.id, Photo.root_id, AlbumRoot.path, Photo.relpath, Photo.size, Photo.mtime_ns,
                    Photo.content_hash, Photo.attempt_started_at)
             .join(AlbumRoot, Photo.root_id == AlbumRoot.id)
             .where(condition, Photo.id > after_id)
             .order_by(Photo.id))
    if root is not None:
        query = query.where(Photo.root_id == root.id)
        if under:
            query = query.where(Photo.relpath.startswith(under + "/", autoescape=True))
    if sizes is not None:
        query = query.where(Photo.size.in_(sorted(sizes)))
    if limit is not None:
        query = query.limit(limit)
    return [Job(photo_id, root_id, relpath, Path(root_dir, *PurePosixPath(relpath).parts), size,
                mtime_ns, digest, started)
            for photo_id, root_id, root_dir, relpath, size, mtime_ns, digest, started
            in session.execute(query)]


def count_due(session: Session, *, now: datetime | None = None) -> int:
    return session.scalar(select(func.count()).select_from(Photo).where(due_filter(now or utcnow())))


def _current(session: Session, job: Job) -> Photo | None:
    """The job's photo if it still describes the same file (not deleted or changed since)."""
    photo = session.get(Photo, job.photo_id)
    if photo is None or photo.size != job.size or photo.mtime_ns != job.mtime_ns:
        return None
    return photo


def store_result(session: Session, job: Job, tags: Iterable[ScoredTag], *, model: str,
                 mapping_version: str, width: int | None, height: int | None,
                 taken_at: datetime | None, content_hash: str | None,
                 now: datetime | None = None) -> bool:
    """Replace the photo's model tags with ``tags`` and mark it tagged.

    User and keyword tags are left alone. Returns False (storing nothing) if the photo was deleted
    or its file changed since the job was read; it is then tagged again on its next turn.
    """
    photo = _current(session, job)
    if photo is None:
        return False
    session.execute(delete(PhotoTag).where(PhotoTag.photo_id == photo.id,
                                           PhotoTag.source == SOURCE_MODEL))
    scores: dict[int, float] = {}
    for tag in tags:
        tag_id = _tag_id(session, tag.name, getattr(tag, "zh", None))
        scores[tag_id] = max(scores.get(tag_id, 0.0), float(tag.score))
    session.add_all(PhotoTag(photo_id=photo.id, tag_id=tag_id, source=SOURCE_MODEL, score=score)
                    for tag_id, score in scores.items())
    photo.status = TAGGED
    photo.error = None
    photo.attempts = 0
    photo.retry_at = None
    photo.attempt_started_at = None
    photo.interruptions = 0
    photo.tagged_at = now or utcnow()
    photo.model = model
    photo.mapping_version = mapping_version
    photo.width = width
    photo.height = height
    photo.taken_at = taken_at
    if content_hash is not None:
        photo.content_hash = content_hash
    session.flush()
    return True


def store_error(session: Session, job: Job, reason: str, *, retry_after: float = 600.0,
                now: datetime | None = None) -> bool:
    """Record why tagging failed and when to try again: ``retry_after`` seconds, doubled per failure.

    The attempt counts once: at ``start_attempt`` if it went through it, else here. Tags from an
    earlier successful run stay. Returns False if the photo changed or went away.
    """
    photo = _current(session, job)
    if photo is None:
        return False
    if photo.attempt_started_at is None:
        photo.attempts = (photo.attempts or 0) + 1
    photo.attempt_started_at = None
    photo.status = ERROR
    photo.error = reason
    delay = retry_after * 2 ** min(max(photo.attempts, 1) - 1, MAX_RETRY_DOUBLINGS)
    photo.retry_at = (now or utcnow()) + timedelta(seconds=delay)
    session.flush()
    return True


def start_attempt(session: Session, job: Job, now: datetime) -> bool:
    """Count a tagging attempt of the job's photo as started at ``now``, before the photo is read:
    if phototag dies while tagging it (a crash in an image library, an out-of-memory kill), the
    photo is found with the attempt still open. False if the photo changed or went away."""
    photo = _current(session, job)
    if photo is None:
        return False
    photo.attempts = (photo.attempts or 0) + 1
    photo.attempt_started_at = now
    session.flush()
    return True


def give_up(session: Session, job: Job, reason: str) -> None:
    """Record the photo as failed and not to be retried (retry_at NULL) until its file changes
    or it is queued again with ``requeue(errors=True, given_up=True)``."""
    photo = _current(session, job)
    if photo is not None:
        photo.status = ERROR
        photo.error = reason
        photo.retry_at = None
        photo.attempt_started_at = None
        session.flush()


def close_interrupted(session: Session, job: Job) -> int | None:
    """Close the attempt the job found open (phototag died during it) and count it among the
    photo's interruptions; returns their number. None, changing nothing, if that attempt is no
    longer open as the job saw it (the photo was tagged, changed or queued again meanwhile)."""
    photo = _current(session, job)
    if photo is None or photo.attempt_started_at is None or (
            photo.attempt_started_at != job.attempt_started_at or photo.status == TAGGED):
        return None
    photo.attempt_started_at = None
    photo.interruptions = (photo.interruptions or 0) + 1
    session.flush()
    return photo.interruptions


def abandon_attempts(session: Session, started: Iterable[tuple[int, datetime]]) -> None:
    """Take back the attempts started at those times whose outcome was never stored (phototag
    stopped cleanly meanwhile, or the photo turned out to be a move): they do not count."""
    for photo_id, at in started:
        photo = session.get(Photo, photo_id)
        if photo is not None and photo.attempt_started_at == at:
            photo.attempts = max(0, (photo.attempts or 0) - 1)
            photo.attempt_started_at = None
    session.flush()


def requeue(session: Session, *, outdated: tuple[str, str] | None = None, errors: bool = False,
            given_up: bool = False, everything: bool = False, root: AlbumRoot | None = None,
            under: str = "") -> int:
    """Queue photos for re-tagging (``phototag retag``, the nightly job); returns how many.

    ``outdated=(model, mapping_version)`` picks tagged photos tagged by anything else; ``errors``
    picks failed photos now rather than at their retry time, and with ``given_up`` also those
    not to be retried (retry_at NULL: they brought phototag down); ``everything`` picks all.
    Their current tags stay searchable until the new ones replace them.
    """
    picks = []
    if everything:
        picks.append(Photo.status != PENDING)
    if outdated is not None:
        model, mapping_version = outdated
        picks.append(and_(Photo.status == TAGGED,
                          or_(Photo.model.is_distinct_from(model),
                              Photo.mapping_version.is_distinct_from(mapping_version))))
    if errors:
        picks.append(Photo.status == ERROR if given_up
                     else and_(Photo.status == ERROR, Photo.retry_at.is_not(None)))
    if not picks:
        return 0
    query = update(Photo).where(or_(*picks))
    if root is not None:
        query = query.where(Photo.root_id == root.id)
        if under:
            query = query.where(Photo.relpath.startswith(under + "/", autoescape=True))
    result = session.execute(
        query.values(status=PENDING, retry_at=None, attempts=0, attempt_started_at=None,
                     interruptions=0)
        .execution_options(synchronize_session=False))
    return result.rowcount or 0


# --- meta ----------------------------------------------------------------------------------


def get_meta(session: Session, key: str, default: str | None = None) -> str | None:
    value = session.scalar(select(Meta.value).where(Meta.key == key))
    return default if value is None else value


def set_meta(session: Session, key: str, value: str) -> None:
    row = session.get(Meta, key)
    if row is None:
        session.add(Meta(key=key, value=value))
    else:
        row.value = value
    session.flush()
