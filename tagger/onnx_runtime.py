"""ONNX Runtime as an inference backend: export a backbone to ONNX once, quantize it to int8, run it.

* ``export_onnx`` writes the float32 model (dynamic batch) with torch's TorchScript-based exporter:
  torch's newer exporter (``dynamo=True``) needs the ``onnxscript`` package, which phototag does not
  depend on; the TorchScript one is deprecated but still present in torch 2.x, and is tried first.
* ``quantize_int8`` is ONNX Runtime's post-training static quantization in QDQ format, calibrated
  on preprocessed photos (see ``tagger.precision`` for the recipe and why).
* ``OrtPredictor`` runs a model file in an ``InferenceSession``: uint8 pixels in, probabilities out,
  with normalisation and softmax in numpy, so tagging with a prepared model needs no torch at all
  (``import torch`` alone costs ~700 MB of RSS with a CUDA build).

Needs the optional packages ``onnxruntime`` and ``onnx`` (``pip install 'phototag[onnx]'``); only
exporting imports torch.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from tagger.preprocess import normalize

if TYPE_CHECKING:
    from torch import nn

    from tagger.backbones import Backbone

INPUT = "input"
OUTPUT = "logits"
OPSET = 17
ONNX_EXTRA = "pip install 'phototag[onnx]'"


class OnnxUnavailableError(RuntimeError):
    """onnxruntime (or onnx, needed to export and quantize) is not installed."""


def missing_packages() -> list[str]:
    """Which of the packages the ONNX Runtime backend needs are not installed (found without
    importing them: ``onnx`` is only imported to export and quantize)."""
    return [name for name in ("onnxruntime", "onnx") if importlib.util.find_spec(name) is None]


def require() -> None:
    missing = missing_packages()
    if missing:
        raise OnnxUnavailableError(f"{' and '.join(missing)} not installed: {ONNX_EXTRA}")


@contextlib.contextmanager
def _atomic_path(path: Path):
    """Yield a temp path in ``path``'s folder that is renamed to ``path`` if the block succeeds."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(temp)
        os.replace(temp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)


def export_onnx(module: nn.Module, crop: int, path: Path) -> Path:
    """Export ``module`` (eval mode, float32) to ``path`` with a dynamic batch dimension."""
    require()
    import torch

    example = torch.zeros(1, 3, crop, crop)
    kwargs = dict(input_names=[INPUT], output_names=[OUTPUT], opset_version=OPSET,
                  dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}})
    with _atomic_path(path) as temp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        module = module.eval()
        try:
            torch.onnx.export(module, (example,), str(temp), dynamo=False, **kwargs)
        except TypeError:  # a torch without the TorchScript exporter: the dynamo one (onnxscript)
            torch.onnx.export(module, (example,), str(temp), dynamo=True, **kwargs)
    return path


def quantize_int8(fp32_path: Path, out_path: Path, calibration: np.ndarray, *,
                  float_nodes: int = 0, reduce_range: bool = True, batch: int = 8) -> Path:
    """Static int8 quantization (QDQ) of ``fp32_path``, calibrated on ``calibration`` (the
    normalised float32 batch the model takes).

    Weights int8 per output channel, activations uint8 per tensor with MinMax ranges. The first
    ``float_nodes`` Conv/Gemm nodes stay float32 (the stem is the most sensitive to quantization).
    ``reduce_range`` uses 7-bit weights, which ONNX Runtime recommends on x86 CPUs without VNNI,
    where uint8 x int8 products can saturate.
    """
    require()
    import onnx
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat,
                                          QuantType, quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    # Equal-sized batches only: some calibrators cannot stack a short last batch.
    usable = len(calibration) - len(calibration) % batch if len(calibration) > batch else len(calibration)
    batches = [{INPUT: np.ascontiguousarray(calibration[i:i + batch], dtype=np.float32)} for i in range(0, usable, batch)]

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._batches = iter(batches)

        def get_next(self):
            return next(self._batches, None)

    nodes = [n.name for n in onnx.load(str(fp32_path)).graph.node if n.op_type in ("Conv", "Gemm")]
    with tempfile.TemporaryDirectory(dir=out_path.parent) as scratch, _atomic_path(out_path) as temp:
        prepared = Path(scratch) / "preprocessed.onnx"
        # The quantizer logs every scale it adjusts at INFO on the root logger: keep that out of ours.
        logging.disable(logging.INFO)
        try:
            quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=False)
            quantize_static(
                str(prepared), str(temp), Reader(), quant_format=QuantFormat.QDQ,
                activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True,
                reduce_range=reduce_range, calibrate_method=CalibrationMethod.MinMax,
                nodes_to_exclude=nodes[:float_nodes],
            )
        finally:
            logging.disable(logging.NOTSET)
    return out_path


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax of (N, classes) logits, in float32."""
    shifted = logits.astype(np.float32) - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


class OrtPredictor:
    """uint8 (N, 3, crop, crop) pixels -> (N, 1000) float32 probabilities with ONNX Runtime's CPU
    provider: normalised in numpy with the backbone's mean/std, softmax in numpy; no torch.

    The session is created on the first call, with ``threads`` intra-op threads.
    """

    runtime = "onnxruntime"

    def __init__(self, path: Path, backbone: Backbone, threads: int = 1) -> None:
        require()
        self.path = Path(path)
        self.backbone = backbone
        self.threads = max(1, threads)
        self._session = None

    def use_threads(self, threads: int) -> None:
        """Intra-op threads of the session (recreated on the next call if the count changes)."""
        if threads != self.threads:
            self.threads = max(1, threads)
            self._session = None

    def session(self):
        if self._session is None:
            import onnxruntime as ort

            options = ort.SessionOptions()
            options.intra_op_num_threads = self.threads
            options.inter_op_num_threads = 1
            # Idle pool threads would otherwise spin and take CPU from the decode threads.
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            options.log_severity_level = 3
            self._session = ort.InferenceSession(str(self.path), options,
                                                 providers=["CPUExecutionProvider"])
        return self._session

    def logits(self, inputs: np.ndarray) -> np.ndarray:
        """The model's logits for the normalised float32 batch ``inputs``."""
        (logits,) = self.session().run([OUTPUT], {INPUT: np.ascontiguousarray(inputs, dtype=np.float32)})
        return logits

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        return softmax(self.logits(normalize(pixels, self.backbone)))

    def __repr__(self) -> str:
        return f"OrtPredictor({self.path}, threads={self.threads})"
