"""``phototag write-tags [PATH]``: write the tags of the library (or of PATH) into the photos'
XMP sidecars or embedded XMP, where photo tools (digiKam, darktable, Lightroom, exiftool) read
them. Never imports torch.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import click

from daemon.cli import App, fail, pass_app
from daemon.cmd_support import Progress, interrupted, open_db_for_write_or_exit
from daemon.filenames import StorablePath


@click.command("write-tags")
@click.argument("path", required=False,
                type=StorablePath(exists=True, path_type=Path))
@click.option("--mode", type=click.Choice(["sidecar", "embedded"]),
              help="Where to write (default: config [metadata] write).")
@click.option("--dry-run", is_flag=True, help="Print what would be written; write nothing.")
@pass_app
def write_tags(app: App, path: Path | None, mode: str | None, dry_run: bool) -> None:
    """Write phototag's tags as keywords of every tagged photo (or those under PATH).

    A re-run replaces only the keywords phototag wrote before; keywords set by the user or other
    tools stay. A photo that changed since it was tagged is skipped: index it again first.
    """
    from daemon import keyword_sync
    from storage.db import DatabaseError, read_session

    if not app.verbose:  # per-file notes ("XPKeywords skipped: no EXIF block") only with -v
        logging.getLogger("storage.keywords").setLevel(logging.WARNING)
    config = app.config
    mode = mode or config.metadata.write
    if mode == keyword_sync.OFF:
        fail("keyword writing is off: pass --mode sidecar|embedded, "
             "or set [metadata] write in the config")
    sidecar_name = config.metadata.sidecar_name
    engine = open_db_for_write_or_exit(app.db_url)
    broader = _broader_order(config)
    progress = Progress("writing")
    try:
        with read_session(engine) as session:
            ids = keyword_sync.selected_photo_ids(session, path)
            if dry_run:
                _print_plan(keyword_sync.load_targets(session, ids, broader), mode,
                            sidecar_name)
                click.echo(f"dry run: {len(ids)} photos would be written")
                return
        summary = keyword_sync.write_photos(
            engine, ids, mode=mode, sidecar_name=sidecar_name, broader=broader,
            warn=lambda line: progress.echo(f"phototag: {line}"),
            advance=progress.start(len(ids)))
    except DatabaseError as e:
        fail(str(e))
    except KeyboardInterrupt:  # each photo is written and recorded whole, or not at all
        interrupted(progress, "photos written so far keep their keywords")
    finally:
        progress.close()
        engine.dispose()
    click.echo(f"keywords: {summary.line()} ({mode})")
    if summary.failed:
        sys.exit(1)


def _broader_order(config) -> dict[str, tuple[str, ...]] | None:
    """The label mapping's order of broader tags (a tag's main one first) for the tag paths;
    without it (a broken user label file) paths follow the database's hierarchy alone."""
    from daemon import keyword_sync
    from tagger.labels import LabelMapError, load_label_map  # pure Python: no torch

    try:
        return keyword_sync.broader_order(load_label_map(config.labels.file).all_tags())
    except (LabelMapError, OSError) as e:
        click.echo(f"phototag: warning: {e}; tag paths follow the database alone", err=True)
        return None


def _print_plan(targets, mode: str, sidecar_name: str) -> None:
    from storage.keywords import EMBEDDED, normalize_tags, sidecar_path

    for t in targets:
        embedded = mode == EMBEDDED and _is_jpeg(t.path)
        file = t.path if embedded else sidecar_path(t.path, sidecar_name)
        try:
            shown = ", ".join(p.lightroom for p in normalize_tags(t.keywords))
        except ValueError as e:
            shown = f"(not writable: {e})"
        click.echo(f"{t.path} -> {file}: {shown}")


def _is_jpeg(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(3) == b"\xff\xd8\xff"
    except OSError:
        return False
