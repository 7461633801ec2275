"""Read-only commands: ``search``, ``tags``, ``show``, ``status``.

They open the database with ``open_for_read`` (never creating or upgrading it) and must never import
torch or the tagger; storage and SQLAlchemy are imported inside the commands so that merely
listing commands stays fast.

Exit codes: 0 success (also when nothing matched), 1 unknown tag / file not indexed / database
problem, 2 malformed query or options.
"""

from __future__ import annotations

import json
import os
import string
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from itertools import islice
from typing import TYPE_CHECKING, Any, Self

import click

from daemon.cli import EX_USAGE, App, fail, pass_app
from daemon.filenames import StorablePath

if TYPE_CHECKING:
    from sqlalchemy import Connection

# Fields of ``search --format``; documented in the README and the --help text.
FORMAT_FIELDS = {
    "path": "absolute path",
    "relpath": "path relative to its album root",
    "root": "album root folder",
    "name": "file name",
    "date": "taken date YYYY-MM-DD ('' if unknown)",
    "taken_at": "taken date and time YYYY-MM-DD HH:MM:SS ('' if unknown)",
    "score": "best score among the tags the query matched (a float; 0.0 if none)",
    "tags": "the photo's tags, best first, comma-separated",
    "status": "pending, tagged or error",
    "id": "database id",
}


@contextmanager
def _connection(app: App) -> Iterator[Connection]:
    """A read transaction on the existing database, SQLAlchemy Core only (the ORM's import would
    be a sixth of the start-up); a missing/too-new/corrupt database exits 1."""
    from storage.db import DatabaseError, read_connection
    from storage.migrate import open_for_read

    try:
        engine = open_for_read(app.db_url)
    except DatabaseError as e:
        fail(str(e), 1)
    try:
        with read_connection(engine) as connection:
            yield connection
    except DatabaseError as e:
        fail(str(e), 1)
    finally:
        engine.dispose()


class _Output:
    """Binary stdout for results, in chunks of a thousand lines: one write per chunk, not per
    line, even when Python's output is unbuffered (PYTHONUNBUFFERED=1, as in some service
    environments). Paths are written as the bytes they have on disk (os.fsencode).

    Use as ``with _Output() as out:``; ``phototag search cat | head`` ends quietly when head
    stops reading.
    """

    CHUNK = 1000

    def __init__(self) -> None:
        self.stream = sys.stdout.buffer
        self._pending: list[bytes] = []

    def write(self, text: str) -> None:
        self._add(text.encode("utf-8", "surrogateescape"))

    def write_paths(self, paths: Iterable[str], end: str) -> None:
        """Each path followed by ``end``, encoded as os.fsencode does, a chunk at a time
        (encoding each line on its own took a quarter of printing 100k paths)."""
        encoding, errors = sys.getfilesystemencoding(), sys.getfilesystemencodeerrors()
        paths = iter(paths)
        while chunk := list(islice(paths, self.CHUNK)):
            self._add((end.join(chunk) + end).encode(encoding, errors))
            self.flush()

    def _add(self, data: bytes) -> None:
        self._pending.append(data)
        if len(self._pending) >= self.CHUNK:
            self.flush()

    def flush(self) -> None:
        self.stream.write(b"".join(self._pending))
        self._pending.clear()
        self.stream.flush()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, kind, error, _traceback) -> bool:
        try:
            if error is None:
                self.flush()
                return False
            if not isinstance(error, BrokenPipeError):
                return False
        except BrokenPipeError:
            pass
        # The reader went away: stop quietly, and keep Python's final flush from failing too.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        sys.exit(0)


def _unescape(fmt: str) -> str:
    r"""``\t``, ``\n``, ``\0`` and ``\\`` in a --format string, as typed in single quotes."""
    out, i = [], 0
    table = {"t": "\t", "n": "\n", "0": "\0", "\\": "\\"}
    while i < len(fmt):
        if fmt[i] == "\\" and i + 1 < len(fmt) and fmt[i + 1] in table:
            out.append(table[fmt[i + 1]])
            i += 2
        else:
            out.append(fmt[i])
            i += 1
    return "".join(out)


def _format_fields(fmt: str) -> set[str]:
    """The field names a --format string uses; bad syntax or unknown fields exit 2."""
    try:
        names = {name for _, name, _, _ in string.Formatter().parse(fmt) if name is not None}
    except ValueError as e:
        fail(f"--format {fmt!r}: {e}", EX_USAGE)
    for name in names:
        if name not in FORMAT_FIELDS:
            shown = name or "{}"
            fail(f"--format: unknown field {shown!r}; fields: {', '.join(FORMAT_FIELDS)}",
                 EX_USAGE)
    return names


