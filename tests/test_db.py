"""storage.db and storage.migrate on real SQLite files: settings, transactions, bad databases."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from sqlalchemy import select

import storage.db
from storage.db import (
    DatabaseError,
    make_engine,
    read_session,
    refresh_statistics,
    write_session,
)
from storage.migrate import (
    DatabaseCorrupt,
    DatabaseMissing,
    DatabaseOutdated,
    DatabaseTooNew,
    check,
    head_revision,
    open_for_read,
    open_for_write,
)
from storage.models import Meta


def url(path: Path) -> str:
    return f"sqlite:///{path}"


@pytest.fixture
def db(tmp_path) -> Path:
    path = tmp_path / "phototag.db"
    open_for_write(url(path)).dispose()
    return path


def test_sqlite_connection_settings(db):
    engine = make_engine(url(db))
    with engine.connect() as connection:
        pragma = lambda name: connection.exec_driver_sql(f"PRAGMA {name}").scalar()  # noqa: E731
        assert pragma("journal_mode") == "wal"
        assert pragma("foreign_keys") == 1
        assert pragma("busy_timeout") == 30000
        assert pragma("synchronous") == 1  # NORMAL


def test_write_session_holds_the_write_lock_from_its_start(db):
    """BEGIN IMMEDIATE: another writer is locked out even before this session has written."""
    engine = make_engine(url(db))
    other = sqlite3.connect(db, timeout=0, isolation_level=None)
    with write_session(engine) as session:
        session.scalar(select(Meta.value))  # only a read so far
        with pytest.raises(sqlite3.OperationalError, match="database is locked"):
            other.execute("BEGIN IMMEDIATE")
    other.execute("BEGIN IMMEDIATE")  # free again after commit
    other.execute("ROLLBACK")


def test_read_session_takes_no_write_lock(db):
    engine = make_engine(url(db))
    other = sqlite3.connect(db, timeout=0, isolation_level=None)
    with read_session(engine) as session:
        session.scalar(select(Meta.value))
        other.execute("BEGIN IMMEDIATE")
        other.execute("INSERT INTO meta (key, value) VALUES ('k', 'v')")
        other.execute("COMMIT")
        # a read transaction keeps its snapshot
        assert session.scalar(select(Meta.value).where(Meta.key == "k")) is None
    with read_session(engine) as session:
        assert session.scalar(select(Meta.value).where(Meta.key == "k")) == "v"


def test_write_session_commits_or_rolls_back(db):
    engine = make_engine(url(db))
    with write_session(engine) as session:
        session.add(Meta(key="kept", value="1"))
    with pytest.raises(RuntimeError):
        with write_session(engine) as session:
            session.add(Meta(key="dropped", value="1"))
            session.flush()
            raise RuntimeError("boom")
    with read_session(engine) as session:
        assert set(session.scalars(select(Meta.key))) == {"kept"}


def test_lock_held_past_the_timeout_is_one_clear_line(db, monkeypatch):
    monkeypatch.setattr(storage.db, "BUSY_TIMEOUT_SECONDS", 0.2)
    engine = make_engine(url(db))
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(DatabaseError) as caught:
            with write_session(engine) as session:
                session.add(Meta(key="k", value="v"))
    finally:
        holder.execute("ROLLBACK")
    message = str(caught.value)
    assert "\n" not in message and str(db) in message and "locked" in message


def test_statistics_are_refreshed_or_a_busy_database_is_only_warned_about(db, monkeypatch,
                                                                           caplog):
    monkeypatch.setattr(storage.db, "BUSY_TIMEOUT_SECONDS", 0.2)
    engine = make_engine(url(db))
    with write_session(engine) as session:
        session.add(Meta(key="k", value="v"))  # (ANALYZE leaves empty tables out)
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        refresh_statistics(engine)  # waits 0.2 s for the lock, then gives up: no exception
    finally:
        holder.execute("ROLLBACK")
    assert any("search statistics not refreshed" in r.message and "locked" in r.message
               for r in caplog.records)
    with sqlite3.connect(db) as reader:
        assert not reader.execute("SELECT name FROM sqlite_master WHERE name = 'sqlite_stat1'"
                                  ).fetchall()
    refresh_statistics(engine)
    with sqlite3.connect(db) as reader:
        stats = dict(reader.execute("SELECT idx, stat FROM sqlite_stat1 WHERE tbl = 'meta'"))
    assert stats == {"sqlite_autoindex_meta_1": "1 1"}  # one row, one per key
    engine.dispose()


def test_missing_database_says_how_to_create_it_and_creates_nothing(tmp_path):
    path = tmp_path / "none" / "phototag.db"
    with pytest.raises(DatabaseMissing) as caught:
        open_for_read(url(path))
    assert "phototag db upgrade" in str(caught.value) and str(path) in str(caught.value)
    assert not path.exists() and not path.parent.exists()


def test_empty_database_file_counts_as_missing_for_reading(tmp_path):
    path = tmp_path / "phototag.db"
    path.touch()
    with pytest.raises(DatabaseMissing, match="empty"):
        open_for_read(url(path))


def test_open_for_write_creates_folder_and_schema(tmp_path):
    path = tmp_path / "deep" / "er" / "phototag.db"
    engine = open_for_write(url(path))
    check(engine)  # at head
    open_for_read(url(path)).dispose()


@pytest.mark.parametrize("content", [b"this is not a database\n" * 300, b"\x00" * 4096 + b"junk"])
def test_corrupt_file_is_reported_and_never_overwritten(tmp_path, content):
    path = tmp_path / "phototag.db"
    path.write_bytes(content)
    for opener in (open_for_read, open_for_write):
        with pytest.raises(DatabaseCorrupt) as caught:
            opener(url(path))
        assert str(path) in str(caught.value) and "\n" not in str(caught.value)
    assert path.read_bytes() == content
    assert not Path(f"{path}-wal").exists() or Path(f"{path}-wal").stat().st_size == 0


def test_someone_elses_sqlite_database_is_left_alone(tmp_path):
    path = tmp_path / "other.db"
    with sqlite3.connect(path) as other:
        other.execute("CREATE TABLE recipes (name TEXT)")
        other.execute("INSERT INTO recipes VALUES ('soup')")
    before = path.read_bytes()
    with pytest.raises(DatabaseCorrupt, match="not a phototag database"):
        open_for_write(url(path))
    assert path.read_bytes() == before


def test_database_newer_than_the_code(db):
    with sqlite3.connect(db) as raw:
        raw.execute("UPDATE alembic_version SET version_num = 'f00dfeed'")
    for opener in (open_for_read, open_for_write):
        with pytest.raises(DatabaseTooNew) as caught:
            opener(url(db))
        assert "f00dfeed" in str(caught.value) and head_revision() in str(caught.value)
        assert "upgrade phototag" in str(caught.value)
    with sqlite3.connect(db) as raw:  # untouched
        assert raw.execute("SELECT version_num FROM alembic_version").fetchall() == [("f00dfeed",)]


def test_outdated_database_is_refused_for_reading_and_upgraded_for_writing(tmp_path):
    from tests.test_migrations import create_at_revision

    path = tmp_path / "old.db"
    create_at_revision(path, "0001")
    with pytest.raises(DatabaseOutdated, match="phototag db upgrade"):
        open_for_read(url(path))
    open_for_write(url(path)).dispose()
    open_for_read(url(path)).dispose()


def test_reading_a_current_database_does_not_import_alembic(db):
    """open_for_read compares alembic_version with HEAD; alembic is only for other versions."""
    import subprocess
    import sys

    code = ("import sys\n"
            "from storage.migrate import open_for_read\n"
            f"open_for_read({url(db)!r}).dispose()\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'alembic'))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_several_schema_versions_are_refused(db):
    with sqlite3.connect(db) as raw:
        raw.execute("INSERT INTO alembic_version (version_num) VALUES ('0001')")
    with pytest.raises(DatabaseCorrupt, match="several schema versions"):
        open_for_read(url(db))
