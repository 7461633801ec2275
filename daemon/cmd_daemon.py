"""``phototag daemon`` (watch and tag, for systemd) and ``phototag retag`` (re-tag on demand)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from daemon.cli import App, pass_app
from daemon.cmd_support import lazy_tagger_or_exit, tagging_run
from daemon.filenames import StorablePath


@click.command("daemon")
@click.option("--album", "albums", multiple=True, metavar="PATH",
              type=StorablePath(exists=True, file_okay=False, path_type=Path),
              help="Watch this folder instead of the config's albums (repeatable).")
@click.option("--model", metavar="NAME", help="Model to tag with (default: config [model] name).")
@pass_app
def daemon(app: App, albums: tuple[Path, ...], model: str | None) -> None:
    """Watch the albums and tag new photos as they arrive (runs in the foreground).

    At start it upgrades the database (after a backup), rescans the albums and tags what is
    pending; a nightly job re-tags outdated and failed photos. SIGTERM stops it cleanly, SIGHUP
    reloads the configuration. Made to run under systemd (see systemd/phototag.service).
    """
    from daemon.notify import setup_logging
    from daemon.service import Options, run_daemon

    setup_logging(app.verbose)
    options = Options(config_path=app.config_path, db_url=app.db_url, albums=albums, model=model)
    sys.exit(run_daemon(app.config, options))


@click.command("retag")
@click.option("--outdated", is_flag=True,
              help="Photos tagged by another model or label-mapping version.")
@click.option("--errors", is_flag=True, help="Photos that failed, without waiting for their retry.")
@click.option("--all", "everything", is_flag=True, help="Every photo.")
@click.option("--model", metavar="NAME", help="Model to tag with (default: config [model] name).")
@click.argument("path", required=False,
                type=StorablePath(exists=True, file_okay=False, path_type=Path))
@pass_app
def retag(app: App, outdated: bool, errors: bool, everything: bool, model: str | None,
          path: Path | None) -> None:
    """Re-tag photos now (inside PATH if given): by default the outdated and failed ones.

    The same work the daemon's nightly job queues, done in the foreground with a progress bar.
    Their current tags stay searchable until the new ones replace them. Safe to interrupt.
    """
    from daemon.worker import Selection, retag as retag_photos

    given_up = errors  # photos given up on come back only when --errors asks for them
    if not (outdated or errors or everything):
        outdated = errors = True
    selection = Selection(outdated=outdated, errors=errors, given_up=given_up,
                          everything=everything)
    config = app.config
    tagger = lazy_tagger_or_exit(config, model)  # before touching the database: fails fast
    with tagging_run(app.db_url, "re-tagging", "the photos not done yet stay queued") as (
            engine, progress):
        summary = retag_photos(engine, tagger, selection,
                               folder=str(path) if path is not None else None,
                               retry_after=config.daemon.retry_after, warn=progress.warn,
                               progress=progress.start)
    click.echo(f"re-tagged {selection.describe()}: {summary.tagged} tagged, {summary.failed} "
               f"failed, {summary.moved} moved")
