"""``phototag db``: the database itself (its location, its schema version)."""

from __future__ import annotations

import logging

import click

from daemon.cli import App, fail, pass_app


@click.group("db")
def db() -> None:
    """Database maintenance."""


@db.command("upgrade")
@click.option("--backup/--no-backup", default=True, show_default=True,
              help="Copy an existing SQLite database next to itself before changing it.")
@pass_app
def upgrade(app: App, backup: bool) -> None:
    """Create the database, or bring it to this phototag's schema."""
    from storage.db import DatabaseError, describe, make_engine, sqlite_path
    from storage.migrate import state
    from storage.migrate import upgrade as run_upgrade

    url = app.db_url
    path = sqlite_path(url)
    if not app.verbose:  # this command says what the migration's INFO lines would say
        logging.getLogger("storage.migrate").setLevel(logging.WARNING)
    try:
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
        engine = make_engine(url)
        try:
            before = state(engine)
            copy = run_upgrade(engine, backup=backup)
        finally:
            engine.dispose()
    except DatabaseError as e:
        fail(str(e))
    except OSError as e:
        fail(f"cannot create {path.parent}: {e.strerror}")
    where = describe(url)
    if before.at_head:
        click.echo(f"database {where} is up to date (revision {before.head})")
        return
    if copy is not None:
        click.echo(f"backed up {where} to {copy}")
    click.echo(f"database {where} upgraded from {before.revision or 'empty'} to {before.head}")


@db.command("path")
@pass_app
def path(app: App) -> None:
    """Print where the database is (its file, or its URL without the password)."""
    from storage.db import describe

    click.echo(describe(app.db_url))
