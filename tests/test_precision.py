"""tagger.precision and tagger.onnx_runtime with EfficientNet-Lite0's real weights on real photos.

Agreement, never timing: a prepared int8/bf16/ONNX Runtime model must give the fp32 model's top-1
on the fixture photos. Calibration photos come from scikit-image's bundled sample photos (a test
dependency), disjoint from the photos the agreement is checked on.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from tagger import onnx_runtime, precision
from tagger.engine import Tagger
from tagger.labels import load_label_map
from tagger.precision import (CpuFeatures, Int8WithRecheck, load_calibration, prepare_model,
                              weights_fingerprint)
from tagger.torch_runtime import Bf16Autocast, ChannelsLast, TorchPredictor
from tagger.weights import load_model, weights_path

FIXTURES = Path(__file__).parent / "fixtures"
# The photos agreement is checked on: the real fixture photos and camera samples.
CHECK_PHOTOS = sorted((FIXTURES / "photos").glob("*.jpg")) + sorted((FIXTURES / "camera").glob("*.jpg"))
AVX2 = CpuFeatures.of("x86_64", ["sse4_2", "avx", "avx2", "fma"])
NO_AVX2 = CpuFeatures.of("x86_64", ["sse4_2", "ssse3"])  # e.g. a NAS Celeron J1900
AVX512_BF16 = CpuFeatures.of("x86_64", ["avx2", "avx512f", "avx512_bf16", "avx512_vnni"])

pytestmark = pytest.mark.skipif(bool(onnx_runtime.missing_packages()),
                                reason="onnxruntime/onnx not installed")


@pytest.fixture(scope="module")
def calibration_photos(tmp_path_factory) -> list[Path]:
    """16 photos from scikit-image's bundled data (none of them the fixture photos' sources)."""
    import skimage.data

    folder = tmp_path_factory.mktemp("calibration")
    names = ["astronaut", "hubble_deep_field", "immunohistochemistry", "retina", "stereo_motorcycle",
             "camera", "moon", "grass", "gravel", "brick", "clock", "coins"]
    paths = []
    for name in names:
        pixels = getattr(skimage.data, name)()
        if isinstance(pixels, tuple):  # stereo pairs
            pixels = pixels[0]
        image = Image.fromarray(pixels).convert("RGB")
        for variant, im in (("", image), ("-mirrored", ImageOps.mirror(image))):
            if variant and len(paths) >= 16:
                break
            path = folder / f"{name}{variant}.jpg"
            im.save(path, quality=90)
            paths.append(path)
    return paths[:16]


@pytest.fixture(scope="module")
def lite0():
    """EfficientNet-Lite0's backbone and real weights file (from its pip package)."""
    backbone, _ = load_model("efficientnet_lite0", cache_dir=Path("/nonexistent"))
    return backbone, weights_path(backbone, weights_file=None, cache_dir=Path("/nonexistent"))


@pytest.fixture(scope="module")
def lite0_model(lite0):
    """The fp32 torch model, the reference."""
    backbone, weights = lite0
    return backbone.build(weights)


@pytest.fixture(scope="module")
def check_batch(lite0) -> np.ndarray:
    backbone, _ = lite0
    batch = load_calibration(backbone, CHECK_PHOTOS)
    assert len(batch) == len(CHECK_PHOTOS) == 11 and batch.dtype == np.uint8
    return batch


@pytest.fixture(scope="module")
def fp32_top1(lite0, lite0_model, check_batch) -> np.ndarray:
    backbone, _ = lite0
    return TorchPredictor(lite0_model, backbone)(check_batch).argmax(axis=1)


@pytest.fixture(scope="module")
def int8_cache(tmp_path_factory, lite0, calibration_photos) -> Path:
    """A cache dir holding the int8 model, quantized once for the tests that only use it."""
    backbone, weights = lite0
    folder = tmp_path_factory.mktemp("int8-cache")
    prepare_model(backbone, weights, "int8", cache_dir=folder, calibration=calibration_photos,
                  features=AVX2)
    return folder


def top1(predictor, batch: np.ndarray) -> np.ndarray:
    return predictor(batch).argmax(axis=1)


# ------------------------------------------------------------------ CPU features and fallbacks


