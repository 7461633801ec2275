"""The album watcher with a real watchdog observer on real directories and files."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from daemon.config import DEFAULT_EXCLUDE, DEFAULT_EXTENSIONS
from daemon.scan import PhotoFilter
from daemon.watcher import (
    AlbumWatcher,
    Change,
    count_directories,
    count_inotify_watches,
    is_network_fs,
    mount_fstype,
    probe_root,
)

STABLE = 0.5
TIMEOUT = 15.0
REPO = Path(__file__).parent.parent


@dataclass
class Album:
    path: Path
    watch: str = "inotify"
    poll_interval: float = 300.0


class Recorder:
    """Collects changes with the size each ready file had when it was reported."""

    def __init__(self) -> None:
        self.changes: list[Change] = []
        self.sizes: dict[Path, int] = {}
        self._cond = threading.Condition()

    def __call__(self, change: Change) -> None:
        with self._cond:
            if change.kind == "ready":
                self.sizes.setdefault(change.path, os.stat(change.path).st_size)
            self.changes.append(change)
            self._cond.notify_all()

    def of(self, kind: str) -> list[Change]:
        with self._cond:
            return [c for c in self.changes if c.kind == kind]

    def paths(self, kind: str) -> list[Path]:
        return [c.path for c in self.of(kind)]

    def wait_for(self, predicate, timeout: float = TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate():
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"timed out; changes so far: {self.changes}")
                self._cond.wait(left)

    def settle(self, seconds: float = STABLE * 3) -> None:
        """Give stray events time to show up before asserting that something did NOT happen."""
        time.sleep(seconds)


def jpeg_bytes(n: int = 0, size: int = 20_000) -> bytes:
    # Content does not matter to the watcher; distinct bytes per file.
    return b"\xff\xd8\xff\xe0" + bytes([n % 256]) * size + b"\xff\xd9"


@pytest.fixture
def album(tmp_path) -> Path:
    root = tmp_path / "album"
    root.mkdir()
    (root / "existing.jpg").write_bytes(jpeg_bytes(1))  # a present root is never empty
    return root


@pytest.fixture
def outside(tmp_path) -> Path:
    path = tmp_path / "outside"
    path.mkdir()
    return path


def start_watcher(albums, recorder, **kwargs) -> AlbumWatcher:
    watcher = AlbumWatcher(
        albums,
        PhotoFilter(DEFAULT_EXCLUDE, DEFAULT_EXTENSIONS),
        recorder,
        stable_seconds=kwargs.pop("stable_seconds", STABLE),
        **kwargs,
    )
    watcher.start()
    return watcher


@pytest.fixture
def watched(album):
    recorder = Recorder()
    watcher = start_watcher([Album(album)], recorder)
    assert watcher.watched[0].mode == "inotify"
    yield album, recorder
    watcher.stop()


def test_cp_into_album(watched, outside):
    album, rec = watched
    src = outside / "IMG_0001.JPG"
    src.write_bytes(jpeg_bytes(2, 200_000))
    subprocess.run(["cp", str(src), str(album / "IMG_0001.JPG")], check=True)
    rec.wait_for(lambda: rec.paths("ready"))
    rec.settle()
    assert rec.paths("ready") == [album / "IMG_0001.JPG"]
    assert rec.sizes[album / "IMG_0001.JPG"] == src.stat().st_size


def test_mv_from_outside_gives_ready(watched, outside):
    album, rec = watched
    src = outside / "beach.jpg"
    src.write_bytes(jpeg_bytes(3))
    subprocess.run(["mv", str(src), str(album / "beach.jpg")], check=True)
    rec.wait_for(lambda: rec.paths("ready"))
    rec.settle()
    assert rec.paths("ready") == [album / "beach.jpg"]
    assert not rec.of("deleted") and not rec.of("moved")


def test_rsync_style_temp_file_then_rename(watched):
    album, rec = watched
    temp = album / ".IMG_0002.jpg.a1B2c3"
    final = album / "IMG_0002.jpg"
    with open(temp, "wb") as f:
        f.write(jpeg_bytes(4)[:10_000])
        f.flush()
        time.sleep(STABLE * 2)  # slow transfer: the temp file sits still longer than stable_seconds
        f.write(jpeg_bytes(4)[10_000:])
    os.rename(temp, final)
    rec.wait_for(lambda: rec.paths("ready"))
    rec.settle()
    assert rec.paths("ready") == [final]
    assert rec.sizes[final] == len(jpeg_bytes(4))
    assert not any(".a1B2c3" in str(c.path) for c in rec.changes)


def test_syncthing_and_partial_download_temp_files_are_ignored(watched):
    album, rec = watched
    (album / ".syncthing.IMG_3.jpg.tmp").write_bytes(jpeg_bytes(5))
    (album / "IMG_4.jpg.part").write_bytes(jpeg_bytes(6))
    (album / "IMG_5.jpg.crdownload").write_bytes(jpeg_bytes(7))
    os.rename(album / ".syncthing.IMG_3.jpg.tmp", album / "IMG_3.jpg")
    rec.wait_for(lambda: rec.paths("ready"))
    rec.settle()
    assert rec.paths("ready") == [album / "IMG_3.jpg"]


def test_file_written_in_two_parts_with_a_pause(watched):
    album, rec = watched
    path = album / "slow.jpg"
    data = jpeg_bytes(8, 100_000)
    with open(path, "wb") as f:
        f.write(data[:50_000])
        f.flush()
        time.sleep(STABLE * 4)  # the writer pauses with the file open: not complete yet
        assert not rec.paths("ready")
        f.write(data[50_000:])
    rec.wait_for(lambda: rec.paths("ready"))
    rec.settle()
    assert rec.paths("ready") == [path]
    assert rec.sizes[path] == len(data)


def test_directory_moved_in(watched, outside):
    album, rec = watched
    trip = outside / "Trip 2024"
    (trip / "day 2").mkdir(parents=True)
    (trip / "a.jpg").write_bytes(jpeg_bytes(9))
    (trip / "day 2" / "b.png").write_bytes(jpeg_bytes(10))
    (trip / "notes.txt").write_text("not a photo")
    (trip / "@eaDir").mkdir()
    (trip / "@eaDir" / "thumb.jpg").write_bytes(jpeg_bytes(11))
    os.rename(trip, album / "Trip 2024")
    expected = {album / "Trip 2024" / "a.jpg", album / "Trip 2024" / "day 2" / "b.png"}
    rec.wait_for(lambda: set(rec.paths("ready")) >= expected)
    rec.settle()
    assert sorted(rec.paths("ready")) == sorted(expected)


def test_delete(watched):
    album, rec = watched
    (album / "existing.jpg").unlink()
    rec.wait_for(lambda: rec.of("deleted"))
    assert rec.paths("deleted") == [album / "existing.jpg"]


def test_rename_within_album_is_a_move(watched):
    album, rec = watched
    (album / "2024").mkdir()
    # Wait until the new folder is watched (a photo in it is seen): a move into a folder not
    # watched yet is also reported as a new file there, found when its watch is added.
    (album / "2024" / "marker.jpg").write_bytes(jpeg_bytes(30))
    rec.wait_for(lambda: rec.paths("ready"))
    os.rename(album / "existing.jpg", album / "2024" / "renamed.jpg")
    rec.wait_for(lambda: rec.of("moved"))
    rec.settle()
    (moved,) = rec.of("moved")
    assert (moved.path, moved.dest) == (album / "existing.jpg", album / "2024" / "renamed.jpg")
    assert rec.paths("ready") == [album / "2024" / "marker.jpg"] and not rec.of("deleted")


def test_directory_renamed_within_album_moves_its_photos(watched):
    album, rec = watched
    (album / "old").mkdir()
    (album / "old" / "x.jpg").write_bytes(jpeg_bytes(12))
    rec.wait_for(lambda: rec.paths("ready"))
    os.rename(album / "old", album / "new")
    rec.wait_for(lambda: rec.of("moved"))
    assert [(c.path, c.dest) for c in rec.of("moved")] == [(album / "old" / "x.jpg", album / "new" / "x.jpg")]


def test_excluded_folders_and_files(watched):
    album, rec = watched
    for folder in ("@eaDir", "#recycle", ".thumbnails", ".hidden"):
        (album / folder).mkdir()
        (album / folder / "p.jpg").write_bytes(jpeg_bytes(13))
    (album / "._IMG_1.jpg").write_bytes(jpeg_bytes(14))  # macOS resource fork
    (album / "notes.txt").write_text("x")
    (album / "visible.jpg").write_bytes(jpeg_bytes(15))
    rec.wait_for(lambda: rec.paths("ready"))
    rec.settle()
    assert rec.paths("ready") == [album / "visible.jpg"]


def test_moving_a_photo_to_the_recycle_bin_deletes_it(watched):
    album, rec = watched
    (album / "#recycle").mkdir()
    os.rename(album / "existing.jpg", album / "#recycle" / "existing.jpg")
    rec.wait_for(lambda: rec.of("deleted"))
    assert rec.paths("deleted") == [album / "existing.jpg"]


def test_directory_moved_out_of_album(watched, outside):
    album, rec = watched
    (album / "sub").mkdir()
    (album / "sub" / "s.jpg").write_bytes(jpeg_bytes(16))
    rec.wait_for(lambda: rec.paths("ready"))
    os.rename(album / "sub", outside / "sub")
    rec.wait_for(lambda: rec.of("dir_deleted"))
    assert rec.paths("dir_deleted") == [album / "sub"]


def test_album_root_moved_away_deletes_nothing(album, tmp_path):
    rec = Recorder()
    watcher = start_watcher([Album(album)], rec, root_check_interval=0.5)
    try:
        gone = tmp_path / "gone"
        os.rename(album, gone)
        (gone / "existing.jpg").unlink()  # events now name paths under the vanished root
        deadline = time.monotonic() + TIMEOUT
        while watcher.watched[0].mode != "absent":
            assert time.monotonic() < deadline, "root not noticed as gone"
            time.sleep(0.1)
        rec.settle()
        assert not rec.of("deleted") and not rec.of("dir_deleted")
        # Back again: watched and rescanned.
        os.rename(gone, album)
        (album / "back.jpg").write_bytes(jpeg_bytes(17))
        rec.wait_for(lambda: rec.of("rescan"))
        assert rec.of("rescan")[0].root == album
        assert watcher.watched[0].mode == "inotify"
    finally:
        watcher.stop()


def mount_tmpfs(path: Path) -> bool:
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=20m", "phototag-test", str(path)],
                            capture_output=True)
    return result.returncode == 0


@pytest.mark.parametrize("mode", ["inotify", "poll"])
def test_unmounted_album_root_deletes_nothing(tmp_path, mode):
    root = tmp_path / "share"
    root.mkdir()
    if not mount_tmpfs(root):
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        for i in range(3):
            (root / f"p{i}.jpg").write_bytes(jpeg_bytes(i))
        rec = Recorder()
        watcher = start_watcher([Album(root, mode, 0.3)], rec, root_check_interval=0.5)
        try:
            assert watcher.watched[0].mode == mode
            subprocess.run(["umount", str(root)], check=True)
            # The mount point is now an empty directory on the parent filesystem.
            deadline = time.monotonic() + TIMEOUT
            while watcher.watched[0].mode != "absent":
                assert time.monotonic() < deadline, "unmount not noticed"
                time.sleep(0.1)
            rec.settle(1.5)
            assert not rec.of("deleted") and not rec.of("dir_deleted")
            assert mount_tmpfs(root)
            (root / "p0.jpg").write_bytes(jpeg_bytes(0))
            rec.wait_for(lambda: rec.of("rescan"))
            assert watcher.watched[0].mode == mode
        finally:
            watcher.stop()
    finally:
        subprocess.run(["umount", str(root)], capture_output=True)


def test_polling_root(album):
    rec = Recorder()
    watcher = start_watcher([Album(album, "poll", 0.3)], rec)
    try:
        assert watcher.watched[0].mode == "poll"
        (album / "polled.jpg").write_bytes(jpeg_bytes(18))
        rec.wait_for(lambda: rec.paths("ready"))
        assert rec.paths("ready") == [album / "polled.jpg"]
        (album / "existing.jpg").unlink()
        rec.wait_for(lambda: rec.of("deleted"))
        assert rec.paths("deleted") == [album / "existing.jpg"]
    finally:
        watcher.stop()


def test_too_few_inotify_watches_falls_back_to_polling(album):
    for sub in ("a", "b", "c/d"):
        (album / sub).mkdir(parents=True)
    assert count_directories(album) == 5
    rec = Recorder()
    watcher = start_watcher([Album(album, "inotify", 0.3)], rec, watch_limit=count_inotify_watches() + 3)
    try:
        root = watcher.watched[0]
        assert root.mode == "poll"
        assert "max_user_watches" in root.reason
        (album / "c" / "d" / "deep.jpg").write_bytes(jpeg_bytes(19))
        rec.wait_for(lambda: rec.paths("ready"))
        assert rec.paths("ready") == [album / "c" / "d" / "deep.jpg"]
    finally:
        watcher.stop()


def test_every_directory_gets_an_inotify_watch(album):
    for sub in ("a", "b/c", "b/d"):
        (album / sub).mkdir(parents=True)
    before = count_inotify_watches()
    rec = Recorder()
    watcher = start_watcher([Album(album)], rec)
    try:
        assert watcher.watched[0].mode == "inotify"
        assert count_inotify_watches() - before == count_directories(album) == 5
    finally:
        watcher.stop()


def test_probe_root(tmp_path):
    assert probe_root(tmp_path / "missing") is None
    (tmp_path / "empty").mkdir()
    assert probe_root(tmp_path / "empty") is None
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    device = os.stat(tmp_path).st_dev
    assert probe_root(tmp_path / "full") == device
    # Once seen present, an emptied root on the same device is still present (photos deleted)...
    assert probe_root(tmp_path / "empty", device) == device
    # ...but not on another device (the empty mount point of a share that dropped).
    assert probe_root(tmp_path / "empty", device + 1) is None


MOUNTINFO = """\
22 1 254:1 / / rw,relatime shared:1 - ext4 /dev/vda1 rw
40 22 0:35 / /mnt/photos rw,relatime shared:20 - cifs //nas/photos rw,vers=3.1.1
41 22 0:36 / /srv/nfs rw,relatime shared:21 - nfs4 nas:/volume1 rw
42 22 0:37 / /home/me/remote\\040dir rw,nosuid shared:22 - fuse.sshfs me@nas:/ rw
43 22 254:2 / /mnt/photos/local rw,relatime shared:23 - ext4 /dev/vdb1 rw
"""


def test_mount_fstype_from_mountinfo():
    assert mount_fstype("/mnt/photos/2024/a.jpg", MOUNTINFO) == "cifs"
    assert mount_fstype("/mnt/photos/local/x", MOUNTINFO) == "ext4"
    assert mount_fstype("/srv/nfs", MOUNTINFO) == "nfs4"
    assert mount_fstype("/home/me/remote dir/db", MOUNTINFO) == "fuse.sshfs"
    assert mount_fstype("/mnt/photosX", MOUNTINFO) == "ext4"
    assert [is_network_fs(t) for t in ("cifs", "nfs4", "fuse.sshfs", "ext4", "btrfs", "tmpfs")] == [
        True, True, True, False, False, False]
    assert not is_network_fs(mount_fstype(REPO))  # the real mount table: this checkout is local


OVERFLOW_CHILD = textwrap.dedent(
    """
    import json, sys, time
    from pathlib import Path
    from types import SimpleNamespace
    from daemon.config import DEFAULT_EXCLUDE, DEFAULT_EXTENSIONS
    from daemon.scan import PhotoFilter
    from daemon.watcher import AlbumWatcher

    def emit(change):
        print(json.dumps({"kind": change.kind, "path": str(change.path), "reason": change.reason}),
              flush=True)

    album = SimpleNamespace(path=Path(sys.argv[1]), watch="inotify", poll_interval=300.0)
    watcher = AlbumWatcher([album], PhotoFilter(DEFAULT_EXCLUDE, DEFAULT_EXTENSIONS), emit,
                           stable_seconds=0.3)
    watcher.start()
    print(json.dumps({"kind": "started"}), flush=True)
    sys.stdin.readline()
    watcher.stop()
    """
)


def test_inotify_queue_overflow_asks_for_a_rescan(album):
    """A real kernel queue overflow: the watching process is stopped while events pile up."""
    max_queued = int(Path("/proc/sys/fs/inotify/max_queued_events").read_text())
    if max_queued > 200_000:
        pytest.skip(f"max_queued_events is {max_queued}: too many events needed to overflow it")
    child = subprocess.Popen([sys.executable, "-c", OVERFLOW_CHILD, str(album)], cwd=REPO,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert json.loads(child.stdout.readline())["kind"] == "started"
        os.kill(child.pid, signal.SIGSTOP)
        junk = album  # an already watched folder: a new one would have no watch yet
        # create + open + close-write + delete: 4 events per file, never coalesced (distinct names)
        for i in range(max_queued // 4 + 1000):
            p = junk / f"junk-{i}.txt"
            p.write_bytes(b"")
            p.unlink()
        (album / "lost.jpg").write_bytes(jpeg_bytes(20))  # its events are dropped by the kernel
        os.kill(child.pid, signal.SIGCONT)
        seen = []
        deadline = time.monotonic() + 60
        while not any(c["kind"] == "rescan" for c in seen):
            assert time.monotonic() < deadline, seen
            seen.append(json.loads(child.stdout.readline()))
        rescan = next(c for c in seen if c["kind"] == "rescan")
        assert rescan["path"] == str(album) and "overflow" in rescan["reason"]
    finally:
        os.kill(child.pid, signal.SIGCONT)
        child.stdin.close()
        child.wait(timeout=30)