def _iso(value: datetime | None, sep: str = " ") -> str:
    return value.isoformat(sep=sep, timespec="seconds") if value else ""


def _format_help() -> str:
    return "; ".join(f"{{{k}}} {v}" for k, v in FORMAT_FIELDS.items())


class QueryCommand(click.Command):
    """A command whose arguments are query terms that may start with '-' (``-dog``, ``-horse``).

    Before click parses them, exact option words (``-0``, ``--limit 5``, ``--json``) move to the
    front and every other word after a ``--``, so ``-horse`` is the term "not horse" rather
    than ``-h -o -r -s -e``. A word like ``--limt`` stays an option, for click to reject.
    """

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        takes_value: dict[str, bool] = {}
        for param in self.get_params(ctx):
            if isinstance(param, click.Option):
                for name in [*param.opts, *param.secondary_opts]:
                    takes_value[name] = not param.is_flag and not param.count
        options: list[str] = []
        terms: list[str] = []
        i = 0
        while i < len(args):
            word = args[i]
            name = word.split("=", 1)[0] if word.startswith("--") else word
            if word == "--":
                terms.extend(args[i + 1:])
                break
            if name in takes_value:
                options.append(word)
                if takes_value[name] and "=" not in word and i + 1 < len(args):
                    options.append(args[i + 1])
                    i += 1
            elif word.startswith("--"):
                options.append(word)  # an unknown long option: click says so
            else:
                terms.append(word)
            i += 1
        return super().parse_args(ctx, [*options, "--", *terms])


@click.command(cls=QueryCommand)
@click.argument("query", nargs=-1)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list of photos with tags.")
@click.option("--format", "fmt", metavar="FMT",
              help="Print each photo with a Python format string; \\t and \\n work. Fields: "
                   + _format_help() + ".")
@click.option("--limit", type=click.IntRange(min=0), metavar="N", help="Print at most N photos.")
@click.option("--sort", "sort_key", metavar="KEY",
              help="score (best first), date (oldest first) or path (default); add + or - for "
                   "ascending / descending. Sort terms in the query (date-) come first.")
@click.option("-0", "--null", "null", is_flag=True,
              help="End each path with NUL instead of a newline (for xargs -0).")
@pass_app
def search(app: App, query: tuple[str, ...], as_json: bool, fmt: str | None, limit: int | None,
           sort_key: str | None, null: bool) -> None:
    """Find photos by tag, score, path and date; print their paths.

    \b
    Examples:
      phototag search cat                 cats, tabbies, ... (narrower tags too)
      phototag search cat dog             photos with a cat and a dog
      phototag search cat , dog           photos with a cat or a dog
      phototag search animal ^dog         animals but no dog (-dog works too)
      phototag search 猫 score:0.6..      cats with a score of at least 0.6
      phototag search date:2023-06..2023-08 path:trips/ date-
      phototag search date:-1w..          taken in the last week

    Unknown tag: exit 1 with suggestions. Malformed query: exit 2.
    """
    from storage.query import (
        QueryError,
        UnknownTagError,
        parse_query,
        parse_sort,
        tags_of,
    )
    from storage.query import search as run_search

    if as_json and (fmt or null):
        fail("--json cannot be combined with --format or -0", EX_USAGE)
    terms = list(query)
    try:
        parsed = parse_query(terms)
        extra_sort = [parse_sort(sort_key)] if sort_key else []
    except QueryError as e:
        fail(f"bad query {' '.join(terms)!r}: {e}", EX_USAGE)
    if not parsed.sort and not extra_sort:
        extra_sort = [parse_sort("path")]
    fields = _format_fields(_unescape(fmt)) if fmt else set()

    with _connection(app) as connection:
        try:
            hits = run_search(connection, parsed, sort=extra_sort, limit=limit,
                              with_score=as_json or "score" in fields,
                              details=as_json or bool(fields & {"date", "taken_at", "status"}))
        except UnknownTagError as e:
            fail(str(e), 1)
        tags = tags_of(connection, [h.id for h in hits]) if as_json or "tags" in fields else {}

    with _Output() as out:
        if as_json:
            records = [{
                "path": h.path,
                "root": h.root,
                "relpath": h.relpath,
                "taken_at": _iso(h.taken_at, "T") or None,
                "status": h.status,
                "score": h.score,
                "tags": [{"name": t.name, "zh": t.zh, "score": t.score, "source": t.source}
                         for t in tags[h.id]],
            } for h in hits]
            out.write(json.dumps(records, ensure_ascii=False, indent=2) + "\n")
        elif fmt:
            template = _unescape(fmt)
            end = "\0" if null else "\n"
            for h in hits:
                values: dict[str, Any] = {
                    "path": h.path, "relpath": h.relpath, "root": h.root,
                    "name": os.path.basename(h.relpath),
                    "date": h.taken_at.date().isoformat() if h.taken_at else "",
                    "taken_at": _iso(h.taken_at), "score": h.score or 0.0,
                    "tags": ",".join(t.name for t in tags.get(h.id, ())),
                    "status": h.status, "id": h.id,
                }
                try:
                    out.write(template.format_map(values) + end)
                except (ValueError, TypeError) as e:
                    fail(f"--format {fmt!r}: {e}", EX_USAGE)
        else:
            out.write_paths((h.path for h in hits), "\0" if null else "\n")


