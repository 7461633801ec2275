"""Running a backbone at the precision (fp32, bf16, int8 or "auto") and runtime the user chose.

``prepare_model`` turns a backbone's weights file into a predictor the tagger calls (uint8 pixels
in, probabilities out; ``tagger.engine.Predictor``), plus the precision and runtime actually used
and the reason. torch is imported only when it runs the model or must prepare one: with
``runtime = "onnxruntime"`` and the prepared ONNX file in the cache, nothing imports torch.

What each precision is (measured on a 2-core AMD EPYC with AVX2, no AVX-512/VNNI; see
``phototag bench`` and the helper's note for the figures):

* **fp32**: torch with channels-last weights (20-30% faster than the default layout here), or the
  model exported to ONNX and run by ONNX Runtime (``runtime = "onnxruntime"``; 4x faster than
  torch for EfficientNet-Lite0's depthwise convolutions, 1.3x for ResNet-18).
* **bf16**: torch autocast to bfloat16, only on CPUs with native bf16 (AVX512-BF16 or AMX on x86,
  the BF16 extension on ARM). Elsewhere torch emulates it and it is 4x *slower* than fp32, so the
  request falls back to fp32 with a reason.
* **int8**: ONNX Runtime's post-training static quantization (QDQ: int8 per-channel weights, uint8
  activations), calibrated on the user's own photos. This is the maintained int8 path that needs no
  compiler at run time: torch 2.14 dropped ``torch.ao.quantization.quantize_pt2e`` (it moved to
  torchao, whose fast kernels need ``torch.compile`` with a C++ toolchain, and whose x86 quantizer
  failed on ResNet-18 and left EfficientNet-Lite0's convolutions unquantized here), and the
  eager/FX ``torch.ao`` flow is deprecated (69% top-1 agreement on EfficientNet-Lite0 here).
  The first Conv nodes stay float32 (the stem and, for mobile nets, the first block, where
  quantization hurt most), and every image whose int8 top-1 leads its runner-up by less than
  ``RECHECK_MARGIN`` in probability is re-run in float32 ("close calls": ~12% of real photos).
  Without the re-check int8 agreed with fp32 on 96-97% of real photos; with it on 100% of 300.
  Needs AVX2 on x86 (ONNX Runtime's int8 kernels; without them int8 is no faster) or the dot-product
  extension on ARM; otherwise fp32 with a reason.
* **auto**: the fastest of the precisions this CPU supports whose top-1 agreement with fp32 is
  >= 98% on a held-out half of the calibration photos; fp32 when there are too few photos to tell.

Calibration photos are the user's own (a sample of the library, chosen by the caller): a shipped
set would need redistributable photos in the package, and a sample of the library matches what
will be tagged. Prepared models and auto's decision are cached in ``<cache_dir>/prepared/`` under
the sha256 of the weights file (computed without loading it, so without torch), so start-up reuses
them and changed weights never meet a stale file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from torch import nn

    from tagger.backbones import Backbone
    from tagger.engine import Predictor

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "bf16", "int8")
RUNTIMES = ("torch", "onnxruntime")
AGREEMENT_THRESHOLD = 0.98  # auto's minimum top-1 agreement with fp32
MIN_SPEEDUP = 1.1  # auto leaves fp32 only for a precision at least this much faster (timing noise)
RECHECK_MARGIN = 0.15  # int8: re-run in fp32 when top-1 leads top-2 by less (softmax probability)
MIN_CALIBRATION = 8  # photos needed to calibrate int8 (auto needs twice as many: half held out)
MAX_CALIBRATION = 32  # photos int8 is calibrated on
MAX_EVALUATION = 200  # held-out photos auto measures agreement and speed on
RECIPE = 2  # part of every cached file name: bump when preparation changes so caches are remade
FLOAT_NODES_DEFAULT = 3  # leading Conv/Gemm nodes kept in float32 when quantizing (stem + block 1)
FLOAT_NODES = {"resnet18": 1, "shufflenet_v2_x1_0": 1}  # plain stems: the stem conv only

X86 = {"x86_64", "amd64", "i386", "i686"}
ARM = {"aarch64", "arm64", "armv8l"}


@dataclass(frozen=True)
class CpuFeatures:
    """The CPU's architecture and instruction-set flags, as far as precision choices care."""

    arch: str
    flags: frozenset[str]

    @classmethod
    def detect(cls) -> CpuFeatures:
        """From /proc/cpuinfo's ``flags`` (x86) or ``Features`` (ARM) line; else ask torch."""
        arch = platform.machine().lower()
        flags = _cpuinfo_flags(Path("/proc/cpuinfo"))
        if not flags:  # no /proc/cpuinfo: the only case that needs torch here
            from tagger.torch_runtime import cpu_capability_flags

            flags = cpu_capability_flags()
        return cls(arch, frozenset(flags))

    @classmethod
    def of(cls, arch: str, flags: Iterable[str]) -> CpuFeatures:
        return cls(arch.lower(), frozenset(f.lower() for f in flags))

    @property
    def vnni(self) -> bool:
        """Int8 dot-product instructions (no uint8 x int8 saturation, so full-range weights)."""
        return bool(self.flags & {"avx512_vnni", "avx_vnni", "amx_int8"})

    def int8_unsupported(self) -> str | None:
        """Why int8 would not pay off on this CPU, or None if it is supported."""
        if self.arch in X86:
            return None if "avx2" in self.flags else "this CPU has no AVX2, which fast int8 needs"
        if self.arch in ARM:
            return None if "asimddp" in self.flags else "this CPU has no ARM dot-product extension (asimddp)"
        return f"int8 is only prepared for x86-64 and ARM64 CPUs, not {self.arch or 'this CPU'}"

    def bf16_unsupported(self) -> str | None:
        """Why bf16 would be slow (emulated) on this CPU, or None if it is native."""
        if self.arch in X86:
            if self.flags & {"avx512_bf16", "amx_bf16"}:
                return None
            return "this CPU has no native bf16 (AVX512-BF16 or AMX); emulated bf16 is slower than fp32"
        if self.arch in ARM:
            return None if "bf16" in self.flags else "this CPU has no native bf16 (ARM BF16 extension)"
        return f"bf16 is only prepared for x86-64 and ARM64 CPUs, not {self.arch or 'this CPU'}"

    def key(self) -> str:
        """A short stable id of the features that matter, for cache file names."""
        relevant = sorted(self.flags & {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_int8",
                                        "avx512_vnni", "avx_vnni", "asimddp", "bf16"})
        return hashlib.sha256(" ".join([self.arch, *relevant]).encode()).hexdigest()[:8]


