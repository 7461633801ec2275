"""The indexing core shared by ``phototag index``, the daemon and ``phototag retag``.

Three steps, each safe to interrupt at any moment:

1. ``reconcile`` scans a folder and records new and changed files as ``pending`` photos (short
   write transactions; no model involved). Unchanged files (same path, size, mtime) are left alone,
   except that a tagged photo whose XMP sidecars changed since their keywords were read (edited in
   digiKam or Lightroom while no daemon watched) has its keywords read again, without a re-tag.
2. ``remove_gone`` settles the photos whose files are gone, but only when the album root is there
   and not empty, so an unmounted share is never read as "everything was deleted". A gone photo
   whose content turns up as a pending file (same size, then same hash) was moved or renamed: it
   takes the new path and keeps its tags, without inference. The others are removed.
3. ``tag_jobs`` works through pending photos: hashes each file (and reads its EXIF date) in a
   few threads, still catches a move the scan could not see (the old file vanished after it),
   tags the rest with the model, and commits results one batch per write transaction. The model
   runs outside any transaction. Each attempt is recorded as started first, so that a photo
   that brings the process down (a crash, the OOM killer) is found out and cannot block the queue.

This module imports neither torch nor the tagger; the caller passes a tagger (``LazyTagger``).
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from sqlalchemy import Engine, func, select

from daemon import keyword_sync
from daemon.scan import (
    FileFacts,
    PhotoFilter,
    chunks,
    file_facts,
    root_available,
    scan_tree,
    walk_photos,
)
from storage import library
from storage.db import read_session, refresh_statistics, write_session
from storage.keywords import sidecar_state
from storage.library import Job
from storage.models import AlbumRoot, Photo, TAGGED

if TYPE_CHECKING:
    from daemon.config import Config
    from tagger.engine import Tagger
    from tagger.labels import LabelMap
    from tagger.results import ImageResult

log = logging.getLogger(__name__)

WRITE_CHUNK = 1000  # rows per write transaction while recording a scan
JOB_PAGE = 500  # pending photos read per query

Warn = Callable[[str], None]


class TaggerLike(Protocol):
    """What the indexer needs of a tagger: ``tagger.engine.Tagger`` and ``LazyTagger`` fit."""

    model_name: str
    mapping_version: str
    batch_size: int
    labels: LabelMap

    def tag_files(self, paths: Iterable[str | os.PathLike]) -> Iterator[ImageResult]: ...


@dataclass
class Summary:
    """What an indexing run did, for the summary line and the daemon's log."""

    new: int = 0
    changed: int = 0
    moved: int = 0
    removed: int = 0
    failed: int = 0
    unchanged: int = 0
    tagged: int = 0
    keywords_read: int = 0  # tagged photos whose changed sidecars were read again
    seconds: float = 0.0
    new_keys: set[tuple[int, str]] = field(default_factory=set, repr=False)

    def line(self) -> str:
        counts = (f"{self.new} new, {self.changed} changed, {self.moved} moved, "
                  f"{self.removed} removed, {self.failed} failed, {self.unchanged} unchanged")
        if self.keywords_read:
            counts += f", {self.keywords_read} with changed sidecars read again"
        if self.tagged and self.seconds > 0:
            counts += (f" ({self.tagged} tagged in {self.seconds:.1f} s, "
                       f"{self.tagged / self.seconds:.1f} photos/s)")
        return counts


@dataclass
class Reconciled:
    """One scanned folder: what ``remove_gone`` needs to know afterwards."""

    root_id: int
    root_path: Path
    under: str  # the folder inside the root ("" = the whole root)
    available: bool
    seen: set[str]
    unreadable: list[str]


def photo_filter(config: Config) -> PhotoFilter:
    return PhotoFilter(config.scan.exclude, config.scan.extensions)


CALIBRATION_SAMPLE = 64  # photos that int8 / "auto" are prepared on (see tagger.precision)


