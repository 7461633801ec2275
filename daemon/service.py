"""``phototag daemon``: start-up, the threads that do the work, signals and systemd notifications.

Start-up, in order: refuse a database on a network or FUSE filesystem; back up and migrate the
database; load the model (missing weights exit 78); watch the albums; send READY=1; rescan every
album (files added, changed, moved or deleted while the daemon was stopped: the watches are in
place first, so nothing slips between scan and watch); tag what is pending; run the nightly job
on schedule, and at once if a scheduled run was missed.

Threads: the watcher's (events -> ``Change``), the change applier (one thread that writes
filesystem changes into the database in small transactions and runs rescans), the batch worker
(tags pending photos), APScheduler's (nightly job), and the main thread, which handles signals and
pings the systemd watchdog while the others are healthy.

SIGTERM / SIGINT: stop watching, let the worker finish the batch in hand (photos not committed stay
pending), exit 0 within seconds. A second signal exits at once. SIGHUP reloads the configuration.
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

from sqlalchemy import Engine

from daemon import indexer, keyword_sync
from daemon.config import AlbumConfig, Config, ConfigError, load_config
from daemon.notify import Notifier, watchdog_interval
from daemon.scheduler import (
    META_LAST_NIGHTLY,
    NightlyScheduler,
    ScheduleError,
    format_last_run,
    parse_last_run,
    parse_schedule,
)
from daemon.watcher import AlbumWatcher, Change, is_network_fs, mount_fstype
from daemon.worker import BatchWorker, nightly
from storage import library
from storage.db import DatabaseError, read_session, sqlite_path, write_session
from storage.keywords import is_sidecar_name, photos_of_sidecar
from storage.models import TAGGED

log = logging.getLogger("phototag.daemon")

EX_OK = 0
EX_FAILURE = 1
EX_CONFIG = 78
EX_SIGNAL_TWICE = 130

APPLY_CHUNK = 500  # watcher changes per write transaction
HEALTH_CHECK = 30.0  # main loop wake-up without a watchdog
PREPARE_DEADLINE = 30 * 60.0  # longest model preparation on reload the watchdog is kept quiet for


class StoppedWhilePreparing(BaseException):
    """A stop signal arrived while the model was being prepared (raised by the signal handler;
    a BaseException so that no ``except Exception`` on the way keeps the daemon from stopping)."""


class StartupError(Exception):
    """The daemon cannot start; ``code`` is the exit status (78 = configuration)."""

    def __init__(self, message: str, code: int = EX_FAILURE) -> None:
        super().__init__(message)
        self.code = code


# --------------------------------------------------------------------------------------------------
# Checks


def check_database_location(db_url: str) -> None:
    """Refuse an SQLite database on a network or FUSE filesystem (unreliable locking, corruption)."""
    path = sqlite_path(db_url)
    if path is None:
        return  # a server database, or in-memory
    folder = path.absolute().parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    fstype = mount_fstype(folder)
    if is_network_fs(fstype):
        raise StartupError(
            f"database {path} is on a {fstype} filesystem: SQLite's locking is not reliable there "
            "and the database could be corrupted; keep it on a local disk (the default is the "
            "service's state directory, /var/lib/phototag)", EX_CONFIG)


def album_configs(config: Config, cli_albums: Sequence[Path]) -> list[AlbumConfig]:
    """``--album`` paths if given, else the config's albums; paths resolved (symlinks too)."""
    albums = [AlbumConfig(path=Path(p)) for p in cli_albums] if cli_albums else list(config.albums)
    if not albums:
        where = config.source or "the config file"
        raise StartupError(f"no albums to watch: add [[album]] entries to {where} or pass "
                           "--album PATH", EX_CONFIG)
    resolved = [replace(a, path=Path(library.root_path(a.path))) for a in albums]
    # An album inside another is watched and scanned with it (watching it twice would double
    # every event and its inotify watches).
    kept = []
    for album in resolved:
        outer = next((o for o in resolved if o is not album and album.path.is_relative_to(o.path)
                      and (o.path != album.path or resolved.index(o) < resolved.index(album))),
                     None)
        if outer is not None:
            log.info("album %s is inside album %s: watched as part of it", album.path, outer.path)
        else:
            kept.append(album)
    return kept


# --------------------------------------------------------------------------------------------------
# Applying watcher changes to the database


def _sidecars(change: Change) -> list[Path]:
    """The XMP sidecars a file change is about (watched so that keyword edits are picked up)."""
    if change.kind not in ("ready", "moved", "deleted"):
        return []
    return [path for path in (change.path, change.dest)
            if path is not None and is_sidecar_name(path.name)]


