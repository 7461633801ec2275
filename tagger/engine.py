"""Batched tagging: decode threads feed batches to one inference loop.

``Tagger.tag_files`` submits files to a thread pool that decodes, resizes and crops them to uint8
pixels (Pillow and numpy only: they release the GIL, and no torch work competes with inference's
threads), keeping about two batches in flight, while the calling thread normalises each batch and
runs inference on it. Results come back in input order; a file that
cannot be read yields an ``ImageResult`` with ``error`` set and never fails its batch.
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
from typing import TYPE_CHECKING

import torch
from torch import nn

from tagger.preprocess import ImageError, load_image, normalize, resize_crop, to_uint8_tensor
from tagger.results import ClassScore, ImageResult

if TYPE_CHECKING:
    from tagger.backbones import Backbone
    from tagger.labels import LabelMap

log = logging.getLogger(__name__)


def cpu_count() -> int:
    """Cores this process may run on (respects taskset/cgroup affinity where the OS reports it)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def default_threads(cores: int) -> tuple[int, int]:
    """``(inference threads, decode threads)`` for ``cores`` cores.

    Decoding a 12 MP JPEG (~25-30 ms even in draft mode) costs about as much as ResNet-18 inference
    per image, and Pillow runs without the GIL, so every core gets a decode thread; inference gets
    half the cores: on 2 cores one inference thread beat two (see benchmarks/bench_tagger.py).
    """
    return max(1, cores // 2), max(1, cores)


@dataclass
class StageTimes:
    """Seconds spent per stage, summed over threads (decode and preprocess run in parallel)."""

    images: int = 0
    decode: float = 0.0
    preprocess: float = 0.0
    inference: float = 0.0


@dataclass
class _Decoded:
    pixels: torch.Tensor | None  # (3, crop, crop) uint8; normalised per batch in the inference thread
    size: tuple[int, int] | None = None
    error: str | None = None


class Tagger:
    """A loaded model with its label map, tagging image files in batches."""

    def __init__(self, backbone: Backbone, model: nn.Module, labels: LabelMap, *,
                 batch_size: int = 16, threads: int = 0, decode_threads: int = 0) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        default_inference, default_decode = default_threads(cpu_count())
        self.backbone = backbone
        self.model = model.eval()
        self.labels = labels
        self.batch_size = batch_size
        self.threads = threads or default_inference
        self.decode_threads = decode_threads or default_decode
        self.model_name: str = backbone.name
        self.mapping_version: str = labels.version
        self.precision = "fp32"  # what open_tagger prepared the model at
        self.runtime = "torch"
        self.stats = StageTimes()

    def tag_files(self, paths: Iterable[str | os.PathLike], top: int = 5) -> Iterator[ImageResult]:
        """Tag each file; yields one ``ImageResult`` per path, in input order.

        Sets torch's (process-wide) intra-op thread count to ``threads``.
        """
        torch.set_num_threads(self.threads)
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
            image, size = load_image(path, self.backbone.resize)
            decoded = time.perf_counter()
            pixels = to_uint8_tensor(resize_crop(image, self.backbone))
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
        probabilities: list[torch.Tensor] = []
        if good:
            start = time.perf_counter()
            with torch.inference_mode():
                inputs = normalize(torch.stack(good), self.backbone)
                probabilities = list(self.model(inputs).softmax(dim=1))
            self.stats.inference += time.perf_counter() - start
            self.stats.images += len(good)
        rows = iter(probabilities)
        for path, decoded in batch:
            if decoded.error is not None:
                yield ImageResult(path, error=decoded.error)
            else:
                yield self._result(path, decoded, next(rows), top)

    def _result(self, path: Path, decoded: _Decoded, probs: torch.Tensor, top: int) -> ImageResult:
        values, indices = probs.topk(min(top, probs.numel()))
        classes = []
        for score, index in zip(values.tolist(), indices.tolist()):
            label = self.labels.classes[index]
            classes.append(ClassScore(index=index, wnid=label.wnid, name=label.name, score=score))
        width, height = decoded.size or (None, None)
        return ImageResult(path, classes=classes, tags=self.labels.tags_for(probs.tolist()),
                           width=width, height=height)


def open_tagger(name: str = "resnet18", *, weights_file: str | os.PathLike | None = None,
                cache_dir: str | os.PathLike, labels_file: str | os.PathLike | None = None,
                batch_size: int = 16, threads: int = 0, decode_threads: int = 0,
                precision: str = "fp32", runtime: str = "torch",
                calibration: Iterable[str | os.PathLike] = ()) -> Tagger:
    """Load backbone ``name`` (weights from ``weights_file`` or ``cache_dir``) and the label map,
    prepared at ``precision`` on ``runtime`` (see ``tagger.precision``).

    ``calibration``: a sample of the user's photos, needed to prepare int8 or decide "auto" the
    first time (the result is cached in ``cache_dir``); without it those fall back to fp32 and say
    why in the log. Raises ``tagger.weights.WeightsError`` (``MissingWeightsError`` if there are
    no weights).
    """
    from tagger.labels import load_label_map
    from tagger.precision import prepare_model
    from tagger.weights import load_model

    backbone, model = load_model(name, weights_file=weights_file, cache_dir=cache_dir)
    labels = load_label_map(labels_file)
    prepared = prepare_model(backbone, model, precision, runtime=runtime, cache_dir=cache_dir,
                             calibration=calibration, threads=threads)
    tagger = Tagger(backbone, prepared.module, labels, batch_size=batch_size, threads=threads,
                    decode_threads=decode_threads)
    tagger.precision, tagger.runtime = prepared.precision, prepared.runtime
    return tagger