@click.command()
@click.option("--all", "show_all", is_flag=True, help="Also list tags no photo has.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@pass_app
def tags(app: App, show_all: bool, as_json: bool) -> None:
    """List tags with the number of photos tagged with each (most first).

    The count is of photos with that very tag; searching for a tag also finds its narrower tags.
    """
    from sqlalchemy import func, select

    from storage.schema import photo_tag, tag, tag_parent

    with _connection(app) as connection:
        # count(DISTINCT photo_id) per tag cannot use an index and takes seconds on a big
        # library; rows per tag (an index-only scan) minus the rows that repeat a photo's tag
        # from a second source (model and user) is the same number, several times faster.
        counts = dict(connection.execute(
            select(photo_tag.c.tag_id, func.count()).group_by(photo_tag.c.tag_id)).all())
        repeats = (select(photo_tag.c.tag_id, (func.count() - 1).label("extra"))
                   .group_by(photo_tag.c.photo_id, photo_tag.c.tag_id)
                   .having(func.count() > 1).subquery())
        for tag_id, extra in connection.execute(
                select(repeats.c.tag_id, func.sum(repeats.c.extra)).group_by(repeats.c.tag_id)):
            counts[tag_id] -= extra
        all_tags = connection.execute(select(tag.c.id, tag.c.name, tag.c.zh)).all()
        names = {tag_id: name for tag_id, name, _ in all_tags}
        broader: dict[int, list[str]] = {}
        edges = connection.execute(select(tag_parent.c.tag_id, tag_parent.c.parent_id))
        for tag_id, parent_id in edges:
            broader.setdefault(tag_id, []).append(names[parent_id])
    rows = [(counts.get(tag_id, 0), name, zh, sorted(broader.get(tag_id, [])))
            for tag_id, name, zh in all_tags if show_all or counts.get(tag_id)]
    rows.sort(key=lambda r: (-r[0], r[1]))
    with _Output() as out:
        if as_json:
            out.write(json.dumps([{"name": n, "zh": zh, "photos": c, "broader": b}
                                  for c, n, zh, b in rows], ensure_ascii=False, indent=2) + "\n")
            return
        width = max((len(str(r[0])) for r in rows), default=1)
        for count, name, zh, parents in rows:
            line = f"{count:>{width}}  {name}"
            if zh:
                line += f"  {zh}"
            if parents:
                line += f"  (< {', '.join(parents)})"
            out.write(line + "\n")


def _find_photo(session, file: str):
    """The Photo for ``file`` and its absolute path, found the way the indexer files it (folder
    symlinks resolved, the innermost album root), then through the file's own symlink; or None."""
    from storage.library import absolute_path, locate, photo_at

    for candidate in dict.fromkeys((file, os.path.realpath(file))):
        found = locate(session, candidate)
        if found is None:
            continue
        root, relpath = found
        photo = photo_at(session, root, relpath)
        if photo is not None:
            return photo, str(absolute_path(root, relpath))
    return None, None


@click.command()
@click.argument("file", type=StorablePath(readable=False))  # its record, readable or not
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@pass_app
def show(app: App, file: str, as_json: bool) -> None:
    """Show one photo's tags and scores, status and the model that tagged it."""
    from sqlalchemy.orm import Session

    from storage.query import tags_of

    with _connection(app) as connection, Session(connection) as session:
        photo, path = _find_photo(session, file)
        if photo is None:
            fail(f"{file}: not in the index (run `phototag index` on its album folder)", 1)
        tag_rows = tags_of(connection, [photo.id])[photo.id]
        info = {
            "path": path,
            "status": photo.status,
            "error": photo.error,
            "taken_at": _iso(photo.taken_at, "T") or None,
            "size": photo.size,
            "width": photo.width,
            "height": photo.height,
            "tagged_at": _iso(photo.tagged_at, "T") + "Z" if photo.tagged_at else None,
            "model": photo.model,
            "mapping_version": photo.mapping_version,
            "tags": [{"name": t.name, "zh": t.zh, "score": t.score, "source": t.source}
                     for t in tag_rows],
        }
    with _Output() as out:
        if as_json:
            out.write(json.dumps(info, ensure_ascii=False, indent=2) + "\n")
            return
        for key in ("path", "status", "error", "taken_at", "size", "width", "height",
                    "tagged_at", "model", "mapping_version"):
            if info[key] is not None:
                out.write(f"{key + ':':<17}{info[key]}\n")
        if tag_rows:
            out.write("tags:\n")
            for t in tag_rows:
                zh = f"  {t.zh}" if t.zh else ""
                source = f"  [{t.source}]" if t.source != "model" else ""
                out.write(f"  {t.score:.3f}  {t.name}{zh}{source}\n")
        else:
            out.write("tags:            (none)\n")


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@pass_app
def status(app: App, as_json: bool) -> None:
    """Show the library: photos per status, queue, errors, database, models in use."""
    from sqlalchemy import func, select

    from storage.db import describe
    from storage.migrate import HEAD
    from storage.schema import ERROR, PENDING, STATUSES, album_root, meta, photo, tag

    with _connection(app) as connection:
        per_status = dict.fromkeys(STATUSES, 0)
        per_status.update(connection.execute(
            select(photo.c.status, func.count()).group_by(photo.c.status)).all())
        now = datetime.now(UTC).replace(tzinfo=None)  # retry_at is stored as naive UTC
        retry_due = connection.execute(select(func.count()).select_from(photo).where(
            photo.c.status == ERROR, photo.c.retry_at.is_not(None),
            photo.c.retry_at <= now)).scalar()
        model_rows = connection.execute(
            select(photo.c.model, photo.c.mapping_version, func.count())
            .where(photo.c.model.is_not(None))
            .group_by(photo.c.model, photo.c.mapping_version)
            .order_by(func.count().desc()))
        models = [{"model": m, "mapping_version": v, "photos": n} for m, v, n in model_rows]
        roots = [{"path": p, "photos": n} for p, n in connection.execute(
            select(album_root.c.path, func.count(photo.c.id))
            .outerjoin(photo, photo.c.root_id == album_root.c.id)
            .group_by(album_root.c.id, album_root.c.path).order_by(album_root.c.path))]
        tag_count = connection.execute(select(func.count()).select_from(tag)).scalar()
        facts = dict(connection.execute(select(meta.c.key, meta.c.value).where(
            meta.c.key.in_(["last_nightly_run", "model", "mapping_version"]))).all())
        last_nightly = facts.get("last_nightly_run")
        where = describe(connection.engine)
    info = {
        "database": where,
        "schema": HEAD,
        "photos": sum(per_status.values()),
        "by_status": per_status,
        "pending_queue": per_status[PENDING],
        "errors": per_status[ERROR],
        "errors_due_for_retry": retry_due,
        "albums": roots,
        "tags": tag_count,
        "models": models,
        "library_model": facts.get("model"),  # what the last tagging run used
        "library_mapping_version": facts.get("mapping_version"),
        "last_nightly_run": last_nightly,
    }
    with _Output() as out:
        if as_json:
            out.write(json.dumps(info, ensure_ascii=False, indent=2) + "\n")
            return
        out.write(f"database:         {where} (schema {info['schema']})\n")
        out.write(f"photos:           {info['photos']}\n")
        for name in STATUSES:
            out.write(f"  {name + ':':<16}{per_status[name]}\n")
        out.write(f"pending queue:    {info['pending_queue']}\n")
        out.write(f"errors:           {info['errors']} ({retry_due} due for retry)\n")
        out.write(f"tags:             {tag_count}\n")
        for root in roots:
            out.write(f"album:            {root['path']} ({root['photos']} photos)\n")
        if facts.get("model"):
            out.write(f"last tagged with: {facts['model']} mapping "
                      f"{facts.get('mapping_version')}\n")
        for m in models:
            out.write(f"model:            {m['model']} mapping {m['mapping_version']} "
                      f"({m['photos']} photos)\n")
        out.write(f"last nightly run: {last_nightly or 'never'}\n")