def test_cpuinfo_flags_are_read_from_the_flags_line(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: Intel(R) Celeron(R) J4125\n"
                       "flags\t\t: fpu sse sse2 ssse3 sse4_1 sse4_2 aes\n\nprocessor\t: 1\n")
    assert precision._cpuinfo_flags(cpuinfo) == {"fpu", "sse", "sse2", "ssse3", "sse4_1", "sse4_2", "aes"}
    arm = tmp_path / "cpuinfo-arm"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd evtstrm aes crc32 asimddp\n")
    assert "asimddp" in precision._cpuinfo_flags(arm)
    assert precision._cpuinfo_flags(tmp_path / "missing") == set()


def test_detected_features_match_this_machine():
    features = CpuFeatures.detect()
    assert features.arch
    if features.arch == "x86_64" and "avx2" in Path("/proc/cpuinfo").read_text():
        assert features.int8_unsupported() is None


def test_feature_rules():
    assert "AVX2" in NO_AVX2.int8_unsupported()
    assert AVX2.int8_unsupported() is None
    assert "bf16" in AVX2.bf16_unsupported()
    assert AVX512_BF16.bf16_unsupported() is None and AVX512_BF16.vnni and not AVX2.vnni
    arm = CpuFeatures.of("aarch64", ["fp", "asimd", "asimddp", "bf16"])
    assert arm.int8_unsupported() is None and arm.bf16_unsupported() is None
    assert "dot-product" in CpuFeatures.of("aarch64", ["fp", "asimd"]).int8_unsupported()
    assert AVX2.key() != AVX512_BF16.key() and AVX2.key() == CpuFeatures.of("x86_64", ["avx2"]).key()


@pytest.mark.parametrize("requested", ["int8", "auto"])
def test_cpu_without_avx2_falls_back_to_fp32_with_reason(lite0, tmp_path, calibration_photos,
                                                         requested, caplog):
    backbone, weights = lite0
    caplog.set_level("INFO", logger="tagger.precision")
    prepared = prepare_model(backbone, weights, requested, cache_dir=tmp_path,
                             calibration=calibration_photos, features=NO_AVX2)
    assert prepared.precision == "fp32" and prepared.runtime == "torch"
    assert isinstance(prepared.predictor, TorchPredictor)
    assert isinstance(prepared.predictor.module, ChannelsLast)
    assert "no AVX2" in prepared.reason
    assert "no AVX2" in caplog.text  # the reason is logged
    assert not (tmp_path / "prepared").exists()  # nothing was quantized


def test_bf16_without_native_support_falls_back(lite0, tmp_path):
    backbone, weights = lite0
    prepared = prepare_model(backbone, weights, "bf16", cache_dir=tmp_path, features=AVX2)
    assert prepared.precision == "fp32"
    assert "no native bf16" in prepared.reason


def test_int8_with_too_few_calibration_photos_falls_back(lite0, tmp_path, calibration_photos):
    backbone, weights = lite0
    prepared = prepare_model(backbone, weights, "int8", cache_dir=tmp_path,
                             calibration=calibration_photos[:3], features=AVX2)
    assert prepared.precision == "fp32"
    assert "at least 8" in prepared.reason and "got 3" in prepared.reason


def test_unknown_precision_is_an_error(lite0, tmp_path):
    backbone, weights = lite0
    with pytest.raises(ValueError, match="precision must be one of"):
        prepare_model(backbone, weights, "fp16", cache_dir=tmp_path)


# ------------------------------------------------------------------ agreement with fp32


def test_channels_last_fp32_gives_the_same_probabilities(lite0, lite0_model, check_batch, tmp_path):
    backbone, _ = lite0
    expected = TorchPredictor(lite0_model, backbone)(check_batch)
    prepared = prepare_model(backbone, lite0[1], "fp32", cache_dir=tmp_path, features=AVX2)
    np.testing.assert_allclose(prepared.predictor(check_batch), expected, atol=1e-4)


