"""The ``phototag`` command line: a click group whose commands live in ``daemon/cmd_*.py``.

Commands are imported only when invoked (click's documented "lazy group" pattern), and command
modules import torch, watchdog and the like inside the command function, so that the read-only
commands (search, tags, show, status) start fast and never load torch.
"""

from __future__ import annotations

import importlib
import logging
import sys
from typing import NoReturn
from dataclasses import dataclass, field
from functools import cached_property

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



# command name -> "module:attribute" of its click command
COMMANDS = {
    "classify": "daemon.cmd_classify:classify",
    "index": "daemon.cmd_index:index",
    "search": "daemon.cmd_search:search",
    "tags": "daemon.cmd_search:tags",
    "show": "daemon.cmd_search:show",
    "status": "daemon.cmd_search:status",
    "retag": "daemon.cmd_daemon:retag",
    "daemon": "daemon.cmd_daemon:daemon",
    "write-tags": "daemon.cmd_write_tags:write_tags",
    "bench": "daemon.cmd_bench:bench",
    "model": "daemon.cmd_model:model",
    "db": "daemon.cmd_db:db",
}


class LazyGroup(click.Group):
    """A group that imports a command's module only when that command is run or listed."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        module_name, attribute = COMMANDS[name].split(":")
        return getattr(importlib.import_module(module_name), attribute)


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
    ctx.obj = App(config_path=config_path, db_override=db_override, verbose=verbose)


pass_app = click.make_pass_decorator(App)
