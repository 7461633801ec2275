"""Batched tagging: decode threads feed batches to one inference loop.

``Tagger.tag_files`` submits files to a thread pool that decodes, resizes and crops them to uint8
pixels (Pillow and numpy only: they release the GIL, and no torch work competes with inference's
threads), keeping about two batches in flight, while the calling thread hands each batch to the
predictor (uint8 pixels -> probabilities: torch, or ONNX Runtime without torch; see
``tagger.precision``). Results come back in input order; a file that cannot be read yields an
``ImageResult`` with ``error`` set and never fails its batch.

This module imports no torch: with ``runtime = "onnxruntime"`` and a prepared model in the cache,
``open_tagger`` and ``tag_files`` run on Pillow, numpy and onnxruntime alone.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np

from tagger.preprocess import ImageError, load_image, resize_crop, to_uint8_array
from tagger.results import ClassScore, ImageResult

if TYPE_CHECKING:
    from tagger.backbones import Backbone
    from tagger.labels import LabelMap

log = logging.getLogger(__name__)


class Predictor(Protocol):
    """A prepared model: ``tagger.torch_runtime.TorchPredictor``, ``tagger.onnx_runtime.OrtPredictor``
    or ``tagger.precision.Int8WithRecheck``."""

    runtime: str  # "torch" or "onnxruntime"

    def use_threads(self, threads: int) -> None:
        """Run inference on ``threads`` intra-op threads."""

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 (N, 3, crop, crop) pixels -> (N, classes) float32 probabilities."""


