"""``phototag index PATH...``: scan folders, tag new and changed photos, drop deleted ones."""

from __future__ import annotations

from pathlib import Path

import click

from daemon.cli import App, pass_app
from daemon.cmd_support import lazy_tagger_or_exit, tagging_run
from daemon.filenames import StorablePath


@click.command("index")
@click.argument("paths", nargs=-1, required=True,
                type=StorablePath(exists=True, file_okay=False, path_type=Path))
@click.option("--model", metavar="NAME", help="Model to tag with (default: config [model] name).")
@pass_app
def index(app: App, paths: tuple[Path, ...], model: str | None) -> None:
    """Index the photos in PATH... (recursively) and tag the new and changed ones.

    Safe to interrupt: the next run continues where this one stopped. Unchanged files are
    never tagged again; moved or renamed files keep their tags.
    """
    from daemon import indexer

    config = app.config
    tagger = lazy_tagger_or_exit(config, model)  # before touching the database: fails fast
    with tagging_run(app.db_url, "tagging", "run the same command again to continue") as (
            engine, progress):
        summary = indexer.index_folders(engine, tagger, paths, config, warn=progress.warn,
                                        progress=progress.start)
    click.echo(f"indexed: {summary.line()}")
