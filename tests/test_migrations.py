"""Alembic migrations: they match the models, keep old data, and render for PostgreSQL."""

from __future__ import annotations

import io
import sqlite3
from contextlib import redirect_stdout
from datetime import datetime
from pathlib import Path

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect

from storage.db import make_engine, write_options
from storage.migrate import (
    HEAD,
    MIGRATIONS_DIR,
    alembic_config,
    head_revision,
    open_for_write,
    upgrade,
)
from storage.models import Base

MTIME_NS = 1_700_000_000_123_456_789  # a real nanosecond mtime: needs 64 bits


def create_at_revision(path: Path, revision: str) -> None:
    """A database migrated only up to ``revision``, as an older phototag left it."""
    engine = make_engine(f"sqlite:///{path}")
    with engine.connect() as connection:
        connection = connection.execution_options(**write_options())
        with connection.begin():
            command.upgrade(alembic_config(connection), revision)
    engine.dispose()


def fill_old_database(path: Path) -> None:
    """Rows written with plain SQL, as the revision-0001 schema had them."""
    with sqlite3.connect(path) as db:
        db.execute("INSERT INTO album_root (id, path, added_at) VALUES (1, '/albums', '2024-01-01')")
        db.executemany(
            "INSERT INTO photo (id, root_id, relpath, size, mtime_ns, content_hash, status, attempts,"
            " indexed_at, tagged_at, model, mapping_version, taken_at)"
            " VALUES (?, 1, ?, ?, ?, ?, 'tagged', 0, '2024-01-01', '2024-01-02', 'resnet18', 'v1', ?)",
            [(1, "2023/cat.jpg", 3_000_000_000, MTIME_NS, "ab" * 32, "2023-06-01 12:00:00"),
             (2, "2023/dog.jpg", 1234, MTIME_NS + 1, "cd" * 32, None)])
        db.executemany("INSERT INTO tag (id, name, zh, from_mapping) VALUES (?, ?, ?, 1)",
                       [(1, "cat", "猫"), (2, "animal", "动物"), (3, "dog", "狗")])
        db.executemany("INSERT INTO tag_parent (tag_id, parent_id) VALUES (?, ?)", [(1, 2), (3, 2)])
        db.executemany("INSERT INTO photo_tag (photo_id, tag_id, source, score) VALUES (?, ?, ?, ?)",
                       [(1, 1, "model", 0.9), (1, 2, "model", 0.95), (2, 3, "user", 1.0)])
        db.execute("INSERT INTO meta (key, value) VALUES ('nightly_last_run', '2024-01-03')")


def dump(path: Path) -> dict[str, list[tuple]]:
    with sqlite3.connect(path) as db:
        return {table: sorted(db.execute(f"SELECT * FROM {table}").fetchall())
                for table in ("album_root", "photo", "tag", "tag_parent", "photo_tag", "meta")}


def dump_without_new_columns(path: Path) -> dict[str, list[tuple]]:
    """``dump`` of a database upgraded from 0001, without the columns added since (which must
    be at their defaults): photo.own_write (0004), photo.sidecar_state (0005),
    photo.attempt_started_at and photo.interruptions (0006), the last four columns."""
    tables = dump(path)
    assert {row[-4:] for row in tables["photo"]} == {(None, None, None, 0)}
    tables["photo"] = [row[:-4] for row in tables["photo"]]
    return tables


def test_migrations_form_one_line_of_history():
    script = ScriptDirectory(str(MIGRATIONS_DIR))
    assert len(script.get_heads()) == 1
    revisions = [r.revision for r in script.walk_revisions()]
    assert revisions[-1] == "0001" and revisions[0] == head_revision()


def test_head_constant_is_alembics_head():
    """storage.migrate.HEAD lets read-only commands skip alembic; it must name the newest script."""
    assert HEAD == head_revision()


def test_models_and_migrations_agree(tmp_path):
    engine = open_for_write(f"sqlite:///{tmp_path / 'phototag.db'}")
    with engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        assert compare_metadata(context, Base.metadata) == []


def test_upgrading_an_old_database_keeps_its_data(tmp_path):
    path = tmp_path / "phototag.db"
    create_at_revision(path, "0001")
    fill_old_database(path)
    before = dump(path)

    engine = make_engine(f"sqlite:///{path}")
    backup = upgrade(engine, backup=True)

    assert dump_without_new_columns(path) == before  # every row, photo_tag included
    with engine.connect() as connection:
        assert MigrationContext.configure(connection).get_current_revision() == head_revision()
        columns = {c["name"]: c["type"] for c in inspect(connection).get_columns("photo")}
        assert "BIGINT" in str(columns["mtime_ns"]) and "BIGINT" in str(columns["size"])
        indexes = {i["name"]: i["column_names"] for i in inspect(connection).get_indexes("photo_tag")}
        assert indexes["ix_photo_tag_tag_score"] == ["tag_id", "score", "photo_id"]  # 0003
        assert connection.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1  # restored
        assert connection.exec_driver_sql("PRAGMA foreign_key_check").fetchall() == []
    # the backup is the database as it was, made before the upgrade
    assert backup is not None and backup.parent == path.parent and "0001" in backup.name
    assert dump(backup) == before
    with sqlite3.connect(backup) as db:
        assert db.execute("SELECT version_num FROM alembic_version").fetchall() == [("0001",)]
    assert upgrade(engine, backup=True) is None  # already current: no second backup


def test_the_foreign_key_trap_the_upgrade_avoids(tmp_path):
    """Run the same batch migration with foreign keys left on: photo_tag rows are lost.

    This is why storage.migrate switches them off around an upgrade.
    """
    path = tmp_path / "phototag.db"
    create_at_revision(path, "0001")
    fill_old_database(path)
    engine = make_engine(f"sqlite:///{path}")
    with engine.connect() as connection:
        connection = connection.execution_options(**write_options())
        with connection.begin():
            command.upgrade(alembic_config(connection), "head")
    assert dump(path)["photo_tag"] == []


def test_downgrade_and_upgrade_again(tmp_path):
    path = tmp_path / "phototag.db"
    open_for_write(f"sqlite:///{path}").dispose()
    engine = make_engine(f"sqlite:///{path}")
    with engine.connect() as connection:
        connection.connection.driver_connection.execute("PRAGMA foreign_keys = OFF")
        connection = connection.execution_options(**write_options())
        with connection.begin():
            command.downgrade(alembic_config(connection), "0001")
    fill_old_database(path)
    before = dump(path)
    upgrade(engine)
    assert dump_without_new_columns(path) == before


def test_migrations_render_for_postgresql():
    config = alembic_config()
    config.set_main_option("sqlalchemy.url", "postgresql://phototag@localhost/phototag")
    out = io.StringIO()
    config.stdout = out
    with redirect_stdout(out):
        command.upgrade(config, "head", sql=True)
    sql = out.getvalue()
    assert "id SERIAL NOT NULL" in sql
    assert "ALTER TABLE photo ALTER COLUMN mtime_ns TYPE BIGINT" in sql
    assert "PRAGMA" not in sql and "batch" not in sql.lower()


def test_timestamps_round_trip(tmp_path):
    """DateTime columns hold naive UTC; check SQLite gives back what was stored."""
    from storage.db import read_session, write_session
    from storage.models import AlbumRoot

    engine = open_for_write(f"sqlite:///{tmp_path / 'phototag.db'}")
    when = datetime(2024, 2, 29, 23, 59, 58, 123456)
    with write_session(engine) as session:
        session.add(AlbumRoot(path="/x", added_at=when))
    with read_session(engine) as session:
        assert session.query(AlbumRoot).one().added_at == when
