"""``phototag index PATH...``: scan folders, tag new and changed photos, drop deleted ones."""

from __future__ import annotations

from pathlib import Path

import click

from daemon.cli import EX_CONFIG, App, fail, pass_app
from daemon.cmd_support import Progress, interrupted, lazy_tagger_or_exit, open_db_for_write_or_exit


@click.command("index")
@click.argument("paths", nargs=-1, required=True,
                type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--model", metavar="NAME", help="Model to tag with (default: config [model] name).")
@pass_app
def index(app: App, paths: tuple[Path, ...], model: str | None) -> None:
    """Index the photos in PATH... (recursively) and tag the new and changed ones.

    Safe to interrupt: the next run continues where this one stopped. Unchanged files are
    never tagged again; moved or renamed files keep their tags.
    """
    from daemon import indexer
    from storage.db import DatabaseError
    from tagger.backbones import ModelError

    config = app.config
    tagger = lazy_tagger_or_exit(config, model)  # before touching the database: fails fast
    engine = open_db_for_write_or_exit(app.db_url)
    progress = Progress("tagging")
    try:
        summary = indexer.index_folders(engine, tagger, paths, config, warn=progress.warn,
                                        progress=progress.start)
    except DatabaseError as e:
        fail(str(e))
    except ModelError as e:  # weights there but unusable: found when the model is loaded
        fail(str(e), EX_CONFIG)
    except KeyboardInterrupt:
        interrupted(progress, "run the same command again to continue")
    finally:
        progress.close()
        engine.dispose()
    click.echo(f"indexed: {summary.line()}")
