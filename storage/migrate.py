"""Schema versions: check a database against this code and upgrade it with Alembic.

The migrations ship inside the installed package (``migrations/``); the Alembic configuration is
built here, so no ``alembic.ini`` is needed. Commands that only read call ``open_for_read`` (which
never creates or changes anything); commands that write call ``open_for_write`` (which creates
or upgrades the database first).

Alembic is imported only when a database is not at ``HEAD`` or is being upgraded: importing it
and reading the migration scripts costs a read-only command about a third of a second.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import sqlalchemy.exc

from sqlalchemy import Connection, Engine, inspect, text

import migrations  # only the package (a docstring): where the scripts are
from storage.db import (
    DatabaseError,
    describe,
    ensure_wal,
    error_message,
    make_engine,
    sqlite_path,
    write_options,
)

if TYPE_CHECKING:
    from alembic.config import Config

# Alembic's INFO lines ("setup plugin ...", "Context impl SQLiteImpl.") mean nothing to a user;
# set before alembic is imported, since it logs while importing.
if logging.getLogger("alembic").level == logging.NOTSET:
    logging.getLogger("alembic").setLevel(logging.WARNING)

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(migrations.__file__).parent

# The newest migration in migrations/versions; a test checks it is alembic's head. A database at
# HEAD is used without importing alembic.
HEAD = "0006"


class DatabaseMissing(DatabaseError):
    """There is no database (or an empty one) where a command expected to read one."""


class DatabaseTooNew(DatabaseError):
    """The database was upgraded by a newer phototag; this one does not know its schema."""


class DatabaseOutdated(DatabaseError):
    """The database needs ``phototag db upgrade`` before a read-only command can use it."""


class DatabaseCorrupt(DatabaseError):
    """The file is not a phototag database, or SQLite cannot read it. It is never overwritten."""


def alembic_config(connection: Connection | None = None) -> Config:
    """Alembic's configuration, pointing at the installed migrations; env.py uses ``connection``."""
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.attributes["connection"] = connection
    return config


def head_revision() -> str:
    """Alembic's head, read from the migration scripts (slow: use HEAD)."""
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None, "no migrations found"
    return head


@dataclass(frozen=True)
class SchemaState:
    """Where a database stands: ``revision`` None means empty (or missing)."""

    exists: bool
    revision: str | None
    head: str

    @property
    def at_head(self) -> bool:
        return self.revision == self.head


def state(engine: Engine) -> SchemaState:
    """Inspect the database without changing it; raise DatabaseCorrupt/TooNew for unusable ones.

    A missing SQLite file is reported as ``exists=False`` and not created.
    """
    where = describe(engine)
    head = HEAD
    path = sqlite_path(engine)
    if path is not None and not path.exists():
        return SchemaState(exists=False, revision=None, head=head)
    if path is not None and path.is_dir():
        raise DatabaseCorrupt(f"{where} is not a phototag database: it is a directory")
    try:
        with engine.connect() as connection:
            tables = set(inspect(connection).get_table_names())
            versions = []
            if "alembic_version" in tables:
                versions = connection.execute(
                    text("SELECT version_num FROM alembic_version")).scalars().all()
    except sqlalchemy.exc.OperationalError as e:  # cannot open: permissions, server down, ...
        raise DatabaseError(error_message(engine, e)) from e
    except sqlalchemy.exc.DBAPIError as e:  # sqlite3.DatabaseError: not a database, malformed
        reason = str(e.orig).strip().splitlines()[0] if e.orig is not None else str(e)
        raise DatabaseCorrupt(f"{where} is not a phototag database / is corrupt: {reason}") from e

    if len(versions) > 1:
        raise DatabaseCorrupt(f"{where} has several schema versions: {', '.join(versions)}")
    revision = versions[0] if versions else None
    if revision is None:
        if tables - {"alembic_version"}:
            listed = ", ".join(sorted(tables)[:5])
            raise DatabaseCorrupt(
                f"{where} is not a phototag database: it has tables ({listed}) but no schema version"
            )
        return SchemaState(exists=True, revision=None, head=head)
    if revision == head:
        return SchemaState(exists=True, revision=revision, head=head)
    from alembic.script import ScriptDirectory

    script = ScriptDirectory.from_config(alembic_config())
    try:
        script.get_revision(revision)
    except Exception:  # alembic raises several kinds for an unknown revision
        if "photo" not in tables:
            raise DatabaseCorrupt(
                f"{where} is not a phototag database: unknown schema version {revision}"
            ) from None
        raise DatabaseTooNew(
            f"database {where} is at revision {revision}, newer than this phototag "
            f"(head {head}); upgrade phototag"
        ) from None
    return SchemaState(exists=True, revision=revision, head=head)


