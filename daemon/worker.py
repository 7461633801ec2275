"""The daemon's batch worker: drains the queue of pending photos kept in the database.

There is no queue in memory. A photo is ``pending`` in the database from the moment its file is
seen until its tags are committed, so a crash or ``kill -9`` at any moment loses nothing (the next
start finds it pending) and duplicates nothing (committed photos are no longer pending).

The worker starts tagging once ``batch_size`` photos are due, or once the oldest due photo has
waited ``batch_max_delay`` seconds; then it streams every due photo through ``indexer.tag_jobs``
(which commits one batch per write transaction) until none is left, and logs one line per batch.
Failed photos come back when their retry time (``store_error``'s backoff) is due.

This module imports no torch: the caller passes a tagger (``indexer.LazyTagger`` or ``Tagger``).
"""

from __future__ import annotations

import ctypes
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING

from sqlalchemy import Engine, func, select

from daemon import indexer
from storage import library
from storage.db import read_session, refresh_statistics, write_session
from storage.library import Job
from storage.models import ERROR, PENDING, AlbumRoot, Photo

if TYPE_CHECKING:
    from daemon.indexer import TaggerLike as Tagger

log = logging.getLogger(__name__)

IDLE_RECHECK = 60.0  # seconds between queue checks when nothing woke the worker
ERROR_BACKOFF = 5.0  # seconds to wait after an unexpected error (database locked too long...)


@dataclass(frozen=True)
class QueueState:
    due: int  # pending photos plus failed ones whose retry time has come
    oldest_wait: float  # seconds the longest-waiting due photo has waited
    next_retry: float | None  # seconds until the next failed photo is due again


def queue_state(engine: Engine, now: datetime | None = None) -> QueueState:
    now = now or library.utcnow()
    with read_session(engine) as session:
        pending, oldest_pending = session.execute(
            select(func.count(), func.min(Photo.indexed_at)).where(Photo.status == PENDING)).one()
        retry_due, oldest_retry = session.execute(
            select(func.count(), func.min(Photo.retry_at)).where(
                Photo.status == ERROR, Photo.retry_at.is_not(None), Photo.retry_at <= now)).one()
        next_retry = session.scalar(select(func.min(Photo.retry_at)).where(
            Photo.status == ERROR, Photo.retry_at > now))
    since = [t for t in (oldest_pending, oldest_retry) if t is not None]
    oldest_wait = max((now - min(since)).total_seconds(), 0.0) if since else 0.0
    return QueueState(
        due=pending + retry_due,
        oldest_wait=oldest_wait,
        next_retry=(next_retry - now).total_seconds() if next_retry is not None else None,
    )