def test_onnxruntime_fp32_gives_the_same_top1_as_torch(lite0, lite0_model, check_batch, fp32_top1, tmp_path):
    backbone, weights = lite0
    prepared = prepare_model(backbone, weights, "fp32", runtime="onnxruntime", cache_dir=tmp_path,
                             features=AVX2)
    assert prepared.runtime == "onnxruntime"
    assert isinstance(prepared.predictor, onnx_runtime.OrtPredictor)
    assert np.array_equal(top1(prepared.predictor, check_batch), fp32_top1)
    probs = prepared.predictor(check_batch)
    assert probs.dtype == np.float32 and probs.shape == (11, 1000)
    np.testing.assert_allclose(probs, TorchPredictor(lite0_model, backbone)(check_batch), atol=1e-4)


def test_bf16_gives_the_same_top1_as_fp32(lite0, check_batch, fp32_top1, tmp_path):
    """Where bf16 is native; here it is forced by passing such a CPU's flags (emulated: slow)."""
    backbone, weights = lite0
    prepared = prepare_model(backbone, weights, "bf16", cache_dir=tmp_path, features=AVX512_BF16)
    assert prepared.precision == "bf16" and isinstance(prepared.predictor.module, Bf16Autocast)
    probs = prepared.predictor(check_batch[:4])
    assert probs.dtype == np.float32
    assert np.array_equal(probs.argmax(axis=1), fp32_top1[:4])


def test_int8_gives_the_same_top1_as_fp32(lite0, check_batch, fp32_top1, int8_cache, calibration_photos):
    backbone, weights = lite0
    prepared = prepare_model(backbone, weights, "int8", cache_dir=int8_cache,
                             calibration=calibration_photos, features=AVX2)
    assert prepared.precision == "int8" and prepared.runtime == "onnxruntime"
    assert isinstance(prepared.predictor, Int8WithRecheck)
    assert np.array_equal(top1(prepared.predictor, check_batch), fp32_top1)
    # The model really is quantized: its ONNX graph has int8 weights and QDQ pairs.
    import onnx

    graph = onnx.load(str(prepared.predictor.int8.path)).graph
    ops = [node.op_type for node in graph.node]
    assert ops.count("QuantizeLinear") > 20 and ops.count("DequantizeLinear") > 40
    assert any(init.data_type == onnx.TensorProto.INT8 for init in graph.initializer)


def test_int8_alone_mostly_agrees_and_recheck_only_touches_close_calls(lite0, check_batch, fp32_top1,
                                                                      int8_cache, calibration_photos):
    backbone, weights = lite0
    prepared = prepare_model(backbone, weights, "int8", cache_dir=int8_cache,
                             calibration=calibration_photos, features=AVX2)
    predictor = prepared.predictor
    raw = predictor.int8(check_batch)
    final = predictor(check_batch)
    assert (raw.argmax(axis=1) == fp32_top1).mean() >= 0.8
    top2 = np.sort(raw, axis=1)[:, -2:]
    close = (top2[:, 1] - top2[:, 0]) < predictor.margin
    # Confident int8 answers are kept as they are; close calls carry fp32 probabilities.
    np.testing.assert_array_equal(final[~close], raw[~close])
    np.testing.assert_allclose(final[close], predictor.fp32(check_batch[close]), atol=1e-6)
    assert predictor.rechecked == int(close.sum()) and predictor.images == len(check_batch)


def test_tagger_with_prepared_int8_model_tags_like_fp32(lite0, int8_cache, calibration_photos):
    """The engine runs any prepared predictor the same way."""
    backbone, weights = lite0
    labels = load_label_map()
    reference = Tagger(backbone, TorchPredictor(backbone.build(weights), backbone), labels,
                       batch_size=4, threads=1, decode_threads=1)
    expected = [r.classes[0].index for r in reference.tag_files(CHECK_PHOTOS, top=1)]
    prepared = prepare_model(backbone, weights, "int8", cache_dir=int8_cache,
                             calibration=calibration_photos, features=AVX2)
    tagger = Tagger(backbone, prepared.predictor, labels, batch_size=4, threads=1, decode_threads=1)
    results = list(tagger.tag_files(CHECK_PHOTOS, top=1))
    assert all(r.ok for r in results)
    assert [r.classes[0].index for r in results] == expected
    cat = next(r for r in results if r.path.name == "cat.jpg")
    assert "cat" in [t.name for t in cat.tags]