def check(engine: Engine) -> None:
    """Raise unless the database exists and is exactly at this code's schema version."""
    where = describe(engine)
    current = state(engine)
    how = "run `phototag db upgrade` or `phototag index PATH` to create it"
    if not current.exists:
        raise DatabaseMissing(f"no database at {where}; {how}")
    if current.revision is None:
        raise DatabaseMissing(f"database {where} is empty; {how}")
    if not current.at_head:
        raise DatabaseOutdated(
            f"database {where} is at revision {current.revision}, older than this phototag "
            f"(head {current.head}); run `phototag db upgrade`"
        )


def upgrade(engine: Engine, *, backup: bool = False) -> Path | None:
    """Bring the database to the newest schema (creating it if empty); a no-op when current.

    With ``backup`` (the daemon uses it), an existing SQLite database that needs upgrading is
    first copied with sqlite3's online backup API next to itself; the copy's path is returned.
    Raises DatabaseCorrupt / DatabaseTooNew rather than touch a database it does not understand.
    """
    current = state(engine)
    try:
        ensure_wal(engine)
    except sqlalchemy.exc.DBAPIError as e:
        raise DatabaseError(error_message(engine, e)) from e
    if current.at_head:
        return None
    path = sqlite_path(engine)
    backup_path = None
    if backup and path is not None and current.revision is not None:
        backup_path = backup_sqlite(path, current.revision)
        log.info("backed up %s to %s before upgrading", path, backup_path)
    try:
        _run_upgrade(engine)
    except sqlalchemy.exc.DBAPIError as e:
        raise DatabaseError(error_message(engine, e)) from e
    log.info("database %s upgraded from %s to %s", describe(engine),
             current.revision or "empty", current.head)
    return backup_path


def _run_upgrade(engine: Engine) -> None:
    """Run ``alembic upgrade head`` in one write transaction.

    SQLite's batch migrations copy a table, drop the old one and rename the copy; with foreign
    keys on, dropping ``photo`` would cascade-delete every photo_tag row. The pragma only works
    outside a transaction, so it is switched off first and the references are checked at the end.
    """
    from alembic import command

    sqlite = engine.dialect.name == "sqlite"
    with engine.connect() as connection:
        if sqlite:
            connection.connection.driver_connection.execute("PRAGMA foreign_keys = OFF")
        try:
            connection = connection.execution_options(**write_options())
            with connection.begin():
                command.upgrade(alembic_config(connection), "head")
                if sqlite:
                    broken = connection.execute(text("PRAGMA foreign_key_check")).fetchall()
                    if broken:
                        raise DatabaseCorrupt(
                            f"{describe(engine)}: upgrade left {len(broken)} broken references "
                            f"(first: {tuple(broken[0])}); nothing was changed"
                        )
        finally:
            if sqlite:
                connection.connection.driver_connection.execute("PRAGMA foreign_keys = ON")


def backup_sqlite(path: Path, revision: str) -> Path:
    """Copy a live SQLite database consistently (WAL included) to ``<name>.<revision>-<time>.bak``."""
    stamp = time.strftime("%Y%m%dT%H%M%S")
    target = path.with_name(f"{path.name}.{revision}-{stamp}.bak")
    source = sqlite3.connect(path)  # only read: the backup API copies pages, WAL included
    try:
        destination = sqlite3.connect(target)
        try:
            source.backup(destination)
        finally:
            destination.close()
    finally:
        source.close()
    return target


def open_for_read(url: str) -> Engine:
    """An engine on an existing, current database; raises DatabaseError subclasses otherwise."""
    engine = make_engine(url)
    try:
        check(engine)
    except BaseException:
        engine.dispose()
        raise
    return engine


def open_for_write(url: str, *, backup: bool = False) -> Engine:
    """An engine on a database that is created or upgraded first (its folder too)."""
    path = sqlite_path(url)
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise DatabaseError(f"cannot create {path.parent}: {e.strerror}") from None
    engine = make_engine(url)
    try:
        upgrade(engine, backup=backup)
    except BaseException:
        engine.dispose()
        raise
    return engine