class BatchWorker:
    """Tags due photos in batches until ``stop()``; ``wake()`` says new photos were queued."""

    def __init__(self, engine: Engine, tagger: Tagger, *, batch_max_delay: float = 2.0,
                 retry_after: float = 600.0,
                 after_batch: Callable[[], None] | None = None) -> None:
        """``after_batch`` runs in the worker after each committed batch (keyword writing)."""
        self.engine = engine
        self.after_batch = after_batch
        self.tagger = tagger
        self.batch_size = max(1, tagger.batch_size)
        self.batch_max_delay = batch_max_delay
        self.retry_after = retry_after
        self.heartbeat = time.monotonic()  # last sign of progress, for the systemd watchdog
        self.busy = False
        self.totals = indexer.Summary()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- control (any thread)

    def start(self) -> None:
        self._thread = threading.Thread(target=self.run, name="phototag-worker", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def stop(self, timeout: float = 20.0) -> bool:
        """Stop taking photos, commit the batch in hand, return once stopped.

        Photos not committed by then (already handed to the tagger) stay pending."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            return not self._thread.is_alive()
        return True

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # -- the loop (worker thread)

    def run(self) -> None:
        while not self._stop.is_set():
            self.heartbeat = time.monotonic()
            try:
                state = queue_state(self.engine)
                if state.due and (state.due >= self.batch_size
                                  or state.oldest_wait >= self.batch_max_delay):
                    self.drain()
                    continue
                if state.due:
                    timeout = self.batch_max_delay - state.oldest_wait
                else:
                    timeout = min(IDLE_RECHECK, state.next_retry + 0.5) if state.next_retry \
                        is not None else IDLE_RECHECK
            except Exception:
                log.exception("batch worker error; retrying in %.0f s", ERROR_BACKOFF)
                timeout = ERROR_BACKOFF
            if self._wake.wait(max(timeout, 0.05)):
                self._wake.clear()
                if not self._stop.is_set():
                    # Let a burst of arrivals gather into full batches rather than tag one by one.
                    self._stop.wait(min(0.2, self.batch_max_delay))

    def drain(self) -> indexer.Summary:
        """Tag every due photo now (including ones queued meanwhile), one log line per batch."""
        summary = indexer.Summary()
        batch = _BatchLog(summary, self._after_batch)
        self.busy = True
        try:
            indexer.tag_jobs(self.engine, self.tagger, self._jobs(), retry_after=self.retry_after,
                             summary=summary, warn=log.warning, advance=batch.done)
        except _StopRequested:
            log.info("stopping: batch committed, the photos in flight stay pending")
        finally:
            self.busy = False
            self.heartbeat = time.monotonic()
            for name in ("tagged", "failed", "moved"):
                setattr(self.totals, name, getattr(self.totals, name) + getattr(summary, name))
            release_memory()
        return summary

    def _after_batch(self) -> None:
        self.heartbeat = time.monotonic()
        if self._stop.is_set():
            # Leave tag_jobs right after this commit rather than finish the photos already being
            # decoded (a few batches' worth: seconds on a slow NAS); they stay pending.
            raise _StopRequested
        if self.after_batch is not None:
            try:
                self.after_batch()
            except Exception:
                log.exception("after-batch step failed")

    def _jobs(self) -> Iterator[Job]:
        for job in indexer.due_jobs(self.engine):
            if self._stop.is_set():
                return  # photos not handed out stay pending
            self.heartbeat = time.monotonic()
            yield job


class _StopRequested(Exception):
    pass


def release_memory() -> None:
    """Give the memory freed after a run of batches back to the system (glibc keeps it otherwise,
    and an idle daemon would hold on to its peak for hours). A no-op without glibc."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


class _BatchLog:
    """One log line per committed batch: photos, seconds, photos/s."""

    def __init__(self, summary: indexer.Summary, then: Callable[[], None]) -> None:
        self.summary = summary
        self.then = then
        self.since = time.monotonic()
        self.seen = (0, 0, 0)

    def done(self, photos: int) -> None:
        now = time.monotonic()
        seconds = max(now - self.since, 1e-6)
        counts = (self.summary.tagged, self.summary.failed, self.summary.moved)
        tagged, failed, moved = (a - b for a, b in zip(counts, self.seen))
        log.info("batch: %d photos in %.2f s (%.1f photos/s): %d tagged, %d failed, %d moved",
                 photos, seconds, photos / seconds, tagged, failed, moved)
        self.then()
        self.since, self.seen = time.monotonic(), counts


# --- re-tagging (the nightly job and `phototag retag`) -----------------------------------------


@dataclass(frozen=True)
class Selection:
    """Which photos to re-tag."""

    outdated: bool = True  # tagged by another model or label-mapping version
    errors: bool = True  # failed, without waiting for their retry time
    given_up: bool = False  # with errors: also those given up on (they brought phototag down)
    everything: bool = False

    def describe(self) -> str:
        if self.everything:
            return "all photos"
        parts = [p for p, on in (("outdated", self.outdated), ("failed", self.errors)) if on]
        return " and ".join(parts) + " photos"


class NotIndexedError(LookupError):
    """A folder to re-tag that is inside no indexed album."""


def requeue(engine: Engine, selection: Selection, *, model: str, mapping_version: str,
            folder: str | None = None) -> tuple[int, int | None, str]:
    """Mark the selected photos pending (inside ``folder`` if given); their old tags stay
    searchable until the new ones are committed. Returns (count, root id, folder inside root)."""
    root_id, under = None, ""
    with write_session(engine) as session:
        root = None
        if folder is not None:
            found = library.locate(session, folder)
            if found is None:
                root = session.scalar(select(AlbumRoot).where(
                    AlbumRoot.path == library.root_path(folder)))
                if root is None:
                    raise NotIndexedError(f"{folder}: not inside any indexed album")
            else:
                root, under = found
            root_id = root.id
        count = library.requeue(
            session,
            outdated=(model, mapping_version) if selection.outdated else None,
            errors=selection.errors, given_up=selection.given_up,
            everything=selection.everything, root=root, under=under)
    return count, root_id, under


def retag(engine: Engine, tagger: Tagger, selection: Selection, *, folder: str | None = None,
          retry_after: float = 600.0, warn: Callable[[str], None] = log.warning,
          progress: Callable[[int], Callable[[int], None]] | None = None) -> indexer.Summary:
    """``phototag retag``: requeue the selection, then tag every due photo there right away.

    ``progress(total)`` returns the progress bar's ``advance(n)``.
    """
    indexer.sync_labels(engine, tagger)
    count, root_id, under = requeue(engine, selection, model=tagger.model_name,
                                    mapping_version=tagger.mapping_version, folder=folder)
    log.info("queued %d %s for re-tagging", count, selection.describe())
    total = indexer.count_due(engine, root_id, under)
    advance = progress(total) if progress else None
    return indexer.tag_jobs(engine, tagger, indexer.due_jobs(engine, root_id, under),
                            retry_after=retry_after, warn=warn, advance=advance)


def nightly(engine: Engine, folders: list, photo_filter, *, model: str, mapping_version: str,
            rescan: bool = True, stop: threading.Event | None = None) -> tuple[indexer.Summary, int]:
    """The nightly job: rescan the album folders (new, changed, moved, deleted files), queue
    outdated and failed photos for the worker, refresh the query planner's statistics. Returns
    the rescan summary and how many were queued.
    """
    summary = indexer.Summary()
    if rescan:
        for folder in folders:
            if stop is not None and stop.is_set():
                raise InterruptedError("daemon stopping")
            scanned = indexer.reconcile(engine, folder, photo_filter, summary=summary)
            indexer.remove_gone(engine, scanned, summary=summary)
    queued, _, _ = requeue(engine, Selection(), model=model, mapping_version=mapping_version)
    refresh_statistics(engine)
    return summary, queued