class ChangeApplier:
    """One thread that writes watcher changes into the database and runs rescans.

    Changes are applied in order, up to ``APPLY_CHUNK`` per write transaction; ``on_queued`` is
    called after a commit that made photos pending (it wakes the worker).
    """

    def __init__(self, engine: Engine, on_queued: Callable[[], None]) -> None:
        self.engine = engine
        self.on_queued = on_queued
        self.photo_filter: indexer.PhotoFilter | None = None
        self._queue: queue.Queue[Change | None] = queue.Queue()
        self._rescans_queued: set[Path] = set()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.scans_done = threading.Event()  # set whenever no rescan is queued or running
        self.scans_done.set()
        self._stopping = threading.Event()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="phototag-apply", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def submit(self, change: Change) -> None:
        """Called by the watcher's threads."""
        if change.kind == "rescan":
            with self._lock:
                if change.root in self._rescans_queued:
                    return
                self._rescans_queued.add(change.root)
                self.scans_done.clear()
        self._queue.put(change)

    def rescan(self, root: Path, reason: str) -> None:
        self.submit(Change("rescan", root, root, reason=reason))

    def stop(self, timeout: float = 10.0) -> None:
        """Apply what is queued (rescans are dropped: the next start rescans anyway), then stop."""
        self._stopping.set()
        self._queue.put(None)
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            change = self._queue.get()
            if change is None:
                return
            if change.kind == "rescan":
                self._rescan(change)
                continue
            chunk = [change]
            end = False
            while len(chunk) < APPLY_CHUNK:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    end = True
                    break
                if more.kind == "rescan":
                    self._queue.put(more)  # after this chunk (order among rescans is irrelevant)
                    break
                chunk.append(more)
            self._apply_chunk(chunk)
            if end:
                return

    def _apply_chunk(self, chunk: list[Change]) -> None:
        try:
            queued = False
            # Files are read before the write transaction, not while it holds the lock.
            sidecar_keywords = self._read_sidecar_keywords(chunk)
            with write_session(self.engine) as session:
                for path, (keywords, state) in sidecar_keywords.items():
                    self._store_sidecar_keywords(session, path, keywords, state)
                for change in chunk:
                    if not _sidecars(change):
                        queued |= self._apply(session, change)
            if queued:
                self.on_queued()
        except Exception:
            log.exception("could not record %d file changes; rescanning their albums",
                          len(chunk))
            time.sleep(5)
            for root in {c.root for c in chunk}:
                self.rescan(root, "recording changes failed")

    def _apply(self, session, change: Change) -> bool:
        """Apply one change inside the open transaction; True if a photo became pending."""
        if change.kind == "ready":
            return self._seen(session, change.path)
        if change.kind == "moved":
            assert change.dest is not None
            source = library.locate(session, change.path)
            photo = library.photo_at(session, *source) if source else None
            target = library.locate(session, change.dest)
            if photo is None or target is None:
                return self._seen(session, change.dest)  # not indexed yet: a new file
            library.move_photo(session, photo, *target)
            log.debug("moved %s -> %s", change.path, change.dest)
            return self._seen(session, change.dest)  # re-queued only if its content changed
        if change.kind == "deleted":
            found = library.locate(session, change.path)
            photo = library.photo_at(session, *found) if found else None
            if photo is not None:
                library.remove_photos(session, [photo.id])
                log.debug("removed %s", change.path)
            return False
        if change.kind == "dir_deleted":
            found = library.locate(session, change.path)
            if found is not None:
                root, under = found
                removed = library.remove_missing(session, root, (), under=under)
                if removed:
                    log.info("removed %d photos of deleted folder %s", len(removed), change.path)
            return False
        raise ValueError(f"unknown change {change.kind!r}")

    def _read_sidecar_keywords(self, chunk: list[Change]) -> dict[Path, tuple[list[str], str | None]]:
        """The photos of the sidecars written, replaced or deleted in ``chunk`` (by the user's
        photo manager, or by us), the keywords their files carry now and their sidecars' state."""
        if self.photo_filter is None:
            return {}
        found: dict[Path, tuple[list[str], str | None]] = {}
        for change in chunk:
            for sidecar in _sidecars(change):
                for path in photos_of_sidecar(sidecar, self.photo_filter.extensions):
                    if path not in found:
                        found[path] = keyword_sync.read_photo_keywords(path)
        return found

    def _store_sidecar_keywords(self, session, path: Path, keywords: list[str],
                                state: str | None) -> None:
        """A tagged photo's keywords, read again after its sidecar changed. (A photo not tagged
        yet gets them when it is tagged.)"""
        found = library.locate(session, path)
        photo = library.photo_at(session, *found) if found else None
        if photo is not None and photo.status == TAGGED:
            names = keyword_sync.store_keywords(session, photo.id, keywords, sidecar_state=state)
            log.debug("keywords of %s from its sidecar: %s", path, ", ".join(names))

    def _seen(self, session, path: Path) -> bool:
        try:
            st = os.stat(path)
        except OSError:
            return False  # gone again already
        found = library.locate(session, path)
        if found is None:
            return False
        root, relpath = found
        _, what = library.upsert_seen_file(session, root, relpath, st.st_size, st.st_mtime_ns)
        if what is not library.Change.UNCHANGED:
            log.debug("queued %s (%s)", path, what.value)
        return what is not library.Change.UNCHANGED

    def _rescan(self, change: Change) -> None:
        with self._lock:
            self._rescans_queued.discard(change.root)
        try:
            if self._stopping.is_set() or self.photo_filter is None:
                return
            started = time.monotonic()
            summary = indexer.Summary()
            scanned = indexer.reconcile(self.engine, change.root, self.photo_filter, summary=summary)
            indexer.remove_gone(self.engine, scanned, summary=summary)
            if summary.new or summary.changed:
                self.on_queued()
            log.info("rescanned %s (%s) in %.1f s: %d new, %d changed, %d removed, %d unchanged"
                     "%s", change.root, change.reason, time.monotonic() - started, summary.new,
                     summary.changed, summary.removed, summary.unchanged,
                     f", {summary.keywords_read} with changed sidecars read again"
                     if summary.keywords_read else "")
        except Exception:
            log.exception("rescan of %s failed", change.root)
        finally:
            with self._lock:
                if not self._rescans_queued:
                    self.scans_done.set()


