"""The ``phototag`` command line: a click group whose commands live in ``daemon/cmd_*.py``.

Commands are imported only when invoked (click's documented "lazy group" pattern), and command
modules import torch, watchdog and the like inside the command function, so that the read-only
commands (search, tags, show, status) start fast and never load torch.
"""

from __future__ import annotations

import atexit
import gc
import importlib
import logging
import sys
import warnings
from dataclasses import dataclass, field
from functools import cached_property
from typing import NoReturn

import click

from daemon.config import Config, ConfigError, database_url, load_config

EX_USAGE = 2
EX_CONFIG = 78  # sysexits.h EX_CONFIG; systemd's RestartPreventExitStatus= names it


@dataclass
class App:
    """What every command shares: the global options, and the config read once on first use."""

    config_path: str | None = None
    db_override: str | None = None
    verbose: bool = False
    _config: Config | None = field(default=None, repr=False)

    @property
    def config(self) -> Config:
        if self._config is None:
            try:
                self._config = load_config(self.config_path)
            except ConfigError as e:
                fail(str(e), EX_CONFIG)
        return self._config

    @cached_property
    def db_url(self) -> str:
        return database_url(self.config, self.db_override)


def fail(message: str, code: int = 1) -> NoReturn:
    """Print a one-line error on stderr and exit with ``code``."""
    click.echo(f"phototag: error: {message}", err=True)
    sys.exit(code)



# command name -> ("module:attribute" of its click command, its short help for `phototag --help`).
# The help is kept here so that listing the commands imports none of them (a test checks that it
# equals each command's own short help).
COMMANDS: dict[str, tuple[str, str]] = {
    "classify": ("daemon.cmd_classify:classify",
                 "Tag FILE... and print the top classes and tags with their confidences."),
    "index": ("daemon.cmd_index:index", "Index the photos in PATH..."),
    "search": ("daemon.cmd_search:search",
               "Find photos by tag, score, path and date; print their paths."),
    "tags": ("daemon.cmd_search:tags",
             "List tags with the number of photos tagged with each (most first)."),
    "show": ("daemon.cmd_search:show",
             "Show one photo's tags and scores, status and the model that tagged it."),
    "status": ("daemon.cmd_search:status",
               "Show the library: photos per status, queue, errors, database, models in use."),
    "retag": ("daemon.cmd_daemon:retag",
              "Re-tag photos now (inside PATH if given): by default the outdated and failed ones."),
    "daemon": ("daemon.cmd_daemon:daemon",
               "Watch the albums and tag new photos as they arrive (runs in the foreground)."),
    "write-tags": ("daemon.cmd_write_tags:write_tags",
                   "Write phototag's tags as keywords of every tagged photo (or those under PATH)."),
    "bench": ("daemon.cmd_bench:bench",
              "Time every model x precision x runtime on FOLDER's photos (default: generated 12 MP JPEGs)."),
    "model": ("daemon.cmd_model:model", "Download, import and list model weights."),
    "db": ("daemon.cmd_db:db", "Database maintenance."),
}


# Short-lived commands that only read the database. Python's cyclic garbage collector is pure cost
# for them: it runs again and again while SQLAlchemy's import builds its many thousand objects,
# and once more over all of them at exit. Without it they start ~0.1 s faster; their memory is
# still freed by reference counting.
READ_ONLY_COMMANDS = frozenset({"search", "tags", "show", "status"})


class LazyGroup(click.Group):
    """A group that imports a command's module only when that command is run."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        module_name, attribute = COMMANDS[name][0].split(":")
        return getattr(importlib.import_module(module_name), attribute)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """The command list of --help, from COMMANDS (click's own would import every command)."""
        limit = formatter.width - 6 - max(len(name) for name in COMMANDS)
        # A bare Command shortens the text exactly as the real command would its docstring.
        rows = [(name, click.Command(name, help=short_help).get_short_help_str(limit))
                for name, (_, short_help) in COMMANDS.items()]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", "config_path", metavar="FILE", envvar="PHOTOTAG_CONFIG",
              help="Config file (default: $PHOTOTAG_CONFIG, the user's, then /etc/phototag/config.toml).")
@click.option("--db", "db_override", metavar="URL|PATH", envvar="PHOTOTAG_DB",
              help="Database: an SQLite file or SQLAlchemy URL (default: $PHOTOTAG_DB, config, data dir).")
@click.option("-v", "--verbose", is_flag=True, help="Log debug messages.")
@click.version_option(package_name="phototag")
@click.pass_context
def main(ctx: click.Context, config_path: str | None, db_override: str | None, verbose: bool) -> None:
    """Auto-tag a photo library and search it from the shell."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # Alembic's chatter ("Context impl SQLiteImpl.", "Will assume transactional DDL.") is for
    # -v only; storage.migrate quiets it otherwise.
    if verbose:
        logging.getLogger("alembic").setLevel(logging.INFO)
    else:
        # Pillow's warnings about an odd file (huge, a damaged EXIF block) name no file and span
        # two lines; what matters is reported as the photo's own one-line error instead.
        warnings.filterwarnings("ignore", module=r"PIL\.")
    ctx.obj = App(config_path=config_path, db_override=db_override, verbose=verbose)
    if ctx.invoked_subcommand in READ_ONLY_COMMANDS:
        gc.disable()
        ctx.call_on_close(gc.enable)  # for callers that go on in this process (tests, scripts)
        atexit.register(gc.freeze)  # and nothing left for the collector at interpreter exit


pass_app = click.make_pass_decorator(App)