class LazyTagger:
    """The configured tagger, checked up front and loaded on first use.

    The constructor only checks what is cheap to check without torch: the model name, that its
    weights file is there, and the label mapping. The model itself (seconds to import torch and
    load the weights) is loaded by the first ``tag_files`` call, so a re-run with nothing new to
    tag never pays for it. Raises ``tagger.backbones.ModelError`` (unknown model, missing weights)
    or ``tagger.labels.LabelMapError``; ``tag_files`` may raise ``ModelError`` for unusable weights.
    """

    def __init__(self, config: Config, model: str | None = None) -> None:
        from daemon.config import cache_dir
        from tagger.backbones import get_backbone
        from tagger.labels import load_label_map
        from tagger.weights import weights_path

        name = model or config.model.name
        self._options = dict(
            # the configured weights file belongs to the configured model only
            weights_file=config.model.weights if name == config.model.name else None,
            cache_dir=cache_dir(config),
            labels_file=config.labels.file,
            batch_size=config.model.batch_size,
            threads=config.model.threads,
            decode_threads=config.model.decode_threads,
            precision=config.model.precision,
            runtime=config.model.runtime,
        )
        backbone = get_backbone(name)
        weights_path(backbone, weights_file=self._options["weights_file"],
                     cache_dir=self._options["cache_dir"])
        self.labels = load_label_map(config.labels.file)
        self.model_name: str = backbone.name
        self.mapping_version: str = self.labels.version
        self.batch_size: int = max(1, config.model.batch_size)
        self._tagger: Tagger | None = None

    def load(self, calibration: Iterable[str | os.PathLike] = ()) -> Tagger:
        """The tagger; ``calibration`` photos prepare int8/"auto" the first time (then cached)."""
        if self._tagger is None:
            from tagger.engine import open_tagger

            self._tagger = open_tagger(self.model_name, calibration=calibration, **self._options)
        return self._tagger

    def tag_files(self, paths: Iterable[str | os.PathLike]) -> Iterator[ImageResult]:
        """Like ``Tagger.tag_files``; loads the model only once there is a first file to tag,
        with the first files as the calibration sample of the user's own photos."""
        paths = iter(paths)
        head = list(itertools.islice(paths, CALIBRATION_SAMPLE))
        if head:
            yield from self.load(head).tag_files(itertools.chain(head, paths))


def calibration_sample(engine: Engine, folders: Iterable[Path], photos: PhotoFilter,
                       n: int = CALIBRATION_SAMPLE) -> Iterator[Path]:
    """Photos to prepare int8 / "auto" on where no run of photos comes first (the daemon): a
    random sample of the library's photos under ``folders`` that are still there, topped up with
    the first photos found in ``folders`` while the library has too few (a first start). Lazy:
    nothing is read unless the preparation needs it."""
    folders = list(folders)
    with read_session(engine) as session:
        candidates = library.sample_paths(session, 4 * n)  # some may be gone or elsewhere
    sample = [path for path in candidates
              if any(path.is_relative_to(folder) for folder in folders) and path.is_file()][:n]
    yield from sample
    seen = set(sample)
    for folder in folders:
        for relpath, _ in walk_photos(folder, photos):
            if len(seen) >= n:
                return
            path = folder / relpath
            if path not in seen:
                seen.add(path)
                yield path


def sync_labels(engine: Engine, tagger: TaggerLike) -> None:
    """Store the tagger's tags (names, Chinese names, hierarchy) and which model and mapping run."""
    with write_session(engine) as session:
        library.sync_tags(session, tagger.labels.all_tags())
        library.set_meta(session, library.META_MODEL, tagger.model_name)
        library.set_meta(session, library.META_MAPPING_VERSION, tagger.mapping_version)


# --- step 1: scan ----------------------------------------------------------------------------