def _cpuinfo_flags(path: Path) -> set[str]:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            return set(value.split())
    return set()


@dataclass
class Prepared:
    """A model ready for the tagger, and what was actually chosen."""

    predictor: Predictor  # uint8 (N, 3, crop, crop) pixels -> (N, 1000) float32 probabilities
    precision: str  # effective: "fp32", "bf16" or "int8"
    runtime: str  # effective: "torch" or "onnxruntime"
    reason: str  # one line: why this precision/runtime (shown in logs and by `phototag bench`)
    requested: str = ""
    agreement: float | None = None  # top-1 agreement with fp32 measured by auto, if it was
    details: dict = field(default_factory=dict)


# --------------------------------------------------------------------------- modules


class Int8WithRecheck:
    """int8 probabilities, with close calls (top-1 leads top-2 by < ``margin``) recomputed by the
    fp32 predictor. Both are ONNX Runtime predictors: numpy only."""

    runtime = "onnxruntime"

    def __init__(self, int8: Predictor, fp32: Predictor, margin: float = RECHECK_MARGIN) -> None:
        self.int8 = int8
        self.fp32 = fp32
        self.margin = margin
        self.images = 0  # counters for `phototag bench`
        self.rechecked = 0

    def use_threads(self, threads: int) -> None:
        self.int8.use_threads(threads)
        self.fp32.use_threads(threads)

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        probs = self.int8(pixels)
        self.images += len(pixels)
        if probs.shape[1] < 2:
            return probs
        top2 = np.partition(probs, -2, axis=1)[:, -2:]
        close = (top2[:, 1] - top2[:, 0]) < self.margin
        if close.any():
            probs = probs.copy()
            probs[close] = self.fp32(pixels[close])
            self.rechecked += int(close.sum())
        return probs