# --------------------------------------------------------------------------------------------------
# The daemon


@dataclass
class Options:
    """What the command line adds to the config."""

    config_path: str | None
    db_url: str
    albums: Sequence[Path] = ()
    model: str | None = None


class Daemon:
    def __init__(self, config: Config, options: Options) -> None:
        self.config = config
        self.options = options
        self.notifier = Notifier()
        self.engine: Engine | None = None
        self.tagger = None
        self.albums: list[AlbumConfig] = []
        self.worker: BatchWorker | None = None
        self.applier: ChangeApplier | None = None
        self.watcher: AlbumWatcher | None = None
        self.scheduler: NightlyScheduler | None = None
        self._wake = threading.Event()
        self._stop_requested: str | bool = False
        self._reload_requested = False
        self._stopping = threading.Event()
        self._preparing = False  # a stop signal interrupts the model preparation (_stoppable)

    # -- entry point

    def run(self) -> int:
        try:
            self.start()
        except StoppedWhilePreparing:
            log.info("%s received while loading the model: stopping", self._stop_requested)
            self._shutdown()
            return EX_OK
        except StartupError as e:
            log.error("%s", e)
            self._shutdown()
            return e.code
        except DatabaseError as e:
            from storage.migrate import DatabaseCorrupt, DatabaseTooNew

            log.error("%s", e)
            self._shutdown()
            # Restarting cannot fix a database this phototag does not understand.
            return EX_CONFIG if isinstance(e, (DatabaseTooNew, DatabaseCorrupt)) else EX_FAILURE
        try:
            code = self.loop()
        except StoppedWhilePreparing:  # during a reload's model preparation
            log.info("%s received while loading the model: stopping", self._stop_requested)
            code = EX_OK
        self._shutdown()
        return code

    def start(self) -> None:
        from storage.migrate import open_for_write

        self.albums = album_configs(self.config, self.options.albums)
        check_database_location(self.options.db_url)
        self._install_signal_handlers()
        self.notifier.status("upgrading database")
        self.engine = open_for_write(self.options.db_url, backup=True)
        self.notifier.status("loading the model")
        self.tagger = self._load_tagger(self.config, self.albums)
        indexer.sync_labels(self.engine, self.tagger)
        with write_session(self.engine) as session:
            for album in self.albums:
                library.ensure_root(session, album.path)

        self.worker = self._new_worker(self.tagger)
        self.applier = ChangeApplier(self.engine, self._wake_worker)
        self.applier.photo_filter = indexer.photo_filter(self.config)
        self.applier.start()
        self._start_watcher()
        for album in self.albums:
            self.applier.rescan(album.path, "start-up")
        self.worker.start()
        self._start_scheduler()
        modes = ", ".join(f"{r.path} ({r.mode})" for r in self.watcher.watched)
        log.info("phototag daemon ready: model %s, mapping %s; watching %s", self.tagger.model_name,
                 self.tagger.mapping_version, modes)
        self.notifier.ready(f"watching {len(self.albums)} album(s)")

    def loop(self) -> int:
        interval = watchdog_interval(self.config.daemon.watchdog_seconds)
        if interval:
            self.notifier.watchdog()
        while True:
            self._wake.wait(interval or HEALTH_CHECK)
            self._wake.clear()
            if self._stop_requested:
                log.info("%s received: stopping", self._stop_requested)
                return EX_OK
            if self._reload_requested:
                self._reload_requested = False
                self.reload()
                if self._stop_requested:  # arrived during the reload, too late to interrupt it
                    log.info("%s received: stopping", self._stop_requested)
                    return EX_OK
            assert self.worker is not None and self.applier is not None
            if not self.worker.alive or not self.applier.alive:
                log.error("a worker thread died; exiting so that the service is restarted")
                return EX_FAILURE
            if interval:
                self._ping_watchdog_unless_stalled()

    def _worker_stalled_for(self) -> float | None:
        """Seconds the worker has been stuck in a batch, if longer than ``stall_seconds``."""
        assert self.worker is not None
        stalled_for = time.monotonic() - self.worker.heartbeat
        if self.worker.busy and stalled_for > self.config.daemon.stall_seconds:
            return stalled_for
        return None

    def _ping_watchdog_unless_stalled(self) -> None:
        stalled_for = self._worker_stalled_for()
        if stalled_for is not None:
            log.error("the batch worker made no progress for %.0f s; not pinging the watchdog",
                      stalled_for)
        else:
            self.notifier.watchdog()

    @contextmanager
    def _watchdog_pinged(self) -> Iterator[None]:
        """Keeps pinging the watchdog while the main loop prepares a model on reload (minutes on a
        NAS for int8), at most PREPARE_DEADLINE: a preparation hung longer (a photo on a dead
        share, a deadlock) is left to the watchdog to kill, as a hang anywhere else would be."""
        interval = watchdog_interval(self.config.daemon.watchdog_seconds)
        if not interval:
            yield
            return
        done = threading.Event()
        deadline = time.monotonic() + PREPARE_DEADLINE

        def ping() -> None:
            while True:
                if time.monotonic() > deadline:
                    log.error("loading the model takes over %.0f min; no more watchdog pings",
                              PREPARE_DEADLINE / 60)
                    return
                if self.applier is not None and not self.applier.alive:
                    log.error("the change applier died; no more watchdog pings")
                    return
                self.notifier.watchdog()
                if done.wait(interval):
                    return

        pinger = threading.Thread(target=ping, name="watchdog-pinger", daemon=True)
        pinger.start()
        try:
            yield
        finally:
            done.set()
            pinger.join()

    @contextmanager
    def _stoppable(self) -> Iterator[None]:
        """A stop signal raises StoppedWhilePreparing in here (the main thread), so that a model
        preparation of minutes is abandoned at once, its temporary files removed on the way out,
        instead of outlasting systemd's stop timeout and leaving them behind after a SIGKILL."""
        self._preparing = True
        try:
            if self._stop_requested:
                raise StoppedWhilePreparing
            yield
        finally:
            self._preparing = False

    def _new_worker(self, tagger) -> BatchWorker:
        assert self.engine is not None
        return BatchWorker(self.engine, tagger, batch_max_delay=self.config.daemon.batch_max_delay,
                           retry_after=self.config.daemon.retry_after,
                           after_batch=self._write_keywords)

    def _wake_worker(self) -> None:
        if self.worker is not None:
            self.worker.wake()

    # -- parts

    def _load_tagger(self, config: Config, albums: Sequence[AlbumConfig]) -> indexer.LazyTagger:
        """The configured model, loaded now: bad weights or labels fail the start (exit 78)
        rather than every batch later. int8 / "auto" without a prepared model are prepared on a
        sample of the library's photos (once; then cached)."""
        from tagger.backbones import ModelError
        from tagger.labels import LabelMapError

        assert self.engine is not None
        sample = indexer.calibration_sample(self.engine, [a.path for a in albums],
                                            indexer.photo_filter(config))
        try:
            tagger = indexer.LazyTagger(config, self.options.model)
            with self._stoppable():
                tagger.load(calibration=sample)
        except (ModelError, LabelMapError) as e:
            raise StartupError(str(e), EX_CONFIG) from None
        return tagger

    def _write_keywords(self) -> None:
        """After each batch: the new tags into the photos' sidecars / XMP, if [metadata] says so.

        Its own writes do not trigger a re-tag: keyword_sync records the file's new size and keeps
        its mtime, so the change the watcher reports is seen as unchanged."""
        if self.config.metadata.write == "off":
            return
        from daemon import keyword_sync

        assert self.engine is not None
        # The mapping's broader-tag order, as `phototag write-tags` uses: both write the same paths.
        broader = keyword_sync.broader_order(self.tagger.labels.all_tags())
        summary = keyword_sync.write_due(self.engine, self.config.metadata, broader=broader,
                                         warn=log.warning)
        if summary.written or summary.failed:
            log.info("keywords (%s): %s", self.config.metadata.write, summary.line())

    def _start_watcher(self) -> None:
        assert self.applier is not None
        self.watcher = AlbumWatcher(self.albums, indexer.photo_filter(self.config), self.applier.submit,
                                    stable_seconds=self.config.daemon.stable_seconds)
        self.watcher.start()

    def _start_scheduler(self) -> None:
        try:
            self.scheduler = NightlyScheduler(self.config.daemon.nightly, self._nightly_job,
                                              load_last_run=self._load_last_run,
                                              save_last_run=self._save_last_run)
        except ScheduleError as e:
            raise StartupError(f"{self.config.source or 'config'}: daemon.nightly: {e}",
                               EX_CONFIG) from None
        self.scheduler.start()

    def _load_last_run(self):
        assert self.engine is not None
        with read_session(self.engine) as session:
            return parse_last_run(library.get_meta(session, META_LAST_NIGHTLY))

    def _save_last_run(self, moment) -> None:
        assert self.engine is not None
        with write_session(self.engine) as session:
            library.set_meta(session, META_LAST_NIGHTLY, format_last_run(moment))

    def _nightly_job(self, catch_up: bool) -> None:
        """Rescan every album, then queue outdated and failed photos for the worker.

        A catch-up at start-up waits for the start-up rescan and does not repeat it."""
        assert self.engine is not None and self.applier is not None and self.worker is not None
        started = time.monotonic()
        if catch_up:
            while not self.applier.scans_done.wait(1.0):
                if self._stopping.is_set():
                    raise InterruptedError("daemon stopping")
        summary, queued = nightly(
            self.engine, [a.path for a in self.albums], indexer.photo_filter(self.config),
            model=self.tagger.model_name, mapping_version=self.tagger.mapping_version,
            rescan=not catch_up, stop=self._stopping)
        if self._stopping.is_set():
            raise InterruptedError("daemon stopping")
        log.info("nightly job done in %.1f s: %s%d photos queued for re-tagging",
                 time.monotonic() - started,
                 "" if catch_up else f"rescan found {summary.new} new, {summary.changed} changed, "
                 f"{summary.removed} removed; ", queued)
        self.worker.wake()

    # -- signals and reload

    def _install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, self._on_stop_signal)
        signal.signal(signal.SIGINT, self._on_stop_signal)
        signal.signal(signal.SIGHUP, self._on_reload_signal)

    def _on_stop_signal(self, signum, _frame) -> None:
        # No logging in here: the handler may interrupt the main thread inside a logging call.
        if self._stop_requested:
            os.write(2, f"phototag: second {signal.Signals(signum).name}: exiting now\n".encode())
            os._exit(EX_SIGNAL_TWICE)
        self._stop_requested = signal.Signals(signum).name
        self._stopping.set()
        self._wake.set()
        if self._preparing:
            raise StoppedWhilePreparing

    def _on_reload_signal(self, _signum, _frame) -> None:
        self._reload_requested = True
        self._wake.set()

    def reload(self) -> None:
        """SIGHUP: read the config again; albums, excludes, timings, schedule and model follow.

        An unusable new config is logged and the running one kept. The database stays the same.
        """
        self.notifier.send(f"RELOADING=1\nMONOTONIC_USEC={time.monotonic_ns() // 1000}")
        try:
            self._reload()
        except (ConfigError, StartupError, ScheduleError) as e:
            log.error("configuration not reloaded, keeping the running one: %s", e)
        except Exception:
            log.exception("configuration reload failed; keeping the running one")
        self.notifier.ready(f"watching {len(self.albums)} album(s)")

    def _reload(self) -> None:
        assert self.worker and self.applier and self.watcher and self.scheduler and self.engine
        new = load_config(self.options.config_path)
        albums = album_configs(new, self.options.albums)
        old = self.config
        if new.daemon.nightly != old.daemon.nightly:
            parse_schedule(new.daemon.nightly)  # a bad one fails the reload before anything changes
        tagger = None
        if new.model != old.model or new.labels != old.labels:
            tagger = self._prepare_tagger(new, albums)  # tagging is paused from here on
        try:
            if new.daemon.nightly != old.daemon.nightly:
                self.scheduler.reschedule(new.daemon.nightly)
            if new.database != old.database:
                log.warning("the database setting changed: restart the daemon to use it")
            # Commit to the new config from here on.
            self.config = new
            self.albums = albums
            if tagger is not None:
                indexer.sync_labels(self.engine, tagger)
                self.tagger = tagger
        finally:
            if tagger is not None and not self._stop_requested:
                self._restart_worker(self.tagger)  # the new model if committed, else the old
        self.worker.batch_max_delay = new.daemon.batch_max_delay
        self.worker.retry_after = new.daemon.retry_after
        with write_session(self.engine) as session:
            for album in albums:
                library.ensure_root(session, album.path)
        self.watcher.stop()
        self.applier.photo_filter = indexer.photo_filter(new)
        self._start_watcher()
        for album in albums:
            self.applier.rescan(album.path, "configuration reloaded")
        log.info("configuration reloaded from %s", new.source or "defaults")

    def _prepare_tagger(self, config: Config, albums: Sequence[AlbumConfig]) -> indexer.LazyTagger:
        """The model of new settings, prepared while the worker is stopped: the preparation gets
        the CPU (and "auto" times the precisions on an idle machine); photos queued meanwhile
        wait in the database. The worker is restarted with the old model if this fails."""
        log.info("model settings changed: loading the model again; tagging pauses")
        self._stop_worker()
        try:
            with self._watchdog_pinged():
                return self._load_tagger(config, albums)
        except BaseException:
            if not self._stop_requested:
                self._restart_worker(self.tagger)
            raise

    def _stop_worker(self) -> None:
        """Stops the worker after the batch in hand, pinging the watchdog meanwhile unless the
        worker stalls; a stuck worker leaves the new settings to the restart that follows."""
        assert self.worker is not None
        interval = watchdog_interval(self.config.daemon.watchdog_seconds)
        while not self.worker.stop(timeout=1.0):
            if self._stop_requested:
                raise StoppedWhilePreparing
            if self._worker_stalled_for() is not None:
                # The main loop's stall check stops the watchdog pings: systemd restarts us.
                raise StartupError("the batch worker did not stop; the new model settings "
                                   "apply when the daemon is restarted")
            if interval:
                self.notifier.watchdog()

    def _restart_worker(self, tagger) -> None:
        totals = self.worker.totals
        self.worker = self._new_worker(tagger)
        self.worker.totals = totals
        self.worker.start()

    # -- stop

    def _shutdown(self) -> None:
        self._stopping.set()
        self.notifier.stopping()
        started = time.monotonic()
        if self.scheduler is not None:
            self.scheduler.shutdown(wait=False)
        if self.watcher is not None:
            self.watcher.stop()
        if self.worker is not None and not self.worker.stop(timeout=20.0):
            log.warning("the batch in hand did not finish in time; its photos stay pending")
        if self.applier is not None:
            self.applier.stop()
        if self.worker is not None:
            t = self.worker.totals
            log.info("stopped in %.1f s; this run tagged %d photos (%d failed, %d moved)",
                     time.monotonic() - started, t.tagged, t.failed, t.moved)
        if self.engine is not None:
            self.engine.dispose()
        self.notifier.close()


def run_daemon(config: Config, options: Options) -> int:
    """Run until SIGTERM/SIGINT; returns the exit status."""
    code = Daemon(config, options).run()
    # A nightly rescan still walking a large album would hold up the interpreter's exit (it joins
    # the scheduler's threads); everything that matters is committed by now.
    busy = [t for t in threading.enumerate()
            if t is not threading.main_thread() and not t.daemon and t.is_alive()]
    if busy:
        log.info("not waiting for %s", ", ".join(t.name for t in busy))
        logging.shutdown()
        os._exit(code)
    return code
