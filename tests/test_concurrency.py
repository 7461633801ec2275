"""Two real processes on one SQLite database: the CLI works while another process writes.

A background process (standing in for the daemon) commits short write transactions in a loop.
Meanwhile `phototag index` and `phototag status` run as real processes, and this process writes
and reads through storage.db: nothing sees "database is locked". The last test shows the trap that
BEGIN IMMEDIATE avoids: a deferred transaction that reads and then writes fails at once.
"""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlalchemy import select

from storage.db import DatabaseError, make_engine, read_session, write_session
from storage.migrate import open_for_write
from storage.models import Meta
from tests.test_index import write_jpeg

REPO = Path(__file__).resolve().parent.parent
PHOTOTAG = Path(sys.executable).parent / "phototag"

# The "daemon": read a counter, hold the write lock a little, write it back; over and over.
WRITER = """
import sys, time
from pathlib import Path
from sqlalchemy import select
from storage.db import make_engine, write_session
from storage.models import Meta

engine = make_engine(sys.argv[1])
stop, started = Path(sys.argv[2]), Path(sys.argv[3])
done = 0
while not stop.exists():
    with write_session(engine) as session:
        row = session.get(Meta, "writer")
        if row is None:
            session.add(Meta(key="writer", value="1"))
        else:
            row.value = str(int(row.value) + 1)
        session.flush()
        time.sleep(0.01)  # work done while holding the lock
    done += 1
    started.touch()
    time.sleep(0.002)
print(done)
"""


@pytest.fixture
def database(tmp_path) -> str:
    url = f"sqlite:///{tmp_path / 'phototag.db'}"
    open_for_write(url).dispose()
    return url


@pytest.fixture
def writer(database, tmp_path):
    """Start the writing process; yields a function that stops it and returns its commit count."""
    stop, started = tmp_path / "stop", tmp_path / "started"
    process = subprocess.Popen([sys.executable, "-c", WRITER, database, str(stop), str(started)],
                               cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while not started.exists():
        assert process.poll() is None, process.stderr.read()
        time.sleep(0.01)

    def finish() -> int:
        stop.touch()
        out, err = process.communicate(timeout=60)
        assert process.returncode == 0, err
        return int(out)

    yield finish
    if process.poll() is None:
        process.kill()
        process.wait()


def counter(url: str, key: str) -> int:
    with read_session(make_engine(url)) as session:
        return int(session.scalar(select(Meta.value).where(Meta.key == key)) or 0)


def test_cli_and_this_process_write_while_another_process_writes(
        database, writer, tmp_path, resnet18_weights):
    album = tmp_path / "album"
    for i in range(6):
        write_jpeg(album / f"img{i}.jpg", i)
    config = tmp_path / "config.toml"
    config.write_text(f'[model]\nweights = "{resnet18_weights}"\nbatch_size = 2\n')
    db_path = database.removeprefix("sqlite:///")
    index = subprocess.Popen(
        [str(PHOTOTAG), "--config", str(config), "--db", db_path, "index", str(album)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    # Meanwhile, read-modify-write transactions of our own, and reads.
    engine = make_engine(database)
    ours = 200
    for _ in range(ours):
        with write_session(engine) as session:
            row = session.get(Meta, "ours")
            if row is None:
                session.add(Meta(key="ours", value="1"))
            else:
                row.value = str(int(row.value) + 1)
        with read_session(engine) as session:
            session.scalar(select(Meta.value).where(Meta.key == "writer"))

    out, err = index.communicate(timeout=600)
    status = subprocess.run([str(PHOTOTAG), "--db", db_path, "status"],
                            capture_output=True, text=True, timeout=120)
    commits = writer()

    assert index.returncode == 0, err
    assert "6 new" in out and "0 failed" in out
    assert status.returncode == 0, status.stderr
    for output in (out, err, status.stdout, status.stderr):
        assert "locked" not in output
    # no write was lost on either side
    assert counter(database, "ours") == ours
    assert counter(database, "writer") == commits
    with sqlite3.connect(db_path) as db:
        assert db.execute("SELECT count(*) FROM photo WHERE status = 'tagged'").fetchone() == (6,)


def test_the_trap_deferred_read_then_write_fails_at_once(database, writer):
    """What BEGIN IMMEDIATE is for: a deferred transaction that has read cannot write after
    another process committed, and the busy timeout does not help (SQLITE_BUSY_SNAPSHOT)."""
    engine = make_engine(database)
    with pytest.raises(DatabaseError, match="locked") as caught:
        with read_session(engine) as session:  # plain BEGIN, as for reading
            seen = int(session.scalar(select(Meta.value).where(Meta.key == "writer")))
            while counter(database, "writer") == seen:  # the other process commits meanwhile
                time.sleep(0.005)
            started = time.monotonic()
            session.add(Meta(key="late", value="x"))
            session.flush()
    assert time.monotonic() - started < 15  # well under the 30 s busy timeout: it did not wait
    assert "\n" not in str(caught.value)

    # The same read-then-write in a write session (BEGIN IMMEDIATE) waits its turn and succeeds.
    with write_session(engine) as session:
        seen = int(session.scalar(select(Meta.value).where(Meta.key == "writer")))
        time.sleep(0.05)  # the other process cannot commit now: it waits for us
        assert int(session.scalar(select(Meta.value).where(Meta.key == "writer"))) == seen
        session.add(Meta(key="late", value="x"))
    writer()
    with read_session(engine) as session:
        assert session.get(Meta, "late").value == "x"


def test_raw_sqlite_shows_the_same_trap(database, writer):
    """The trap without SQLAlchemy: sqlite3 itself, with a 20 s busy timeout."""
    path = database.removeprefix("sqlite:///")
    connection = sqlite3.connect(path, timeout=20, isolation_level=None)
    connection.execute("BEGIN")
    seen = connection.execute("SELECT value FROM meta WHERE key = 'writer'").fetchone()[0]
    other = sqlite3.connect(path, isolation_level=None)
    while other.execute("SELECT value FROM meta WHERE key = 'writer'").fetchone()[0] == seen:
        time.sleep(0.005)
    with pytest.raises(sqlite3.OperationalError, match="database is locked"):
        connection.execute("INSERT INTO meta (key, value) VALUES ('late', 'x')")
    connection.execute("ROLLBACK")
    writer()