# --------------------------------------------------------------------------- cache


def weights_fingerprint(weights: Path | None) -> str:
    """sha256 (16 hex digits) of the weights file; "random" for seeded random weights (benchmarks).

    Hashing the file (~50 ms for ResNet-18's 45 MB) needs neither torch nor the model loaded.
    """
    from tagger.weights import sha256_file

    return sha256_file(Path(weights))[:16] if weights is not None else "random"


@dataclass(frozen=True)
class _Cache:
    folder: Path
    stem: str  # "<model>-<fingerprint>-r<RECIPE>"

    def path(self, suffix: str) -> Path:
        return self.folder / f"{self.stem}-{suffix}"

    def read_json(self, suffix: str) -> dict | None:
        try:
            return json.loads(self.path(suffix).read_text())
        except (OSError, ValueError):
            return None

    def write_json(self, suffix: str, data: dict) -> None:
        path = self.path(suffix)
        path.parent.mkdir(parents=True, exist_ok=True)
        temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        temp.write_text(json.dumps(data, indent=2) + "\n")
        os.replace(temp, path)


# --------------------------------------------------------------------------- preparing


def load_calibration(backbone: Backbone, paths: Iterable[str | os.PathLike],
                     limit: int | None = None) -> np.ndarray:
    """Photos -> a uint8 (N, 3, crop, crop) batch, decoded exactly as the tagger does; bad files skipped."""
    from tagger.preprocess import ImageError, load_image, resize_crop, to_uint8_array

    pixels = []
    for path in paths:
        if limit is not None and len(pixels) >= limit:
            break
        try:
            image, _ = load_image(path, backbone.resize, backbone.interpolation)
            pixels.append(to_uint8_array(resize_crop(image, backbone)))
        except ImageError as e:
            log.debug("calibration: skipping %s: %s", path, e)
    if not pixels:
        return _no_images(backbone)
    return np.stack(pixels)


def _no_images(backbone: Backbone) -> np.ndarray:
    return np.empty((0, 3, backbone.crop, backbone.crop), dtype=np.uint8)