def reconcile(engine: Engine, folder: Path, photos: PhotoFilter, *,
              summary: Summary | None = None, warn: Warn = log.warning) -> Reconciled:
    """Scan ``folder`` and queue its new and changed photos; see the module docstring."""
    summary = summary if summary is not None else Summary()
    with write_session(engine) as session:
        root, under = library.ensure_root(session, folder)
        root_id, root_path = root.id, Path(root.path)
    available = root_available(root_path)
    scan = scan_tree(root_path, photos, under)
    for problem in scan.problems:
        warn(problem)
    with read_session(engine) as session:
        known = library.known_files(session, session.get(AlbumRoot, root_id), under)

    new = sorted(relpath for relpath in scan.files if relpath not in known)
    changed = [(known[relpath].id, stat.size, stat.mtime_ns)
               for relpath, stat in scan.files.items()
               if relpath in known and (known[relpath].size, known[relpath].mtime_ns)
               != (stat.size, stat.mtime_ns)]
    summary.unchanged += len(scan.files) - len(new) - len(changed)
    changed_ids = {photo_id for photo_id, _, _ in changed}
    sidecar_edited = [(known[relpath].id, root_path / relpath, known[relpath].sidecar_state)
                      for relpath in scan.files
                      if relpath in known and known[relpath].id not in changed_ids
                      and known[relpath].status == TAGGED
                      and known[relpath].sidecar_state != scan.sidecar_state(relpath)]

    for chunk in chunks(new, WRITE_CHUNK):
        with write_session(engine) as session:
            root = session.get(AlbumRoot, root_id)
            # the daemon may have added some of them since we looked
            present = set(session.scalars(select(Photo.relpath).where(
                Photo.root_id == root_id, Photo.relpath.in_(chunk))))
            rows = [(relpath, scan.files[relpath].size, scan.files[relpath].mtime_ns)
                    for relpath in chunk if relpath not in present]
            summary.new += library.add_new_files(session, root, rows)
            summary.new_keys.update((root_id, relpath) for relpath, _, _ in rows)
    for chunk in chunks(changed, WRITE_CHUNK):
        with write_session(engine) as session:
            queued = sum(library.mark_changed(session, photo_id, size, mtime_ns)
                         for photo_id, size, mtime_ns in chunk)
        summary.changed += queued
        summary.unchanged += len(chunk) - queued
    for chunk in chunks(sidecar_edited, WRITE_CHUNK):
        # The listing only points at candidates; the sidecars' own stat decides (a case-folding
        # file system or an exclude pattern can make the listing miss a sidecar that is read).
        read = [(photo_id, *keyword_sync.read_photo_keywords(path))
                for photo_id, path, stored in chunk if sidecar_state(path) != stored]
        if not read:
            continue
        with write_session(engine) as session:
            for photo_id, keywords, state in read:
                keyword_sync.store_keywords(session, photo_id, keywords, sidecar_state=state)
        summary.keywords_read += len(read)
    return Reconciled(root_id, root_path, under, available, set(scan.files), scan.unreadable)


# --- step 3: remove ------------------------------------------------------------------------


def remove_gone(engine: Engine, scanned: Reconciled, *, summary: Summary | None = None,
                warn: Warn = log.warning) -> list[str]:
    """Settle the photos of a scanned folder whose files are gone; returns the removed relpaths.

    Nothing happens unless the album root is there and not empty. A gone photo whose content
    turns up as a pending file elsewhere (same size, then same hash) was moved: it takes the new
    path with its tags, and the pending row goes. Only files whose size matches a gone photo are
    hashed here. The other gone photos are removed.
    """
    summary = summary if summary is not None else Summary()
    if not scanned.available or not root_available(scanned.root_path):
        warn(f"{scanned.root_path}: album folder is missing or empty (not mounted?); "
             "keeping its photos in the index")
        return []
    keep = tuple(folder + "/" for folder in scanned.unreadable if folder)
    if "" in scanned.unreadable:
        return []
    with read_session(engine) as session:
        root = session.get(AlbumRoot, scanned.root_id)
        if root is None:
            return []
        known = library.known_files(session, root, scanned.under)
    gone = {known[relpath].id: known[relpath] for relpath in known
            if relpath not in scanned.seen and not relpath.startswith(keep)
            and not (scanned.root_path / relpath).exists()}
    if not gone:
        return []

    movable = {(k.size, k.content_hash): k.id for k in gone.values()
               if k.status == TAGGED and k.content_hash}
    if movable:
        sizes = sorted({size for size, _ in movable})
        candidates = []
        for chunk in chunks(sizes, WRITE_CHUNK):
            with read_session(engine) as session:
                candidates += library.pending_jobs(session, sizes=chunk, include_errors=False)
        moves = []
        for job in candidates:
            facts = file_facts(job.path)
            source = movable.pop((job.size, facts.content_hash), None)
            if source is not None:
                moves.append((job, facts, source))
        if moves:
            _store(engine, None, _Pending(moves=moves), {}, 0.0, summary, warn)

    with write_session(engine) as session:
        root = session.get(AlbumRoot, scanned.root_id)
        removed = library.remove_missing(session, root, scanned.seen, under=scanned.under,
                                         keep_under=scanned.unreadable)
    summary.removed += len(removed)
    return removed