# ------------------------------------------------------------------ cache


def test_prepared_int8_model_is_cached_and_reused(lite0, tmp_path, calibration_photos, monkeypatch):
    backbone, weights = lite0
    first = prepare_model(backbone, weights, "int8", cache_dir=tmp_path,
                          calibration=calibration_photos, features=AVX2)
    path = first.predictor.int8.path
    assert path.parent == tmp_path / "prepared"
    assert weights_fingerprint(weights) in path.name
    meta = json.loads(path.with_suffix(".json").read_text())
    assert meta["calibration_images"] == 16 and meta["reduce_range"] is True
    stamp = path.stat().st_mtime_ns

    def no_quantizing(*args, **kwargs):
        raise AssertionError("quantized again although the model was cached")

    monkeypatch.setattr(onnx_runtime, "quantize_int8", no_quantizing)
    monkeypatch.setattr(onnx_runtime, "export_onnx", no_quantizing)
    second = prepare_model(backbone, weights, "int8", cache_dir=tmp_path, calibration=(), features=AVX2)
    assert second.precision == "int8" and second.predictor.int8.path == path
    assert path.stat().st_mtime_ns == stamp


def test_changed_weights_invalidate_the_cache(lite0, lite0_model, tmp_path, calibration_photos):
    backbone, weights = lite0
    first = prepare_model(backbone, weights, "fp32", runtime="onnxruntime", cache_dir=tmp_path,
                          features=AVX2)
    # The same architecture with one weight changed, saved and loaded through the real path.
    state = {k: v.clone() for k, v in lite0_model.state_dict().items()}
    state["_fc.bias"][0] += 1.0
    changed = tmp_path / "efficientnet-lite0-changed.pth"
    torch.save(state, changed)
    second = prepare_model(backbone, changed, "fp32", runtime="onnxruntime", cache_dir=tmp_path,
                           features=AVX2)
    assert second.predictor.path != first.predictor.path
    assert len(list((tmp_path / "prepared").glob("*-fp32.onnx"))) == 2
    x = np.zeros((1, 3, 224, 224), dtype=np.float32)
    assert float(second.predictor.logits(x)[0, 0]) == pytest.approx(float(first.predictor.logits(x)[0, 0]) + 1.0, abs=1e-3)


def test_auto_decides_on_held_out_photos_and_caches_the_decision(lite0, tmp_path, calibration_photos,
                                                                check_batch, fp32_top1, monkeypatch):
    backbone, weights = lite0
    prepared = prepare_model(backbone, weights, "auto", runtime="onnxruntime", cache_dir=tmp_path,
                             calibration=calibration_photos, features=AVX2)
    assert prepared.precision in ("int8", "fp32")
    assert "held-out photos" in prepared.reason and "no bf16" in prepared.reason
    decisions = list((tmp_path / "prepared").glob("*-auto-onnxruntime-*.json"))
    assert len(decisions) == 1
    decision = json.loads(decisions[0].read_text())
    assert decision["precision"] == prepared.precision
    assert decision["evaluated_images"] == 8 and decision["calibration_images"] == 8
    assert decision["agreement"]["fp32"] == 1.0
    if prepared.precision == "int8":
        assert decision["agreement"]["int8"] >= precision.AGREEMENT_THRESHOLD
    assert np.array_equal(top1(prepared.predictor, check_batch), fp32_top1)

    # Second start: the decision is read back, nothing is measured or quantized again.
    monkeypatch.setattr(precision, "_ms_per_image", lambda *a, **k: pytest.fail("measured again"))
    again = prepare_model(backbone, weights, "auto", runtime="onnxruntime", cache_dir=tmp_path,
                          calibration=(), features=AVX2)
    assert again.precision == prepared.precision and "cached" in again.reason


def test_auto_without_enough_photos_stays_fp32(lite0, tmp_path, calibration_photos):
    backbone, weights = lite0
    prepared = prepare_model(backbone, weights, "auto", cache_dir=tmp_path,
                             calibration=calibration_photos[:10], features=AVX2)
    assert prepared.precision == "fp32"
    assert "at least 16" in prepared.reason
    assert not list((tmp_path / "prepared").glob("*auto*"))  # undecided: asks again next time
