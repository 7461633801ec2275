"""Engine and sessions: the only place that knows SQLite needs special care.

SQLite in WAL mode lets readers run alongside one writer, but a *deferred* transaction that reads
and then writes fails at once with "database is locked" when another connection committed in
between, whatever the busy timeout (SQLite cannot upgrade a stale read snapshot). So writers here
start with ``BEGIN IMMEDIATE``, which takes the write lock up front and waits for it under the busy
timeout, and readers use a plain ``BEGIN``. pysqlite's own implicit BEGIN is switched off, as
SQLAlchemy's pysqlite documentation describes, so that SQLAlchemy emits ours.

Any other database URL (PostgreSQL) is used as it is.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import sqlalchemy.exc
from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.engine import make_url

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

log = logging.getLogger(__name__)

BUSY_TIMEOUT_SECONDS = 30.0
# Read-only commands let SQLite read the database through a memory map of up to this size instead
# of read() calls into its small page cache: a search's first query in a fresh process runs about
# twice as fast. (Not for the daemon: mapped pages count towards its resident memory.)
MMAP_BYTES = 256 * 2**20

# Connection execution option that makes our begin hook emit BEGIN IMMEDIATE.
_WRITE_OPTION = "phototag_write"


class DatabaseError(Exception):
    """The database cannot be used; the message is one line fit for the user."""


def sqlite_path(engine_or_url: Engine | str) -> Path | None:
    """The database file of an SQLite URL; None for other databases and in-memory SQLite."""
    url = engine_or_url.url if isinstance(engine_or_url, Engine) else make_url(engine_or_url)
    if url.get_backend_name() != "sqlite" or not url.database or url.database == ":memory:":
        return None
    if url.database.startswith("file:"):  # URI filename: sqlite:///file:path?mode=...&uri=true
        return Path(url.database[len("file:"):])
    return Path(url.database)


def describe(engine_or_url: Engine | str) -> str:
    """What to call the database in messages: its file, or its URL without the password."""
    path = sqlite_path(engine_or_url)
    if path is not None:
        return str(path)
    url = engine_or_url.url if isinstance(engine_or_url, Engine) else make_url(engine_or_url)
    return url.render_as_string(hide_password=True)


def make_engine(url: str) -> Engine:
    """An engine for ``url``; SQLite gets WAL, a busy timeout, foreign keys and our BEGINs."""
    engine = create_engine(url)
    if engine.dialect.name == "sqlite":
        _configure_sqlite(engine)
    return engine


def _configure_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection, _record) -> None:
        # Autocommit at the driver level: pysqlite emits no BEGIN of its own, we do (below).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_SECONDS * 1000)}")
            cursor.execute("PRAGMA foreign_keys = ON")
            cursor.execute("PRAGMA synchronous = NORMAL")
            # WAL is set once, in the file, by storage.migrate: a connection must not rewrite
            # the header of a file that may not even be ours.
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection) -> None:
        if connection.get_execution_options().get(_WRITE_OPTION):
            connection.exec_driver_sql("BEGIN IMMEDIATE")
        else:
            connection.exec_driver_sql("BEGIN")


def ensure_wal(engine: Engine) -> None:
    """Switch an SQLite database file to WAL mode (persistent); a no-op for other databases."""
    if sqlite_path(engine) is None:
        return
    with engine.connect() as connection:
        driver = connection.connection.driver_connection  # outside any transaction
        if driver.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
            mode = driver.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if mode.lower() != "wal":
                raise DatabaseError(f"database {describe(engine)}: cannot switch to WAL mode "
                                    f"(got {mode}); is it on a network file system?")


def write_options() -> dict:
    """Execution options for a connection that will write (``engine.connect().execution_options``).

    ``write_session`` uses them; code that works on a bare Connection (migrations) can too.
    """
    return {_WRITE_OPTION: True}


def refresh_statistics(engine: Engine) -> None:
    """Let the database gather the statistics its query planner picks plans by (``ANALYZE``).

    SQLite has none until asked, and without them it plans some searches worse (measured in
    ``benchmarks/bench_search.py``). Run after ``phototag index`` and the nightly job; about
    half a second for 200,000 photos, readers not blocked. A failure (the database busy past
    the timeout, a full disk) is logged, not raised: the statistics only make searches faster.
    """
    try:
        with _translate_errors(engine), engine.connect() as connection:
            connection.execution_options(**write_options())
            connection.exec_driver_sql("ANALYZE")
            connection.commit()
    except DatabaseError as e:
        log.warning("search statistics not refreshed: %s", e)


@contextmanager
def read_connection(engine: Engine) -> Iterator[Connection]:
    """A Core connection in one read transaction (a consistent snapshot); rolled back at the end.

    What the read-only commands use: no ORM (importing it is a sixth of their start-up).
    """
    with _translate_errors(engine), engine.connect() as connection:
        if engine.dialect.name == "sqlite":  # per connection, outside any transaction
            connection.connection.driver_connection.execute(f"PRAGMA mmap_size = {MMAP_BYTES}")
        connection.begin()
        yield connection  # leaving connect() rolls the read transaction back


@contextmanager
def read_session(engine: Engine) -> Iterator[Session]:
    """A session in one read transaction (a consistent snapshot); rolled back at the end."""
    from sqlalchemy.orm import Session

    with _translate_errors(engine), Session(engine, expire_on_commit=False) as session:
        try:
            yield session
        finally:
            session.rollback()


@contextmanager
def write_session(engine: Engine) -> Iterator[Session]:
    """A session in one write transaction, committed on success and rolled back on error.

    On SQLite it starts with BEGIN IMMEDIATE, so it waits (up to the busy timeout) for another
    writer instead of failing. Keep it short: never run the model inside it.
    """
    from sqlalchemy.orm import Session

    with _translate_errors(engine), Session(engine, expire_on_commit=False) as session:
        session.connection(execution_options=write_options())  # begins the transaction now
        try:
            yield session
            session.commit()
        except BaseException:
            session.rollback()
            raise


@contextmanager
def _translate_errors(engine: Engine) -> Iterator[None]:
    """Turn the driver's operational errors (locked, corrupt, disk full) into DatabaseError."""
    try:
        yield
    except sqlalchemy.exc.IntegrityError:
        raise  # a bug or a race for the caller to handle, not a broken database
    except sqlalchemy.exc.DBAPIError as e:
        raise DatabaseError(error_message(engine, e)) from e


def error_message(engine: Engine, error: sqlalchemy.exc.DBAPIError) -> str:
    """A one-line message for a driver error, naming the database."""
    reason = str(error.orig).strip().splitlines()[0] if error.orig is not None else str(error)
    where = describe(engine)
    if "database is locked" in reason or "database is busy" in reason:
        return (f"database {where} is locked: another process held it for more than "
                f"{BUSY_TIMEOUT_SECONDS:.0f} s")
    return f"database {where}: {reason}"