# --- step 2: tag -----------------------------------------------------------------------------


def due_jobs(engine: Engine, root_id: int | None = None, under: str = "") -> Iterator[Job]:
    """Pending photos (and failed ones due for a retry), read a page at a time in short reads."""
    now = library.utcnow()
    after = 0
    while True:
        with read_session(engine) as session:
            root = session.get(AlbumRoot, root_id) if root_id is not None else None
            if root_id is not None and root is None:
                return
            jobs = library.pending_jobs(session, JOB_PAGE, now=now, root=root, under=under,
                                        after_id=after)
        if not jobs:
            return
        yield from jobs
        after = jobs[-1].photo_id


def count_due(engine: Engine, root_id: int | None = None, under: str = "") -> int:
    with read_session(engine) as session:
        query = select(func.count()).select_from(Photo).where(
            library.due_filter(library.utcnow()))
        if root_id is not None:
            query = query.where(Photo.root_id == root_id)
            if under:
                query = query.where(Photo.relpath.startswith(under + "/", autoescape=True))
        return session.scalar(query) or 0


@dataclass
class _Pending:
    """Outcomes waiting for the next write transaction."""

    results: list[tuple[Job, FileFacts, ImageResult]] = field(default_factory=list)
    errors: list[tuple[Job, str]] = field(default_factory=list)
    moves: list[tuple[Job, FileFacts, int]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.results) + len(self.errors) + len(self.moves)


MAX_INTERRUPTED = 3  # attempts in a row that never ended, after which a photo is given up on
# Attempts started before this process did and still open were cut short (phototag died); the
# ones started since may be another process's, still running.
STARTED = library.utcnow()


def tag_jobs(engine: Engine, tagger: TaggerLike, jobs: Iterable[Job], *, retry_after: float = 600.0,
             summary: Summary | None = None, warn: Warn = log.warning,
             advance: Callable[[int], None] | None = None, facts_threads: int = 2) -> Summary:
    """Tag ``jobs`` (see the module docstring). ``advance(n)`` reports n more photos handled.

    Commits after every batch; an exception or interrupt loses at most the uncommitted batch,
    whose photos simply stay pending. Each photo's attempt is counted before the photo is read
    (``library.start_attempt``). A photo found with an attempt that never ended (phototag died
    while tagging it, maybe because of it: a crash in an image library, an out-of-memory kill)
    is tagged on its own, and recorded as failed, not to be retried until it changes, once
    MAX_INTERRUPTED attempts in a row never ended: one such photo costs a few restarts, never
    the queue behind it.
    """
    summary = summary if summary is not None else Summary()
    started = time.monotonic()
    claims: dict[int, datetime] = {}  # attempts started here whose outcome is not stored yet
    jobs = iter(jobs)
    held: list[Job] = []
    try:
        while True:
            _tag_stream(engine, tagger, _start_attempts(engine, jobs, claims, held, advance),
                        claims, retry_after, summary, warn, advance, facts_threads)
            if not held:
                break
            job = held.pop()
            if _closed_interrupted(engine, job, summary, warn):
                if advance:
                    advance(1)
            else:  # alone, so that if it stops phototag again no other photo is held up
                _tag_stream(engine, tagger,
                            _start_attempts(engine, iter([job]), claims, None, advance),
                            claims, retry_after, summary, warn, advance, facts_threads)
    finally:
        if claims:  # stopped (or failed) with photos in flight: those attempts do not count
            with write_session(engine) as session:
                library.abandon_attempts(session, claims.items())
        summary.seconds += time.monotonic() - started
    return summary


def _start_attempts(engine: Engine, jobs: Iterator[Job], claims: dict[int, datetime],
                    held: list[Job] | None,
                    advance: Callable[[int], None] | None) -> Iterator[Job]:
    """Start each job's attempt (one short write transaction) and pass the job on. With ``held``:
    stop at the first job whose earlier attempt never ended, and leave it there."""
    for job in jobs:
        if held is not None and job.attempt_started_at is not None and (
                job.attempt_started_at < STARTED):
            held.append(job)
            return
        now = library.utcnow()
        with write_session(engine) as session:
            if not library.start_attempt(session, job, now):
                if advance:  # changed or gone since it was read: its next turn will see
                    advance(1)
                continue
        claims[job.photo_id] = now
        yield job


