"""Weights: resolution, strict loading, `phototag model fetch` over real HTTP, `phototag model import`.

ResNet-18's official weights cannot be downloaded here, so these use the seeded random weights of
the ``resnet18_weights`` fixture through the real load, download and hash-check paths.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import http.server
import shutil
import threading
from pathlib import Path

import pytest
from click.testing import CliRunner

from daemon.cli import main
from tagger.backbones import BACKBONES, get_backbone
from tagger.weights import (
    DownloadError,
    MissingWeightsError,
    WeightsError,
    WrongHashError,
    fetch_weights,
    import_weights,
    load_model,
    weights_path,
)

RESNET18 = get_backbone("resnet18")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def files_in(directory: Path) -> list[str]:
    """Every entry in ``directory``, hidden temp files included; [] if it does not exist."""
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


@pytest.fixture
def cache(tmp_path) -> Path:
    return tmp_path / "cache"


@pytest.fixture
def config(tmp_path, cache) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(f'[model]\nname = "resnet18"\ncache_dir = "{cache}"\n')
    return path


def run(config: Path, *args: str):
    return CliRunner().invoke(main, ["--config", str(config), "model", *args])


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # keep pytest's output clean
        pass


@pytest.fixture
def http_dir(tmp_path, monkeypatch):
    """A real HTTP server on 127.0.0.1 serving a temp directory; yields (base URL, directory)."""
    served = tmp_path / "served"
    served.mkdir()
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(served)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", served
    server.shutdown()
    server.server_close()


def serve(served: Path, source: Path, name: str | None = None) -> str:
    """Put ``source`` in the served dir as ``name`` (default: resnet18-<its sha256 prefix>.pth)."""
    name = name or f"resnet18-{sha256(source)[:8]}.pth"
    shutil.copyfile(source, served / name)
    return name


# --- resolution and loading -------------------------------------------------------------------

def test_missing_weights_names_both_commands_and_writes_nothing(cache):
    with pytest.raises(MissingWeightsError) as err:
        load_model("resnet18", cache_dir=cache)
    message = str(err.value)
    assert "phototag model fetch" in message
    assert "phototag model import FILE" in message
    assert "\n" not in message
    assert not cache.exists()


def test_missing_weights_file_is_named(tmp_path, cache):
    missing = tmp_path / "nope.pth"
    with pytest.raises(MissingWeightsError, match="nope.pth"):
        weights_path(RESNET18, weights_file=missing, cache_dir=cache)
    assert not cache.exists()


def test_weights_file_loads_strictly_in_eval_mode(resnet18_weights, cache):
    import torch

    backbone, model = load_model("resnet18", weights_file=resnet18_weights, cache_dir=cache)
    assert backbone is RESNET18
    assert not model.training
    saved = torch.load(resnet18_weights, weights_only=True)
    assert torch.equal(model.state_dict()["conv1.weight"], saved["conv1.weight"])
    assert torch.equal(model.state_dict()["fc.bias"], saved["fc.bias"])
    with torch.inference_mode():
        assert model(torch.zeros(1, 3, 224, 224)).shape == (1, 1000)


def test_weights_file_wins_over_cache(resnet18_weights, tmp_path, cache):
    cache.mkdir()
    (cache / RESNET18.file_name).write_bytes(b"would not load")
    assert weights_path(RESNET18, weights_file=resnet18_weights, cache_dir=cache) == resnet18_weights
    assert weights_path(RESNET18, weights_file=None, cache_dir=cache) == cache / RESNET18.file_name


def _corrupt_files(tmp_path: Path, good: Path) -> dict[str, Path]:
    import torch
    import torchvision

    files = {}
    files["text"] = tmp_path / "text.pth"
    files["text"].write_text("this is not a model\n")
    files["empty"] = tmp_path / "empty.pth"
    files["empty"].write_bytes(b"")
    data = good.read_bytes()
    files["truncated"] = tmp_path / "truncated.pth"
    files["truncated"].write_bytes(data[: len(data) // 2])
    files["ten classes"] = tmp_path / "ten-classes.pth"
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), files["ten classes"])
    files["missing key"] = tmp_path / "missing-key.pth"
    state = torch.load(good, weights_only=True)
    del state["fc.bias"]
    torch.save(state, files["missing key"])
    files["not a dict"] = tmp_path / "list.pth"
    torch.save([torch.zeros(3)], files["not a dict"])
    return files


def test_corrupt_weights_file_is_a_one_line_error_naming_it(resnet18_weights, tmp_path, cache):
    for kind, path in _corrupt_files(tmp_path, resnet18_weights).items():
        with pytest.raises(WeightsError) as err:
            load_model("resnet18", weights_file=path, cache_dir=cache)
        message = str(err.value)
        assert str(path) in message, kind
        assert "\n" not in message and len(message) < 300, (kind, message)
    assert not cache.exists()


# --- fetch --------------------------------------------------------------------------------------

def test_fetch_downloads_hash_checked_file_into_cache(http_dir, resnet18_weights, cache):
    base, served = http_dir
    name = serve(served, resnet18_weights)
    path = fetch_weights(RESNET18, cache, url=f"{base}/{name}", progress=False)
    assert path == cache / RESNET18.file_name
    assert path.read_bytes() == resnet18_weights.read_bytes()
    assert files_in(cache) == [RESNET18.file_name]  # no temp file left
    _, model = load_model("resnet18", cache_dir=cache)
    assert not model.training


def test_fetch_refuses_file_whose_hash_does_not_match_its_name(http_dir, resnet18_weights, cache):
    base, served = http_dir
    serve(served, resnet18_weights, "resnet18-00000000.pth")
    with pytest.raises(WrongHashError) as err:
        fetch_weights(RESNET18, cache, url=f"{base}/resnet18-00000000.pth", progress=False)
    assert "00000000" in str(err.value) and sha256(resnet18_weights) in str(err.value)
    assert not cache.exists()  # no temp file, and not even the cache dir it created


def test_fetch_refuses_hash_matching_file_that_is_not_weights(http_dir, tmp_path, cache):
    base, served = http_dir
    text = tmp_path / "text.pth"
    text.write_text("<html>not found</html>\n")
    name = serve(served, text)
    with pytest.raises(WeightsError, match="not a PyTorch weights file"):
        fetch_weights(RESNET18, cache, url=f"{base}/{name}", progress=False)
    assert files_in(cache) == []


def test_fetch_http_error(http_dir, cache):
    base, _ = http_dir
    with pytest.raises(DownloadError, match="404") as err:
        fetch_weights(RESNET18, cache, url=f"{base}/resnet18-f37072fd.pth", progress=False)
    assert "phototag model import FILE" in str(err.value)
    assert not cache.exists()


def test_fetch_keeps_existing_cache_file_when_download_fails(http_dir, resnet18_weights, cache):
    base, served = http_dir
    cache.mkdir()
    existing = cache / RESNET18.file_name
    shutil.copyfile(resnet18_weights, existing)
    serve(served, resnet18_weights, "resnet18-00000000.pth")
    with pytest.raises(WrongHashError):
        fetch_weights(RESNET18, cache, url=f"{base}/resnet18-00000000.pth", progress=False)
    assert files_in(cache) == [RESNET18.file_name]
    assert existing.read_bytes() == resnet18_weights.read_bytes()


def test_cli_fetch_with_progress(http_dir, resnet18_weights, config, cache):
    base, served = http_dir
    name = serve(served, resnet18_weights)
    result = run(config, "fetch", "--url", f"{base}/{name}")
    assert result.exit_code == 0, result.output
    assert (cache / RESNET18.file_name).read_bytes() == resnet18_weights.read_bytes()
    assert "100%" in result.stderr  # torch.hub's tqdm progress bar reached the end
    assert str(cache / RESNET18.file_name) in result.stdout


def test_cli_fetch_wrong_hash_fails_with_one_line(http_dir, resnet18_weights, config, cache):
    base, served = http_dir
    serve(served, resnet18_weights, "resnet18-0badc0de.pth")
    result = run(config, "fetch", "--url", f"{base}/resnet18-0badc0de.pth")
    assert result.exit_code == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("phototag: error:")]
    assert len(errors) == 1 and "0badc0de" in errors[0]
    assert files_in(cache) == []


def test_cli_unknown_model(config):
    result = run(config, "fetch", "--model", "alexnet")
    assert result.exit_code == 78
    assert "alexnet" in result.stderr and "resnet18" in result.stderr


# --- import -------------------------------------------------------------------------------------

def _published_as(path: Path):
    """resnet18 as if torchvision had published ``path`` (its sha256 prefix in the file name)."""
    name = f"resnet18-{sha256(path)[:8]}.pth"
    return dataclasses.replace(RESNET18, file_name=name, url=f"https://example.invalid/{name}")


def test_import_accepts_file_with_published_hash(resnet18_weights, cache):
    backbone = _published_as(resnet18_weights)
    path = import_weights(backbone, resnet18_weights, cache)
    assert path == cache / backbone.file_name
    assert path.read_bytes() == resnet18_weights.read_bytes()
    assert files_in(cache) == [backbone.file_name]


def test_import_refuses_wrong_hash_unless_forced(resnet18_weights, cache):
    with pytest.raises(WrongHashError) as err:
        import_weights(RESNET18, resnet18_weights, cache)
    message = str(err.value)
    assert str(resnet18_weights) in message and "f37072fd" in message
    assert sha256(resnet18_weights) in message
    assert files_in(cache) == []
    path = import_weights(RESNET18, resnet18_weights, cache, force=True)
    assert path == cache / "resnet18-f37072fd.pth"
    load_model("resnet18", cache_dir=cache)


def test_import_refuses_unloadable_file_even_forced(tmp_path, cache):
    text = tmp_path / "resnet18-f37072fd.pth"
    text.write_text("definitely not weights\n")
    with pytest.raises(WeightsError, match="not a PyTorch weights file"):
        import_weights(RESNET18, text, cache, force=True)
    assert files_in(cache) == []


def test_cli_import(resnet18_weights, tmp_path, config, cache, monkeypatch):
    text = tmp_path / "fake.pth"
    text.write_text("definitely not weights\n")
    result = run(config, "import", str(text), "--force")
    assert result.exit_code == 1 and str(text) in result.stderr
    result = run(config, "import", str(resnet18_weights))
    assert result.exit_code == 1 and "f37072fd" in result.stderr
    assert files_in(cache) == []

    result = run(config, "list")
    assert result.exit_code == 0
    assert "missing (phototag model fetch --model resnet18)" in result.stdout

    result = run(config, "import", str(resnet18_weights), "--force")
    assert result.exit_code == 0, result.output
    assert (cache / RESNET18.file_name).read_bytes() == resnet18_weights.read_bytes()
    result = run(config, "list")
    assert str(cache / RESNET18.file_name) in result.stdout

    # right hash, without --force: make the registry publish the random file's hash
    published = _published_as(resnet18_weights)
    monkeypatch.setitem(BACKBONES, "resnet18", published)
    result = run(config, "import", str(resnet18_weights))
    assert result.exit_code == 0, result.output
    assert (cache / published.file_name).is_file()
