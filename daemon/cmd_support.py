"""What the commands that tag or write share: the model check, the database, the progress bar.

Everything heavy is imported inside the functions, like in the command modules themselves.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import click

from daemon.cli import EX_CONFIG, EX_USAGE, fail

if TYPE_CHECKING:
    from sqlalchemy import Engine

    from daemon.config import Config
    from daemon.indexer import LazyTagger

EX_INTERRUPTED = 130  # like a shell after Ctrl-C


def lazy_tagger_or_exit(config: Config, model: str | None) -> LazyTagger:
    """Check the model named by ``--model`` or the config before touching the database.

    An unknown ``--model`` is a usage error (2); missing or bad weights and a bad label mapping
    are configuration errors (78), which systemd does not restart on.
    """
    from daemon.indexer import LazyTagger
    from tagger.backbones import ModelError, UnknownModelError
    from tagger.labels import LabelMapError

    try:
        return LazyTagger(config, model)
    except UnknownModelError as e:
        fail(str(e), EX_USAGE if model else EX_CONFIG)
    except (ModelError, LabelMapError) as e:
        fail(str(e), EX_CONFIG)


def open_db_for_write_or_exit(url: str) -> Engine:
    """The database, created or upgraded as needed; a database problem is a one-line error."""
    from storage.db import DatabaseError
    from storage.migrate import open_for_write

    try:
        return open_for_write(url)
    except DatabaseError as e:
        fail(str(e))


class Progress:
    """A tqdm bar on stderr (count, rate, ETA), silent when stderr is not a terminal.

    Warnings are printed above the bar so that it is not torn apart.
    """

    def __init__(self, desc: str) -> None:
        self.desc = desc
        self.bar = None

    def start(self, total: int) -> Callable[[int], object]:
        from tqdm import tqdm

        self.close()
        self.bar = tqdm(total=total, unit="photo", desc=self.desc, file=sys.stderr,
                        disable=not sys.stderr.isatty(), dynamic_ncols=True, smoothing=0.1)
        return self.bar.update

    def echo(self, line: str) -> None:
        from tqdm import tqdm

        tqdm.write(line, file=sys.stderr)

    def warn(self, message: str) -> None:
        self.echo(f"phototag: warning: {message}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def interrupted(progress: Progress, what_next: str) -> None:
    """Ctrl-C: close the bar, say what happens to the work not done, exit 130."""
    progress.close()
    click.echo(f"phototag: interrupted; {what_next}", err=True)
    sys.exit(EX_INTERRUPTED)


@contextmanager
def tagging_run(db_url: str, desc: str, on_interrupt: str) -> Iterator[tuple[Engine, Progress]]:
    """The database and a progress bar for a command that tags (index, retag), and its failures
    as one-line errors: a database problem or a folder outside the albums exits 1, weights that
    turn out unusable when the model loads exit 78, Ctrl-C exits 130 saying ``on_interrupt``
    (what becomes of the photos not done)."""
    from daemon.worker import NotIndexedError
    from storage.db import DatabaseError
    from tagger.backbones import ModelError

    engine = open_db_for_write_or_exit(db_url)
    progress = Progress(desc)
    try:
        yield engine, progress
    except (DatabaseError, NotIndexedError) as e:
        fail(str(e))
    except ModelError as e:
        fail(str(e), EX_CONFIG)
    except KeyboardInterrupt:
        interrupted(progress, on_interrupt)
    finally:
        progress.close()
        engine.dispose()
