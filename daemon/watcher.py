"""Watch the album roots and report photos that are completely written, moved or deleted.

The watcher knows nothing of the database: it turns watchdog events into ``Change`` records and
hands them to a callback. What it guarantees:

- ``ready`` only for a file that is completely written: after an inotify write it waits for the
  close-write event, and in every case for size and mtime to stay put for ``stable_seconds``. Temp
  files of copy and sync tools never qualify (hidden names, ``*.part``, ``*.tmp``... are excluded or
  not photo extensions); the final rename of one reports the photo ``ready`` at once.
- ``moved`` when a photo is renamed or moved inside its root, so that it keeps its tags.
- ``deleted`` / ``dir_deleted`` only while the root is present (see ``probe_root``) and only when
  the path really is gone, so an unmounted share is never read as "every photo was deleted".
- ``rescan`` when events may have been lost (inotify queue overflow) or a root came back.

Exclusion is matched on each path component relative to the root (``@eaDir``, ``.*``...), not with
watchdog's pattern handler, whose patterns match absolute paths and would need ``**/`` prefixes.

Watch modes per root: inotify (default), or polling where the config asks for it, where the root is
on a network filesystem (inotify sees no changes made by other machines) or where there are not
enough inotify watches for its directories (watchdog would silently watch part of the tree).
"""

from __future__ import annotations