def prepare_model(backbone: Backbone, weights: Path | None, precision: str = "fp32", *,
                  runtime: str = "torch", cache_dir: str | os.PathLike,
                  calibration: Iterable[str | os.PathLike] | np.ndarray = (),
                  features: CpuFeatures | None = None,
                  recheck_margin: float = RECHECK_MARGIN, threads: int = 0) -> Prepared:
    """``backbone`` with the weights file ``weights`` (None: seeded random weights, for benchmarks)
    prepared at ``precision`` on ``runtime``.

    The weights are loaded into torch only if torch runs the model or a prepared file must be made:
    ONNX Runtime with its prepared model (or auto's cached decision of it) in the cache imports no
    torch. Unusable weights raise ``tagger.weights.WeightsError`` when they are loaded.
    ``calibration``: the user's photos (paths, or an already decoded uint8 batch from
    ``load_calibration``) to calibrate int8 and, for "auto", to measure agreement on; needed only
    when nothing is cached yet.
    ``features``: the CPU's (default: detected). ``recheck_margin``: int8's close-call margin
    (0 turns the fp32 re-check off; benchmarks with random weights need that). ``threads``: the
    inference threads the tagger will use (0: the engine's default for this machine); auto times
    the candidates with that many, as int8's gain depends on it. Never raises for an unsupported combination:
    it falls back to fp32 (or to the torch runtime) and says why in ``reason``.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}")
    features = features or CpuFeatures.detect()
    cache = _Cache(Path(cache_dir) / "prepared",
                   f"{backbone.name}-{weights_fingerprint(weights)}-r{RECIPE}")
    if not threads:
        from tagger.engine import cpu_count, default_threads

        threads = default_threads(cpu_count())[0]
    context = _Context(backbone, weights, cache, features, calibration, recheck_margin, threads)
    notes = []
    if runtime == "onnxruntime" and (missing := _onnx_missing()):
        notes.append(f"runtime torch instead of onnxruntime: {missing}")
        runtime = "torch"
    if precision == "auto":
        prepared = _auto(context, runtime)
    else:
        prepared = _explicit(context, precision, runtime)
    prepared.requested = precision
    if notes:
        prepared.reason = "; ".join([*notes, prepared.reason])
    log.info("%s: %s on %s: %s", backbone.name, prepared.precision, prepared.runtime, prepared.reason)
    return prepared


@dataclass
class _Context:
    backbone: Backbone
    weights: Path | None
    cache: _Cache
    features: CpuFeatures
    calibration_source: Iterable[str | os.PathLike] | np.ndarray
    recheck_margin: float = RECHECK_MARGIN
    threads: int = 1
    _module: nn.Module | None = None
    _images: np.ndarray | None = None

    def module(self) -> nn.Module:
        """The float32 torch model, loaded (importing torch) the first time something needs it."""
        if self._module is None:
            from tagger.torch_runtime import build_model

            self._module = build_model(self.backbone, self.weights)
        return self._module

    def torch_predictor(self, wrapper: str = "") -> Predictor:
        """torch running the model as is, or wrapped in ``ChannelsLast`` / ``Bf16Autocast``."""
        from tagger import torch_runtime

        module = self.module()
        if wrapper:
            module = getattr(torch_runtime, wrapper)(module)
        return torch_runtime.TorchPredictor(module, self.backbone)

    def ort_predictor(self, path: Path) -> Predictor:
        from tagger.onnx_runtime import OrtPredictor

        return OrtPredictor(path, self.backbone, self.threads)

    def calibration(self) -> np.ndarray:
        """The calibration photos, decoded once (at most the number any step uses)."""
        if self._images is None:
            source = self.calibration_source
            if isinstance(source, np.ndarray):
                self._images = source[:MAX_CALIBRATION + MAX_EVALUATION]
            else:
                self._images = load_calibration(self.backbone, source,
                                                limit=MAX_CALIBRATION + MAX_EVALUATION)
        return self._images


def _onnx_missing() -> str | None:
    from tagger.onnx_runtime import ONNX_EXTRA, missing_packages

    missing = missing_packages()
    return f"{' and '.join(missing)} not installed ({ONNX_EXTRA})" if missing else None


def _explicit(ctx: _Context, precision: str, runtime: str) -> Prepared:
    if precision == "fp32":
        return Prepared(_fp32(ctx, runtime), "fp32", runtime, "fp32 as configured")
    if precision == "bf16":
        why_not = ctx.features.bf16_unsupported()
        if why_not:
            return Prepared(_fp32(ctx, runtime), "fp32", runtime, f"fp32 instead of bf16: {why_not}")
        note = "" if runtime == "torch" else " (bf16 runs in torch: ONNX Runtime's CPU provider has no bf16 kernels)"
        return Prepared(ctx.torch_predictor("Bf16Autocast"), "bf16", "torch", "bf16 as configured" + note)
    # int8
    why_not = ctx.features.int8_unsupported() or _onnx_missing()
    if why_not:
        return Prepared(_fp32(ctx, runtime), "fp32", runtime, f"fp32 instead of int8: {why_not}")
    int8 = _int8(ctx)
    if int8 is None:
        have = len(ctx.calibration())
        return Prepared(_fp32(ctx, runtime), "fp32", runtime,
                        f"fp32 instead of int8: calibrating int8 needs at least {MIN_CALIBRATION} "
                        f"readable photos, got {have}")
    note = "" if runtime == "onnxruntime" else " (int8 runs in ONNX Runtime)"
    return Prepared(int8, "int8", "onnxruntime", "int8 as configured" + note)


def _fp32(ctx: _Context, runtime: str) -> Predictor:
    if runtime == "onnxruntime":
        return ctx.ort_predictor(_fp32_onnx(ctx))
    return ctx.torch_predictor("ChannelsLast")


def _fp32_onnx(ctx: _Context) -> Path:
    from tagger.onnx_runtime import export_onnx

    path = ctx.cache.path("fp32.onnx")
    if not path.is_file():
        log.info("exporting %s to %s", ctx.backbone.name, path)
        export_onnx(ctx.module(), ctx.backbone.crop, path)
    return path


def _int8_onnx(ctx: _Context, images: np.ndarray | None = None) -> Path | None:
    """The cached int8 model, quantized now (on ``images`` or the calibration photos) if missing."""
    from tagger.onnx_runtime import quantize_int8

    reduce_range = not ctx.features.vnni
    suffix = f"int8-{'rr' if reduce_range else 'full'}"
    path = ctx.cache.path(f"{suffix}.onnx")
    if path.is_file():
        return path
    images = ctx.calibration()[:MAX_CALIBRATION] if images is None else images
    if len(images) < MIN_CALIBRATION:
        return None
    float_nodes = FLOAT_NODES.get(ctx.backbone.name, FLOAT_NODES_DEFAULT)
    log.info("quantizing %s to int8 on %d photos (takes a minute, once)", ctx.backbone.name, len(images))
    from tagger.preprocess import normalize

    quantize_int8(_fp32_onnx(ctx), path, normalize(images, ctx.backbone),
                  float_nodes=float_nodes, reduce_range=reduce_range)
    ctx.cache.write_json(f"{suffix}.json", {
        "calibration_images": len(images), "float_nodes": float_nodes, "reduce_range": reduce_range,
        "recheck_margin": RECHECK_MARGIN, "onnxruntime": _ort_version(),
    })
    return path


def _int8(ctx: _Context, images: np.ndarray | None = None) -> Predictor | None:
    """int8 with the fp32 re-check, both in ONNX Runtime; None if it cannot be calibrated."""
    path = _int8_onnx(ctx, images)
    if path is None:
        return None
    return Int8WithRecheck(ctx.ort_predictor(path), ctx.ort_predictor(_fp32_onnx(ctx)), ctx.recheck_margin)


def _ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


def _auto(ctx: _Context, runtime: str) -> Prepared:
    """Pick the fastest supported precision with >= 98% top-1 agreement with fp32 (cached)."""
    candidates = ["fp32"]
    skipped = []
    for precision, why_not in (("int8", ctx.features.int8_unsupported() or _onnx_missing()),
                               ("bf16", ctx.features.bf16_unsupported())):
        if why_not:
            skipped.append(f"no {precision}: {why_not}")
        else:
            candidates.append(precision)
    if len(candidates) == 1:
        return Prepared(_fp32(ctx, runtime), "fp32", runtime, "auto chose fp32: " + "; ".join(skipped))

    decision_suffix = f"auto-{runtime}-{ctx.features.key()}-t{ctx.threads}.json"
    decision = ctx.cache.read_json(decision_suffix)
    if decision and decision.get("precision") in candidates:
        prepared = _build(ctx, decision["precision"], runtime)
        if prepared is not None:
            prepared.reason = decision["reason"] + " (decided earlier; cached)"
            prepared.agreement = decision.get("agreement", {}).get(decision["precision"])
            return prepared

    images = ctx.calibration()
    held_out = len(images) // 2 if len(images) <= 2 * MAX_CALIBRATION else len(images) - MAX_CALIBRATION
    calibrate, evaluate = images[:len(images) - held_out], images[len(images) - held_out:]
    if len(calibrate) < MIN_CALIBRATION or len(evaluate) < MIN_CALIBRATION:
        return Prepared(_fp32(ctx, runtime), "fp32", runtime,
                        f"auto chose fp32: measuring agreement needs at least {2 * MIN_CALIBRATION} "
                        f"readable calibration photos, got {len(images)}")

    return _decide(ctx, runtime, candidates, skipped, calibrate, evaluate, decision_suffix)


def _decide(ctx: _Context, runtime: str, candidates: list[str], skipped: list[str],
            calibrate: np.ndarray, evaluate: np.ndarray, decision_suffix: str) -> Prepared:
    reference = _top1(ctx.torch_predictor(), evaluate)
    agreement: dict[str, float] = {}
    speed: dict[str, float] = {}
    predictors: dict[str, Predictor] = {}
    for precision in candidates:
        predictor = _build_predictor(ctx, precision, runtime, calibrate)
        predictor.use_threads(ctx.threads)  # timed on the thread count the tagger will use
        predictors[precision] = predictor
        agreement[precision] = float(np.mean(_top1(predictor, evaluate) == reference))
        speed[precision] = _ms_per_image(predictor, evaluate[:16])
    good = [p for p in candidates
            if p == "fp32" or (agreement[p] >= AGREEMENT_THRESHOLD and speed["fp32"] / speed[p] >= MIN_SPEEDUP)]
    chosen = min(good, key=lambda p: speed[p])
    figures = ", ".join(f"{p} {speed[p]:.1f} ms/image, {agreement[p]:.0%} agreement" for p in candidates)
    reason = (f"auto chose {chosen}, the fastest with >= {AGREEMENT_THRESHOLD:.0%} top-1 agreement "
              f"with fp32 on {len(evaluate)} held-out photos and >= {MIN_SPEEDUP}x its speed on "
              f"{ctx.threads} thread{'s' if ctx.threads > 1 else ''} ({figures})")
    if skipped:
        reason += "; " + "; ".join(skipped)
    ctx.cache.write_json(decision_suffix, {
        "precision": chosen, "reason": reason, "agreement": agreement, "ms_per_image": speed,
        "evaluated_images": len(evaluate), "calibration_images": len(calibrate), "threads": ctx.threads,
        "cpu": {"arch": ctx.features.arch, "flags": sorted(ctx.features.flags)},
    })
    effective_runtime = "onnxruntime" if chosen == "int8" else ("torch" if chosen == "bf16" else runtime)
    return Prepared(predictors[chosen], chosen, effective_runtime, reason,
                    agreement=agreement[chosen], details={"agreement": agreement, "ms_per_image": speed})


def _build_predictor(ctx: _Context, precision: str, runtime: str, calibrate: np.ndarray) -> Predictor:
    if precision == "int8":
        predictor = _int8(ctx, calibrate)
        assert predictor is not None  # enough photos was checked by the caller
        return predictor
    if precision == "bf16":
        return ctx.torch_predictor("Bf16Autocast")
    return _fp32(ctx, runtime)


def _build(ctx: _Context, precision: str, runtime: str) -> Prepared | None:
    """A cached decision's precision; None if its int8 model is gone (then decide again)."""
    if precision == "int8":
        predictor = _int8(ctx, images=_no_images(ctx.backbone))
        if predictor is None:
            return None
        return Prepared(predictor, "int8", "onnxruntime", "")
    if precision == "bf16":
        return Prepared(ctx.torch_predictor("Bf16Autocast"), "bf16", "torch", "")
    return Prepared(_fp32(ctx, runtime), "fp32", runtime, "")


def _top1(predictor: Predictor, images: np.ndarray, batch: int = 8) -> np.ndarray:
    return np.concatenate([predictor(images[i:i + batch]).argmax(axis=1)
                           for i in range(0, len(images), batch)])


def _ms_per_image(predictor: Predictor, batch: np.ndarray, runs: int = 5) -> float:
    """Milliseconds per image of ``predictor`` on ``batch``: the fastest of ``runs`` runs after a
    warm-up (the minimum is the figure least disturbed by other processes)."""
    times = []
    predictor(batch)
    for _ in range(runs):
        start = time.perf_counter()
        predictor(batch)
        times.append(time.perf_counter() - start)
    return min(times) / len(batch) * 1000