def _closed_interrupted(engine: Engine, job: Job, summary: Summary, warn: Warn) -> bool:
    """Count the job's attempt that never ended; True if that settles the job: it was done
    meanwhile, or this was its MAX_INTERRUPTED-th in a row and it is given up on."""
    with write_session(engine) as session:
        interruptions = library.close_interrupted(session, job)
        if interruptions is None:
            return True
        if interruptions < MAX_INTERRUPTED:
            return False
        reason = (f"phototag stopped while tagging it {interruptions} times in a row (a crash? "
                  "out of memory?); not tried again until the file changes or "
                  "`phototag retag --errors`")
        library.give_up(session, job, reason)
    summary.failed += 1
    warn(f"{job.path}: {reason}")
    return True


def _tag_stream(engine: Engine, tagger: TaggerLike, jobs: Iterable[Job],
                claims: dict[int, datetime], retry_after: float, summary: Summary, warn: Warn,
                advance: Callable[[int], None] | None, facts_threads: int) -> None:
    """Hash, tag and store ``jobs`` as one stream through the model, a batch per commit."""
    batch_size = max(1, tagger.batch_size)
    waiting = _Pending()
    in_model: deque[tuple[Job, FileFacts]] = deque()

    def flush() -> None:
        if waiting:
            handled = len(waiting)
            _store(engine, tagger, waiting, claims, retry_after, summary, warn)
            waiting.results.clear()
            waiting.errors.clear()
            waiting.moves.clear()
            if advance:
                advance(handled)

    def for_the_model() -> Iterator[Path]:
        # Runs on this thread, inside tag_files' loop, which reads it ahead of inference.
        for job, facts in _with_facts(jobs, facts_threads):
            if facts.error is not None:
                waiting.errors.append((job, facts.error))
            elif (source := _moved_from(engine, job, facts)) is not None:
                waiting.moves.append((job, facts, source))
            else:
                in_model.append((job, facts))
                yield job.path
                continue
            if len(waiting.errors) + len(waiting.moves) >= batch_size:
                flush()

    for result in tagger.tag_files(for_the_model()):
        job, facts = in_model.popleft()
        assert Path(result.path) == job.path, (result.path, job.path)
        waiting.results.append((job, facts, result))
        if len(waiting.results) >= batch_size:
            flush()
    flush()


def _with_facts(jobs: Iterable[Job], threads: int) -> Iterator[tuple[Job, FileFacts]]:
    """``(job, file_facts(job.path))`` in order, hashing a window of files ahead in threads."""
    window = max(4, 4 * threads)
    with ThreadPoolExecutor(max(1, threads), thread_name_prefix="phototag-hash") as pool:
        queue: deque[tuple[Job, Future[FileFacts]]] = deque()
        try:
            for job in jobs:
                queue.append((job, pool.submit(file_facts, job.path)))
                if len(queue) >= window:
                    job, future = queue.popleft()
                    yield job, future.result()
            while queue:
                job, future = queue.popleft()
                yield job, future.result()
        finally:
            for _, future in queue:
                future.cancel()


def _moved_from(engine: Engine, job: Job, facts: FileFacts) -> int | None:
    """The id of a tagged photo with this file's content whose own file is gone, if any."""
    if facts.content_hash is None:
        return None
    with read_session(engine) as session:
        photo = library.find_moved(session, facts.content_hash, job.size,
                                   exclude_id=job.photo_id)
        return photo.id if photo is not None else None