import errno
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from watchdog.events import (
    DirDeletedEvent,
    FileAttribEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers.api import DEFAULT_OBSERVER_TIMEOUT, BaseObserver, ObservedWatch
from watchdog.observers.inotify import InotifyEmitter
from watchdog.observers.inotify_c import InotifyEvent, InotifyFD
from watchdog.observers.polling import PollingObserver

from daemon.filenames import storable_name
from daemon.scan import PhotoFilter

log = logging.getLogger(__name__)

ChangeKind = Literal["ready", "moved", "deleted", "dir_deleted", "rescan"]

# Filesystems whose changes made elsewhere produce no inotify events, and on which SQLite's locking
# is unreliable (the database must never live there).
NETWORK_FS_TYPES = {
    "nfs", "nfs4", "cifs", "smb", "smb3", "smbfs", "ncpfs", "9p", "afs", "ceph", "glusterfs",
    "lustre", "gpfs", "beegfs", "davfs", "sshfs", "fuse", "fuseblk",
}

# A writer that keeps a file open without writing for this long is taken to be done (a lost
# close event must not hold a photo back for ever).
CLOSE_WAIT_LIMIT = 600.0
ROOT_CHECK_INTERVAL = 10.0
MIN_TICK = 0.1  # seconds between stability checks at most


@dataclass(frozen=True)
class Change:
    kind: ChangeKind
    root: Path
    path: Path  # absolute; for "moved" the source
    dest: Path | None = None  # for "moved"
    reason: str = ""  # for "rescan"


# --------------------------------------------------------------------------------------------------
# Which paths count (daemon.scan.PhotoFilter decides, as for the scans)


def _relpath(root: Path, path: Path) -> str | None:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return None  # outside the root


def is_watched(photo_filter: PhotoFilter, root: Path, path: Path) -> bool:
    """A photo, or an XMP sidecar (reported like a photo; the receiver tells them apart)."""
    relpath = _relpath(root, path)
    return relpath is not None and (photo_filter.wanted(relpath)
                                    or photo_filter.wanted_sidecar(relpath))


def is_excluded(photo_filter: PhotoFilter, root: Path, path: Path) -> bool:
    """Outside the root, in an excluded folder, or named so that nothing in it is indexed."""
    relpath = _relpath(root, path)
    if relpath is None or not storable_name(relpath):
        return True
    return relpath != "." and any(photo_filter.excluded_name(part) for part in relpath.split("/"))


# --------------------------------------------------------------------------------------------------
# Mounts, root presence and inotify limits


def _unescape_mountinfo(field_: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo octal.
    out, i = [], 0
    while i < len(field_):
        if field_[i] == "\\" and len(field_) >= i + 4 and field_[i + 1 : i + 4].isdigit():
            out.append(chr(int(field_[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field_[i])
            i += 1
    return "".join(out)


def mount_fstype(path: str | os.PathLike, mountinfo: str | None = None) -> str | None:
    """The filesystem type of the mount holding ``path`` (from /proc/self/mountinfo), or None."""
    if mountinfo is None:
        try:
            mountinfo = Path("/proc/self/mountinfo").read_text()
        except OSError:
            return None
    target = os.path.realpath(path)
    best: tuple[int, str] | None = None
    for line in mountinfo.splitlines():
        left, sep, right = line.partition(" - ")
        fields = left.split()
        if not sep or len(fields) < 5 or not right.split():
            continue
        mount_point = _unescape_mountinfo(fields[4])
        prefix = mount_point.rstrip("/") + "/"
        if target == mount_point or target.startswith(prefix) or mount_point == "/":
            # The longest mount point wins; among equals the later (over-mounting) one.
            if best is None or len(mount_point) >= best[0]:
                best = (len(mount_point), right.split()[0])
    return best[1] if best else None


def is_network_fs(fstype: str | None) -> bool:
    if not fstype:
        return False
    return fstype in NETWORK_FS_TYPES or fstype.startswith(("fuse.", "nfs", "smb"))


def probe_root(path: Path, device: int | None = None) -> int | None:
    """The root's device number if it is present, else None.

    With ``device`` (the root's device when it was last seen present) present means: it exists, is
    a directory and is still on that device. Without it (at start-up, or when the root was absent)
    it must also hold at least one entry. A share that dropped leaves either no directory or an
    empty mount point on the parent filesystem (another device), never a present root.
    """
    try:
        st = os.stat(path)
        if not os.path.isdir(path):
            return None
        if device is not None:
            return st.st_dev if st.st_dev == device else None
        with os.scandir(path) as it:
            if next(it, None) is None:
                return None
    except OSError:
        return None
    return st.st_dev


def count_directories(root: Path) -> int:
    """Directories below and including ``root``: what a recursive inotify watch needs."""
    count = 1
    for _dirpath, dirnames, _files in os.walk(root, onerror=lambda e: None):
        count += len(dirnames)  # os.walk does not follow symlinks: neither does watchdog
    return count


def max_user_watches() -> int | None:
    try:
        return int(Path("/proc/sys/fs/inotify/max_user_watches").read_text())
    except (OSError, ValueError):
        return None


def count_inotify_watches() -> int:
    """inotify watches this process holds, read from /proc/self/fdinfo."""
    total = 0
    try:
        fds = os.listdir("/proc/self/fd")
    except OSError:
        return 0
    for fd in fds:
        try:
            if os.readlink(f"/proc/self/fd/{fd}") != "anon_inode:inotify":
                continue
            with open(f"/proc/self/fdinfo/{fd}") as f:
                total += sum(1 for line in f if line.startswith("inotify wd:"))
        except OSError:
            continue
    return total


# --------------------------------------------------------------------------------------------------
# An inotify observer that tells us about queue overflows


class _OverflowAwareInotifyFD(InotifyFD):
    def __init__(self, on_overflow: Callable[[], None]) -> None:
        super().__init__()
        self._on_overflow = on_overflow

    def handle_event(self, event: InotifyEvent) -> None:
        super().handle_event(event)  # watchdog only logs a warning and rebuilds its watches
        if event.is_queue_overflow:
            self._on_overflow()


class OverflowAwareInotifyObserver(BaseObserver):
    """watchdog's InotifyObserver, plus a callback when the kernel's event queue overflowed."""

    def __init__(self, on_overflow: Callable[[], None], *, timeout: float = DEFAULT_OBSERVER_TIMEOUT):
        self._inotify_fd = _OverflowAwareInotifyFD(on_overflow)
        self._inotify_fd.start()
        super().__init__(InotifyEmitter, timeout=timeout, inotify_fd=self._inotify_fd)

    def on_thread_stop(self) -> None:
        super().on_thread_stop()
        self._inotify_fd.stop()
        self._inotify_fd.join()


# --------------------------------------------------------------------------------------------------
# Stability: a file is ready once written, closed and left alone


@dataclass
class _Candidate:
    root: Path
    size: int
    mtime_ns: int
    changed_at: float
    writing: bool  # an inotify write was seen and no close-write since


class StabilityTracker:
    """Holds back changed files until they are closed and their size and mtime stay put."""

    def __init__(self, stable_seconds: float, emit: Callable[[Change], None],
                 close_wait_limit: float = CLOSE_WAIT_LIMIT) -> None:
        self.stable_seconds = stable_seconds
        self.close_wait_limit = close_wait_limit
        self._emit = emit
        self._lock = threading.Lock()
        self._files: dict[Path, _Candidate] = {}

    def __len__(self) -> int:
        with self._lock:
            return len(self._files)

    def touch(self, root: Path, path: Path, *, writing: bool | None = None) -> bool:
        """Something happened to ``path``; ``writing`` True after a write, False after close-write.

        Returns True if the tracker was empty before (the caller wakes the checking thread)."""
        try:
            st = os.stat(path)
        except OSError:
            self.forget(path)
            return False
        now = time.monotonic()
        with self._lock:
            first = not self._files
            cand = self._files.get(path)
            if cand is None:
                cand = self._files[path] = _Candidate(root, st.st_size, st.st_mtime_ns, now, False)
            cand.size, cand.mtime_ns, cand.changed_at = st.st_size, st.st_mtime_ns, now
            if writing is not None:
                cand.writing = writing
        return first

    def forget(self, path: Path) -> None:
        with self._lock:
            self._files.pop(path, None)

    def forget_under(self, directory: Path) -> None:
        with self._lock:
            for path in [p for p in self._files if p.is_relative_to(directory)]:
                del self._files[path]

    def rename(self, src: Path, dest: Path) -> bool:
        """Follow a move; True if ``src`` was being held back (``dest`` now is)."""
        with self._lock:
            cand = self._files.pop(src, None)
            if cand is not None:
                self._files[dest] = cand
            return cand is not None

    def check(self) -> float | None:
        """Emit the files that are ready; return seconds until the next one may be, or None."""
        now = time.monotonic()
        with self._lock:
            due = [(p, c) for p, c in self._files.items() if now - c.changed_at >= self.stable_seconds]
        ready: list[Change] = []
        for path, cand in due:
            try:
                st = os.stat(path)
            except OSError:
                self.forget(path)
                continue
            with self._lock:
                if self._files.get(path) is not cand:
                    continue  # moved or forgotten meanwhile
                if (st.st_size, st.st_mtime_ns) != (cand.size, cand.mtime_ns):
                    cand.size, cand.mtime_ns, cand.changed_at = st.st_size, st.st_mtime_ns, now
                    continue
                if cand.writing and now - cand.changed_at < self.close_wait_limit:
                    continue  # still open for writing: wait for close-write
                del self._files[path]
            if st.st_size == 0:
                continue  # created but never written: a later write brings it back
            ready.append(Change("ready", cand.root, path))
        for change in ready:
            self._emit(change)
        with self._lock:
            if not self._files:
                return None
            waits = [
                (c.changed_at + self.stable_seconds - now) if not c.writing else self.stable_seconds
                for c in self._files.values()
            ]
        return max(MIN_TICK, min(waits))


# --------------------------------------------------------------------------------------------------
# The watcher


@dataclass
class WatchedRoot:
    path: Path
    want: Literal["inotify", "poll"]
    poll_interval: float
    mode: Literal["inotify", "poll", "absent"] = "absent"
    device: int | None = None
    watch: ObservedWatch | None = None
    observer: BaseObserver | None = None  # the one watching it (shared for inotify)
    directories: int = 0
    reason: str = ""  # why the mode differs from what was asked


class _RootHandler(FileSystemEventHandler):
    def __init__(self, watcher: AlbumWatcher, root: WatchedRoot) -> None:
        self.watcher = watcher
        self.root = root

    def dispatch(self, event: FileSystemEvent) -> None:
        try:
            self.watcher._on_event(self.root, event)
        except Exception:  # an exception would kill watchdog's observer thread
            log.exception("error handling %r", event)


class AlbumWatcher:
    """Watches album roots; calls ``on_change`` (from watcher threads) for every ``Change``.

    ``albums`` are ``daemon.config.AlbumConfig``-like: ``.path``, ``.watch`` ("inotify" or
    "poll") and ``.poll_interval``. ``watch_limit`` defaults to fs.inotify.max_user_watches.
    """

    def __init__(
        self,
        albums: Iterable,
        photo_filter: PhotoFilter,
        on_change: Callable[[Change], None],
        *,
        stable_seconds: float = 2.0,
        root_check_interval: float = ROOT_CHECK_INTERVAL,
        watch_limit: int | None = None,
    ) -> None:
        self.photo_filter = photo_filter
        self.on_change = on_change
        self.stable_seconds = stable_seconds
        self.root_check_interval = root_check_interval
        self.watch_limit = watch_limit if watch_limit is not None else max_user_watches()
        self._roots = [WatchedRoot(Path(a.path), a.watch, a.poll_interval) for a in albums]
        self.tracker = StabilityTracker(stable_seconds, self._emit)
        self._inotify: OverflowAwareInotifyObserver | None = None
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_root_check = 0.0

    # -- public

    @property
    def watched(self) -> list[WatchedRoot]:
        return list(self._roots)

    def start(self) -> None:
        with self._lock:
            for root in self._roots:
                self._start_root(root)
        self._thread = threading.Thread(target=self._run, name="phototag-stability", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop watching; files still waiting to become stable are dropped (the next start's
        reconcile scan finds them)."""
        self._stop.set()
        self._wake.set()
        with self._lock:
            observers = {id(r.observer): r.observer for r in self._roots if r.observer}
            if self._inotify is not None:
                observers[id(self._inotify)] = self._inotify
            for observer in observers.values():
                observer.stop()
            for observer in observers.values():
                if observer.is_alive():
                    observer.join(timeout=5)
            self._inotify = None
            for root in self._roots:
                root.observer = root.watch = None
                root.mode = "absent"
        if self._thread is not None:
            self._thread.join(timeout=5)

    def check_roots(self) -> None:
        """Notice roots that went away (stop watching) or came back (watch and rescan)."""
        with self._lock:
            for root in self._roots:
                if root.mode != "absent":
                    if probe_root(root.path, root.device) is None:
                        log.warning(
                            "album root %s is gone or unmounted: watching paused, nothing "
                            "below it is removed from the index until it is back", root.path)
                        self._stop_root(root)
                elif probe_root(root.path) is not None:
                    log.warning("album root %s is back: watching it again and rescanning", root.path)
                    if self._start_root(root):
                        self._emit(Change("rescan", root.path, root.path, reason="album root is back"))

    # -- roots

    def _start_root(self, root: WatchedRoot) -> bool:
        device = probe_root(root.path)
        if device is None:
            log.warning("album root %s is missing, empty or unmounted: not watching it until it "
                        "holds files", root.path)
            root.mode = "absent"
            return False
        root.device = device
        mode, reason = self._choose_mode(root)
        root.reason = reason
        if reason:
            log.warning("album %s: %s", root.path, reason)
        handler = _RootHandler(self, root)
        if mode == "inotify":
            try:
                observer = self._inotify_observer()
                root.watch = observer.schedule(handler, str(root.path), recursive=True)
                root.observer, root.mode = observer, "inotify"
            except OSError as e:
                if e.errno not in (errno.ENOSPC, errno.EMFILE):
                    raise
                root.reason = f"cannot use inotify ({e.strerror}); polling every {root.poll_interval:g} s"
                log.warning("album %s: %s", root.path, root.reason)
                mode = "poll"
            else:
                self._verify_inotify_watches(root)
                mode = root.mode
        if mode == "poll":
            observer = PollingObserver(timeout=root.poll_interval)
            root.watch = observer.schedule(handler, str(root.path), recursive=True)
            observer.start()
            root.observer, root.mode = observer, "poll"
        log.info("watching %s (%s)", root.path, root.mode)
        return True

    def _stop_root(self, root: WatchedRoot) -> None:
        if root.observer is not None and root.watch is not None:
            try:
                root.observer.unschedule(root.watch)
            except (KeyError, OSError):
                pass
            if root.mode == "poll":
                root.observer.stop()
        self.tracker.forget_under(root.path)
        root.observer = root.watch = None
        root.mode = "absent"

    def _inotify_observer(self) -> OverflowAwareInotifyObserver:
        if self._inotify is None:
            self._inotify = OverflowAwareInotifyObserver(self._on_overflow)
            self._inotify.start()
        return self._inotify

    def _choose_mode(self, root: WatchedRoot) -> tuple[Literal["inotify", "poll"], str]:
        if root.want == "poll":
            return "poll", ""
        fstype = mount_fstype(root.path)
        if is_network_fs(fstype):
            return "poll", (
                f"is on a {fstype} filesystem, where inotify misses changes made by other machines: "
                f"polling every {root.poll_interval:g} s instead (set watch = \"poll\" to say so)")
        root.directories = count_directories(root.path)
        if self.watch_limit is not None:
            in_use = count_inotify_watches()
            if in_use + root.directories > self.watch_limit:
                return "poll", (
                    f"has {root.directories} directories but fs.inotify.max_user_watches is "
                    f"{self.watch_limit} ({in_use} in use): polling every {root.poll_interval:g} s "
                    f"instead. Raise the limit (sysctl fs.inotify.max_user_watches) to watch it live")
        return "inotify", ""

    def _verify_inotify_watches(self, root: WatchedRoot) -> None:
        """watchdog silently skips directories it could not watch: check none was skipped."""
        expected = sum(r.directories for r in self._roots if r.mode == "inotify" or r is root)
        for _attempt in range(3):
            held = count_inotify_watches()
            if held >= expected:
                return
            time.sleep(0.5)  # directories created meanwhile are watched asynchronously
            expected = sum(count_directories(r.path) for r in self._roots
                           if r.mode == "inotify" or r is root)
        root.reason = (f"only {held} of {expected} directories could be watched with inotify "
                       f"(fs.inotify.max_user_watches too small?): polling every "
                       f"{root.poll_interval:g} s instead")
        log.warning("album %s: %s", root.path, root.reason)
        assert self._inotify is not None and root.watch is not None
        self._inotify.unschedule(root.watch)
        root.watch, root.mode = None, "poll"

    # -- events

    def _emit(self, change: Change) -> None:
        try:
            self.on_change(change)
        except Exception:
            log.exception("error handling %s", change)

    def _on_overflow(self) -> None:
        log.warning("inotify event queue overflowed: events were lost; rescanning the albums")
        for root in self._roots:
            if root.mode == "inotify":
                self._emit(Change("rescan", root.path, root.path, reason="inotify queue overflow"))

    def _root_present(self, root: WatchedRoot) -> bool:
        return root.device is not None and probe_root(root.path, root.device) is not None

    def _on_event(self, root: WatchedRoot, event: FileSystemEvent) -> None:
        src = Path(os.fsdecode(event.src_path))
        def photo(root_path: Path, path: Path) -> bool:
            return is_watched(self.photo_filter, root_path, path)

        if isinstance(event, FileMovedEvent):
            dest = Path(os.fsdecode(event.dest_path))
            src_ok, dest_ok = photo(root.path, src), photo(root.path, dest)
            if src_ok and dest_ok:
                if not self.tracker.rename(src, dest):  # else: not indexed yet, dest follows
                    self._emit(Change("moved", root.path, src, dest))
            elif dest_ok:  # the final rename of a temp file: complete by now
                self.tracker.forget(dest)
                if os.path.isfile(dest):
                    self._emit(Change("ready", root.path, dest))
            elif src_ok:  # renamed to a non-photo or moved into an excluded folder (#recycle)
                self.tracker.forget(src)
                self._delete(root, Change("deleted", root.path, src))
        elif isinstance(event, FileDeletedEvent):
            if photo(root.path, src):
                self.tracker.forget(src)
                self._delete(root, Change("deleted", root.path, src))
        elif isinstance(event, DirDeletedEvent):
            if src == root.path:
                self._wake.set()
                self._last_root_check = 0.0  # the root itself: let check_roots decide
            elif not is_excluded(self.photo_filter, root.path, src):
                self.tracker.forget_under(src)
                self._delete(root, Change("dir_deleted", root.path, src))
        elif isinstance(event, (FileCreatedEvent, FileModifiedEvent, FileClosedEvent, FileAttribEvent)):
            if not photo(root.path, src):
                return
            writing: bool | None = None
            if root.mode == "inotify":
                if isinstance(event, FileModifiedEvent):
                    writing = True  # a write through an open descriptor: close-write will follow
                elif isinstance(event, FileClosedEvent):
                    writing = False
            if self.tracker.touch(root.path, src, writing=writing):
                self._wake.set()
        # Opened / closed-without-write (our own reads), directory created / modified: nothing.

    def _delete(self, root: WatchedRoot, change: Change) -> None:
        if os.path.lexists(change.path):
            return  # it is there after all (recreated, or a stale event)
        if not self._root_present(root):
            log.warning("ignoring deletion of %s: album root %s is gone or unmounted",
                        change.path, root.path)
            self._wake.set()
            self._last_root_check = 0.0
            return
        self._emit(change)

    # -- the stability / root-check thread

    def _run(self) -> None:
        wait: float | None = None
        while not self._stop.is_set():
            timeout = self.root_check_interval if wait is None else min(wait + 0.05, self.root_check_interval)
            self._wake.wait(timeout)
            self._wake.clear()
            if self._stop.is_set():
                break
            try:
                wait = self.tracker.check()
                if time.monotonic() - self._last_root_check >= self.root_check_interval:
                    self._last_root_check = time.monotonic()
                    self.check_roots()
            except Exception:
                log.exception("watcher check failed")
                wait = 1.0
