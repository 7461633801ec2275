"""``phototag index PATH...``: scan folders, tag new and changed photos, drop deleted ones."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from daemon.cli import EX_CONFIG, EX_USAGE, App, fail, pass_app

EX_INTERRUPTED = 130


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
    from tqdm import tqdm

    from daemon import indexer
    from storage.db import DatabaseError
    from storage.migrate import open_for_write
    from tagger.backbones import ModelError

    config = app.config
    tagger = _load_tagger(config, model)  # before touching the database: fails fast, exit 78
    try:
        engine = open_for_write(app.db_url)
    except DatabaseError as e:
        fail(str(e))

    bar: tqdm | None = None

    def progress(total: int):
        nonlocal bar
        bar = tqdm(total=total, unit="photo", desc="tagging", file=sys.stderr,
                   disable=not sys.stderr.isatty(), dynamic_ncols=True, smoothing=0.1)
        return bar.update

    def warn(message: str) -> None:
        tqdm.write(f"phototag: warning: {message}", file=sys.stderr)

    try:
        summary = indexer.index_folders(engine, tagger, paths, config, warn=warn,
                                        progress=progress)
    except DatabaseError as e:
        fail(str(e))
    except ModelError as e:  # weights there but unusable: found when the model is loaded
        fail(str(e), EX_CONFIG)
    except KeyboardInterrupt:
        if bar is not None:
            bar.close()
        click.echo("phototag: interrupted; run the same command again to continue", err=True)
        sys.exit(EX_INTERRUPTED)
    finally:
        engine.dispose()
    if bar is not None:
        bar.close()
    click.echo(f"indexed: {summary.line()}")


def _load_tagger(config, model: str | None):
    """Check the model named by config/--model; missing weights or bad labels exit EX_CONFIG."""
    from daemon import indexer
    from tagger.backbones import ModelError, UnknownModelError
    from tagger.labels import LabelMapError

    try:
        return indexer.LazyTagger(config, model)
    except UnknownModelError as e:
        fail(str(e), EX_USAGE if model else EX_CONFIG)
    except (ModelError, LabelMapError) as e:  # missing or bad weights, bad label mapping
        fail(str(e), EX_CONFIG)
