"""``phototag classify FILE...``: print each file's top ImageNet classes and mapped tags (no database)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from daemon.cli import EX_CONFIG, EX_USAGE, App, fail, pass_app


@click.command()
# Unreadable paths and directories are reported per file, not refused by click.
@click.argument("files", nargs=-1, required=True, type=click.Path(readable=False, path_type=Path))
@click.option("--top", default=5, show_default=True, type=click.IntRange(1, 1000),
              help="How many ImageNet classes to show per file.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list, one object per file.")
@click.option("--lang", type=click.Choice(["en", "zh"]), default=None,
              help="Language of the tag names (default: config [labels] lang).")
@click.option("--model", "model_name", metavar="NAME", default=None,
              help="Backbone, e.g. resnet18 or efficientnet_lite0 (default: config [model] name).")
@pass_app
def classify(app: App, files: tuple[Path, ...], top: int, as_json: bool, lang: str | None,
             model_name: str | None) -> None:
    """Tag FILE... and print the top classes and tags with their confidences.

    A file that cannot be read gets one line on stderr and the others still print; the exit code
    is 1 if any file failed.
    """
    from daemon.config import cache_dir
    from tagger.backbones import ModelError, UnknownModelError
    from tagger.engine import open_tagger
    from tagger.labels import LabelMapError

    config = app.config
    lang = lang or config.labels.lang
    name = model_name or config.model.name
    # The configured weights file belongs to the configured model only.
    weights = config.model.weights if name == config.model.name else None
    try:
        tagger = open_tagger(name, weights_file=weights, cache_dir=cache_dir(config),
                             labels_file=config.labels.file, batch_size=config.model.batch_size,
                             threads=config.model.threads, decode_threads=config.model.decode_threads,
                             precision=config.model.precision, runtime=config.model.runtime,
                             calibration=files)
    except UnknownModelError as e:
        fail(str(e), EX_USAGE if model_name else EX_CONFIG)
    except (ModelError, LabelMapError) as e:  # missing or bad weights, missing package, bad mapping
        fail(str(e), EX_CONFIG)

    failed = False
    documents = []
    for result in tagger.tag_files(files, top=top):
        if not result.ok:
            failed = True
            click.echo(f"phototag: {result.path}: {result.error}", err=True)
        if as_json:
            documents.append(_as_json(result, tagger))
        elif result.ok:
            click.echo(_as_text(result, lang, tagger.labels))
    if as_json:
        json.dump(documents, sys.stdout, ensure_ascii=False, indent=2)
        click.echo()
    if failed:
        sys.exit(1)


def _as_text(result, lang: str, labels) -> str:
    lines = [f"{result.path}  {result.width}x{result.height}"]
    names = [_tag_name(tag.name, tag.zh, lang) for tag in result.tags]
    width = max([len(n) for n in names] + [len(c.name) for c in result.classes] + [1])
    for tag, name in zip(result.tags, names):
        broader = [_tag_name(b, labels.tag(b).zh, lang) for b in tag.broader]
        broader = f"  (under {', '.join(broader)})" if broader else ""
        lines.append(f"  tag    {name:<{width}}  {tag.score:6.1%}{broader}")
    if not result.tags:
        lines.append("  tag    (none above its threshold)")
    for c in result.classes:
        lines.append(f"  class  {c.name:<{width}}  {c.score:6.1%}  {c.wnid}")
    return "\n".join(lines)


def _tag_name(name: str, zh: str, lang: str) -> str:
    return zh if lang == "zh" and zh else name


def _as_json(result, tagger) -> dict:
    document: dict = {"path": str(result.path)}
    if not result.ok:
        document["error"] = result.error
        return document
    document.update(
        width=result.width,
        height=result.height,
        model=tagger.model_name,
        mapping_version=tagger.mapping_version,
        tags=[{"name": t.name, "zh": t.zh, "score": round(t.score, 6), "broader": list(t.broader)}
              for t in result.tags],
        classes=[{"index": c.index, "wnid": c.wnid, "name": c.name, "score": round(c.score, 6)}
                 for c in result.classes],
    )
    return document