def cpu_count() -> int:
    """Cores this process may run on (respects taskset/cgroup affinity where the OS reports it)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def default_threads(cores: int) -> tuple[int, int]:
    """``(inference threads, decode threads)`` for ``cores`` cores.

    Decoding a 12 MP JPEG (~25-60 ms even in draft mode) costs about as much as ResNet-18
    inference per image, and Pillow runs without the GIL, so every core gets a decode thread, and
    inference every core too: while a batch runs, the decoders soon wait for room in the queue,
    so the cores idle unless inference can take them all. Measured on 2 cores, side by side
    (``benchmarks/bench_tagger.py --splits 1+1,1+2,2+1,2+2``, ResNet-18 fp32, 12 MP JPEGs):
    2+2 threads 16.3 images/s against 13.0 for 1+2 with torch, 20.4 against 16.9 with ONNX
    Runtime; 1+1 and 2+1 were no better than 1+2.
    """
    return max(1, cores), max(1, cores)


@dataclass
class StageTimes:
    """Seconds spent per stage, summed over threads (decode and preprocess run in parallel)."""

    images: int = 0
    decode: float = 0.0
    preprocess: float = 0.0
    inference: float = 0.0


@dataclass
class _Decoded:
    pixels: np.ndarray | None  # (3, crop, crop) uint8; normalised per batch by the predictor
    size: tuple[int, int] | None = None
    error: str | None = None


class Tagger:
    """A prepared model (``predictor``) with its label map, tagging image files in batches."""

    def __init__(self, backbone: Backbone, predictor: Predictor, labels: LabelMap, *,
                 batch_size: int = 16, threads: int = 0, decode_threads: int = 0) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        default_inference, default_decode = default_threads(cpu_count())
        self.backbone = backbone
        self.predictor = predictor
        self.labels = labels
        self.batch_size = batch_size
        self.threads = threads or default_inference
        self.decode_threads = decode_threads or default_decode
        self.model_name: str = backbone.name
        self.mapping_version: str = labels.version
        self.precision = "fp32"  # what open_tagger prepared the model at
        self.runtime = predictor.runtime
        self.stats = StageTimes()

    def tag_files(self, paths: Iterable[str | os.PathLike], top: int = 5) -> Iterator[ImageResult]:
        """Tag each file; yields one ``ImageResult`` per path, in input order.

        Runs inference on ``threads`` threads (with torch, its process-wide intra-op thread count;
        with ONNX Runtime, the session's).
        """
        self.predictor.use_threads(self.threads)
        pool = ThreadPoolExecutor(self.decode_threads, thread_name_prefix="phototag-decode")
        try:
            batch: list[tuple[Path, _Decoded]] = []
            ready = 0
            for path, decoded in self._decode_ahead(pool, paths):
                batch.append((path, decoded))
                ready += decoded.error is None
                if ready == self.batch_size:
                    yield from self._infer(batch, top)
                    batch, ready = [], 0
            if batch:
                yield from self._infer(batch, top)
        finally:  # also when the caller stops early: drop the files not started yet
            pool.shutdown(wait=True, cancel_futures=True)

    def _decode_ahead(self, pool: ThreadPoolExecutor,
                      paths: Iterable[str | os.PathLike]) -> Iterator[tuple[Path, _Decoded]]:
        """Decoded files in input order, keeping two batches' worth of files in the pool.

        While the caller runs inference on one batch, the pool already decodes the next.
        """
        window = 2 * self.batch_size
        pending: deque[tuple[Path, Future[_Decoded]]] = deque()
        for path in paths:
            path = Path(path)
            pending.append((path, pool.submit(self._decode, path)))
            if len(pending) >= window:
                path, future = pending.popleft()
                yield path, future.result()
        while pending:
            path, future = pending.popleft()
            yield path, future.result()

    def _decode(self, path: Path) -> _Decoded:
        """Runs in a decode thread: file -> cropped uint8 pixels, or the reason it failed."""
        try:
            start = time.perf_counter()
            image, size = load_image(path, self.backbone.resize, self.backbone.interpolation)
            decoded = time.perf_counter()
            pixels = to_uint8_array(resize_crop(image, self.backbone))
            done = time.perf_counter()
        except ImageError as e:
            return _Decoded(None, error=str(e))
        except MemoryError:
            return _Decoded(None, error="out of memory while decoding")
        except Exception as e:  # a decoder bug on a malformed file must not stop the others
            log.debug("decoding %s failed", path, exc_info=True)
            return _Decoded(None, error=f"cannot decode: {type(e).__name__}: {e}")
        self.stats.decode += decoded - start  # float += under the GIL; good enough for statistics
        self.stats.preprocess += done - decoded
        return _Decoded(pixels, size)

    def _infer(self, batch: list[tuple[Path, _Decoded]], top: int) -> Iterator[ImageResult]:
        good = [decoded.pixels for _, decoded in batch if decoded.pixels is not None]
        probabilities = np.empty((0, 0), dtype=np.float32)
        if good:
            start = time.perf_counter()
            probabilities = self.predictor(np.stack(good))
            self.stats.inference += time.perf_counter() - start
            self.stats.images += len(good)
        rows = iter(probabilities)
        for path, decoded in batch:
            if decoded.error is not None:
                yield ImageResult(path, error=decoded.error)
            else:
                yield self._result(path, decoded, next(rows), top)

    def _result(self, path: Path, decoded: _Decoded, probs: np.ndarray, top: int) -> ImageResult:
        """One image's result from its row of probabilities (the same for every predictor)."""
        indices = np.argsort(-probs, kind="stable")[:top]  # highest first; ties in class order
        classes = []
        for index in indices.tolist():
            label = self.labels.classes[index]
            classes.append(ClassScore(index=index, wnid=label.wnid, name=label.name,
                                      score=float(probs[index])))
        width, height = decoded.size or (None, None)
        return ImageResult(path, classes=classes, tags=self.labels.tags_for(probs.tolist()),
                           width=width, height=height)


def open_tagger(name: str = "resnet18", *, weights_file: str | os.PathLike | None = None,
                cache_dir: str | os.PathLike, labels_file: str | os.PathLike | None = None,
                batch_size: int = 16, threads: int = 0, decode_threads: int = 0,
                precision: str = "fp32", runtime: str = "torch",
                calibration: Iterable[str | os.PathLike] = ()) -> Tagger:
    """Backbone ``name`` (weights from ``weights_file`` or ``cache_dir``) with the label map,
    prepared at ``precision`` on ``runtime`` (see ``tagger.precision``; ONNX Runtime with its
    prepared model already in ``cache_dir`` loads no torch).

    ``calibration``: a sample of the user's photos, needed to prepare int8 or decide "auto" the
    first time (the result is cached in ``cache_dir``); without it those fall back to fp32 and say
    why in the log. Raises ``tagger.weights.WeightsError`` (``MissingWeightsError`` if there are
    no weights).
    """
    from tagger.backbones import get_backbone
    from tagger.labels import load_label_map
    from tagger.precision import prepare_model
    from tagger.weights import weights_path

    backbone = get_backbone(name)
    weights = weights_path(backbone, weights_file=Path(weights_file) if weights_file else None,
                           cache_dir=Path(cache_dir))
    labels = load_label_map(labels_file)
    prepared = prepare_model(backbone, weights, precision, runtime=runtime, cache_dir=cache_dir,
                             calibration=calibration, threads=threads)
    tagger = Tagger(backbone, prepared.predictor, labels, batch_size=batch_size, threads=threads,
                    decode_threads=decode_threads)
    tagger.precision = prepared.precision
    return tagger
