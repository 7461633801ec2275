"""``phototag bench`` end to end on a few small real photos (never a timed assertion)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image

from daemon.cli import main
from tagger import onnx_runtime
from tagger.sample_photos import generate_photos, make_photo

PHOTOS = Path(__file__).parent / "fixtures" / "photos"


@pytest.fixture
def config(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("PHOTOTAG_DB", str(tmp_path / "must-not-exist.db"))
    path = tmp_path / "config.toml"
    path.write_text(f'[model]\ncache_dir = "{tmp_path / "cache"}"\nbatch_size = 2\n'
                    "threads = 1\ndecode_threads = 1\n")
    return path


@pytest.fixture
def folder(tmp_path) -> Path:
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in ("cat.jpg", "coffee.jpg", "rocket.jpg"):
        shutil.copy(PHOTOS / name, folder / name)
    (folder / "notes.txt").write_text("not a photo, and not picked up by its extension\n")
    return folder


def bench(config: Path, *args: str):
    return CliRunner().invoke(main, ["--config", str(config), "bench", *map(str, args)])


@pytest.mark.skipif(bool(onnx_runtime.missing_packages()), reason="onnxruntime/onnx not installed")
def test_json_report_per_model_precision_and_runtime(config, folder, tmp_path):
    result = bench(config, folder, "--models", "efficientnet_lite0,resnet18", "--precisions", "fp32",
                   "--runtimes", "torch,onnxruntime", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["count"] == 3 and report["photos"] == str(folder)
    rows = {(r["model"], r["precision"], r["runtime"]): r for r in report["rows"]}
    assert set(rows) == {(m, "fp32", r) for m in ("efficientnet_lite0", "resnet18")
                         for r in ("torch", "onnxruntime")}
    for row in rows.values():
        assert "error" not in row, row
        assert row["images"] == 3 and row["failed_photos"] == 0
        assert row["images_per_s"] > 0 and row["peak_rss_mb"] > 0
        assert set(row["ms_per_image"]) == {"decode", "preprocess", "inference", "wall"}
        assert row["threads"] == 1 and row["decode_threads"] == 1 and row["batch_size"] == 2
    # Real EfficientNet-Lite0 weights ship in a package: agreement is measured, and ONNX Runtime
    # agrees with torch. The ResNet-18 weights are not at hand: random weights, no agreement.
    lite0_torch = rows[("efficientnet_lite0", "fp32", "torch")]
    assert lite0_torch["random_weights"] is False and lite0_torch["agreement"] == 1.0
    assert rows[("efficientnet_lite0", "fp32", "onnxruntime")]["agreement"] == 1.0
    assert lite0_torch["top1"][0] in (281, 282, 285)  # cat.jpg: tabby, tiger cat or Egyptian cat
    for runtime in ("torch", "onnxruntime"):
        row = rows[("resnet18", "fp32", runtime)]
        assert row["random_weights"] is True and row["agreement"] is None
    # The prepared models went to the bench's own cache, not the one the daemon uses.
    assert list((tmp_path / "cache" / "bench" / "prepared").glob("*-fp32.onnx"))
    assert not (tmp_path / "cache" / "prepared").exists()


def test_table_and_fallback_notes(config, folder):
    result = bench(config, folder, "--models", "efficientnet_lite0", "--precisions", "fp32,bf16,int8",
                   "--runtimes", "torch", "--naive")
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "model" in out and "img/s" in out and "top-1 agree" in out
    lines = [line for line in out.splitlines() if line.startswith("efficientnet_lite0")]
    assert lines[0].split()[1] == "naive" and lines[1].split()[1] == "fp32"
    from tagger.precision import CpuFeatures

    features = CpuFeatures.detect()
    if features.bf16_unsupported():
        assert "bf16 skipped: " + features.bf16_unsupported() in out
    if not features.int8_unsupported() and not onnx_runtime.missing_packages():
        # 3 photos cannot calibrate int8: the row says what it fell back to, and why.
        assert any(line.split()[1] == "int8->fp32" for line in lines)
        assert "calibrating int8 needs at least 8 readable photos, got 3" in out


def test_unknown_model_or_precision_is_a_usage_error(config, folder):
    result = bench(config, folder, "--models", "resnet99")
    assert result.exit_code == 2 and "unknown model 'resnet99'" in result.stderr
    result = bench(config, folder, "--precisions", "fp16")
    assert result.exit_code == 2 and "unknown precision 'fp16'" in result.stderr


def test_sample_photos_are_deterministic_12mp_jpegs(tmp_path):
    small = make_photo(3, size=(320, 240))
    assert small == make_photo(3, size=(320, 240)) and small != make_photo(4, size=(320, 240))
    (path,) = generate_photos(1, tmp_path, size=(4032, 3024))
    with Image.open(path) as im:
        assert im.format == "JPEG" and im.size == (4032, 3024)
    assert path.stat().st_size > 1_000_000  # photo-like entropy, not a flat image
    stamp = path.stat().st_mtime_ns
    assert generate_photos(1, tmp_path) == [path] and path.stat().st_mtime_ns == stamp  # reused
