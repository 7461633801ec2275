"""File names the database can hold.

The database stores paths as UTF-8 text. A name written in another encoding (Latin-1 from an old
Windows share, say) decodes to lone surrogates (os.fsdecode) that it cannot hold: such photos are
skipped with a warning, and such a path on the command line is refused, until renamed.
"""

from __future__ import annotations

import os

import click

NOT_UTF8 = "its name is not UTF-8, which phototag cannot index; rename it"


def storable_name(name: str | os.PathLike) -> bool:
    """Whether a file name or path (as os.fsdecode gives it) is valid UTF-8."""
    try:
        os.fsdecode(name).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def shown(path: str | os.PathLike) -> str:
    """``path`` fit for a message: an undecodable byte shows as ``\\xe9``."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


class StorablePath(click.Path):
    """A ``click.Path`` that also refuses a path that is not UTF-8 (a usage error)."""

    def convert(self, value, param, ctx):
        value = super().convert(value, param, ctx)
        if not storable_name(value):
            self.fail(f"{shown(value)}: {NOT_UTF8}", param, ctx)
        return value
