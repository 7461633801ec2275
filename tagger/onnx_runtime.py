"""ONNX Runtime as an inference backend: export a backbone to ONNX once, quantize it to int8, run it.

* ``export_onnx`` writes the float32 model (dynamic batch) with torch's TorchScript-based exporter:
  torch's newer exporter (``dynamo=True``) needs the ``onnxscript`` package, which phototag does not
  depend on; the TorchScript one is deprecated but still present in torch 2.x, and is tried first.
* ``quantize_int8`` is ONNX Runtime's post-training static quantization in QDQ format, calibrated
  on preprocessed photos (see ``tagger.precision`` for the recipe and why).
* ``OrtModule`` wraps an ``InferenceSession`` as an ``nn.Module`` that takes the same float batch
  tensor as the torch model and returns logits as a tensor, so the tagger runs it unchanged.

Needs the optional packages ``onnxruntime`` and ``onnx`` (``pip install 'phototag[onnx]'``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

INPUT = "input"
OUTPUT = "logits"
OPSET = 17
ONNX_EXTRA = "pip install 'phototag[onnx]'"


class OnnxUnavailableError(RuntimeError):
    """onnxruntime (or onnx, needed to export and quantize) is not installed."""


def missing_packages() -> list[str]:
    """Which of the packages the ONNX Runtime backend needs are not importable."""
    missing = []
    for name in ("onnxruntime", "onnx"):
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    return missing


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


def quantize_int8(fp32_path: Path, out_path: Path, calibration: torch.Tensor, *,
                  float_nodes: int = 0, reduce_range: bool = True, batch: int = 8) -> Path:
    """Static int8 quantization (QDQ) of ``fp32_path``, calibrated on the batch ``calibration``.

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
    batches = [{INPUT: calibration[i:i + batch].numpy()} for i in range(0, usable, batch)]

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


class OrtModule(nn.Module):
    """An ONNX model run by ONNX Runtime's CPU provider, called like the torch model it came from.

    The session is created on the first call with as many intra-op threads as torch is set to use
    at that moment (``Tagger.tag_files`` sets them), unless ``threads`` is given.
    """

    def __init__(self, path: Path, threads: int = 0) -> None:
        super().__init__()
        require()
        self.path = Path(path)
        self.threads = threads
        self._session = None

    def session(self):
        if self._session is None:
            import onnxruntime as ort

            options = ort.SessionOptions()
            options.intra_op_num_threads = self.threads or torch.get_num_threads()
            options.inter_op_num_threads = 1
            # Idle pool threads would otherwise spin and take CPU from the decode threads.
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            options.log_severity_level = 3
            self._session = ort.InferenceSession(str(self.path), options,
                                                 providers=["CPUExecutionProvider"])
        return self._session

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        inputs = np.ascontiguousarray(batch.detach().to(torch.float32).numpy())
        (logits,) = self.session().run([OUTPUT], {INPUT: inputs})
        return torch.from_numpy(logits)

    def extra_repr(self) -> str:
        return str(self.path)