def _store(engine: Engine, tagger: TaggerLike | None, waiting: _Pending,
           claims: dict[int, datetime], retry_after: float, summary: Summary, warn: Warn) -> None:
    """One write transaction for a batch of outcomes; warnings only once it committed. Each job
    leaves ``claims``; an attempt whose outcome could not be stored is taken back."""
    warnings: list[str] = []
    counts = Summary()
    not_stored: list[Job] = []
    with write_session(engine) as session:
        for job, facts, source_id in waiting.moves:
            if _apply_move(session, job, facts, source_id):
                counts.moved += 1
                if (job.root_id, job.relpath) in summary.new_keys:
                    counts.new -= 1
            else:
                not_stored.append(job)
        for job, facts, result in waiting.results:
            if result.error is not None:
                waiting.errors.append((job, result.error))
                continue
            stored = library.store_result(
                session, job, result.tags, model=tagger.model_name,
                mapping_version=tagger.mapping_version, width=result.width,
                height=result.height, taken_at=facts.taken_at, content_hash=facts.content_hash)
            counts.tagged += stored
            if stored:
                keyword_sync.store_keywords(session, job.photo_id, facts.keywords,
                                            sidecar_state=facts.sidecar_state)
            else:
                not_stored.append(job)
        for job, reason in waiting.errors:
            if library.store_error(session, job, reason, retry_after=retry_after):
                counts.failed += 1
                warnings.append(f"{job.path}: {reason}")
            else:
                not_stored.append(job)
        library.abandon_attempts(session, [(job.photo_id, claims[job.photo_id])
                                           for job in not_stored if job.photo_id in claims])
    for job in [job for job, _, _ in waiting.moves] + [job for job, _, _ in waiting.results] + [
            job for job, _ in waiting.errors]:
        claims.pop(job.photo_id, None)
    summary.moved += counts.moved
    summary.new += counts.new
    summary.tagged += counts.tagged
    summary.failed += counts.failed
    for line in warnings:
        warn(line)


def _apply_move(session, job: Job, facts: FileFacts, source_id: int) -> bool:
    """Move photo ``source_id`` (tags and all) to the job's path, replacing the job's new row.

    Checked again inside the write transaction: the source must still be a tagged photo with
    this content whose file is gone, and the job's row must still describe the file.
    """
    source = session.get(Photo, source_id)
    target = session.get(Photo, job.photo_id)
    if (source is None or target is None or source.status != TAGGED
            or source.content_hash != facts.content_hash
            or (target.size, target.mtime_ns) != (job.size, job.mtime_ns)
            or library.absolute_path(source.root, source.relpath).exists()):
        return False
    root = session.get(AlbumRoot, job.root_id)
    library.move_photo(session, source, root, job.relpath, size=job.size, mtime_ns=job.mtime_ns)
    # The keywords as the photo carries them where it is now (its sidecar may not have followed).
    keyword_sync.store_keywords(session, source.id, facts.keywords,
                                sidecar_state=facts.sidecar_state)
    return True


# --- the whole run -------------------------------------------------------------------------


def index_folders(engine: Engine, tagger: TaggerLike, folders: Iterable[Path], config: Config, *,
                  warn: Warn = log.warning,
                  progress: Callable[[int], Callable[[int], None]] | None = None) -> Summary:
    """``phototag index``: scan every folder, settle moved and deleted files, tag what is pending.

    ``progress(total)`` is called once with the number of photos to tag and returns the
    ``advance(n)`` callback (the command's progress bar).
    """
    summary = Summary()
    photos = photo_filter(config)
    sync_labels(engine, tagger)
    scanned = [reconcile(engine, Path(folder), photos, summary=summary, warn=warn)
               for folder in folders]
    for s in scanned:
        remove_gone(engine, s, summary=summary, warn=warn)
    total = sum(count_due(engine, s.root_id, s.under) for s in _distinct(scanned))
    advance = progress(total) if progress else None
    for s in _distinct(scanned) if total else ():
        tag_jobs(engine, tagger, due_jobs(engine, s.root_id, s.under),
                 retry_after=config.daemon.retry_after, summary=summary, warn=warn,
                 advance=advance)
    refresh_statistics(engine)
    return summary


def _distinct(scanned: list[Reconciled]) -> list[Reconciled]:
    """Drop folders inside another scanned folder of the same root: they are tagged with it."""
    def covers(outer: Reconciled, inner: Reconciled) -> bool:
        return outer.root_id == inner.root_id and (
            outer.under in ("", inner.under) or inner.under.startswith(outer.under + "/"))

    return [s for i, s in enumerate(scanned)
            if not any(covers(o, s) and (j < i or not covers(s, o))
                       for j, o in enumerate(scanned) if j != i)]
