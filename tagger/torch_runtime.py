"""torch as an inference backend: the default runtime, and the reference the others are checked against.

``TorchPredictor`` is the torch side of the predictor interface the engine calls (uint8 pixels in,
probabilities out; see ``tagger.engine.Predictor``); ``ChannelsLast`` and ``Bf16Autocast`` are the
modules ``tagger.precision`` prepares for fp32 and bf16. Only this module and the model-building,
export and weight-loading code import torch: ONNX Runtime with a prepared model runs without it.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from tagger.preprocess import normalize

if TYPE_CHECKING:
    from tagger.backbones import Backbone

RANDOM_SEED = 0  # random weights (benchmarks without weights at hand) are seeded: the same every run


def build_model(backbone: Backbone, weights: Path | None) -> nn.Module:
    """``backbone`` in eval mode with ``weights`` loaded; None: seeded random weights."""
    if weights is None:
        torch.manual_seed(RANDOM_SEED)
    return backbone.build(weights)


class TorchPredictor:
    """uint8 (N, 3, crop, crop) pixels -> (N, 1000) float32 probabilities with a torch module.

    ``module`` takes the normalised float batch and returns logits (a backbone, or one of the
    wrappers below). Normalisation is the shared numpy one (tagger.preprocess); softmax in torch.
    """

    runtime = "torch"

    def __init__(self, module: nn.Module, backbone: Backbone) -> None:
        self.module = module.eval()
        self.backbone = backbone

    def use_threads(self, threads: int) -> None:
        """torch's intra-op thread count is process-wide."""
        torch.set_num_threads(threads)

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            inputs = torch.from_numpy(normalize(pixels, self.backbone))
            return self.module(inputs).softmax(dim=1).numpy()


class ChannelsLast(nn.Module):
    """fp32 torch with channels-last weights and input (oneDNN's faster layout on x86)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model.to(memory_format=torch.channels_last)

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        return self.model(batch.contiguous(memory_format=torch.channels_last))


class Bf16Autocast(nn.Module):
    """torch autocast to bfloat16 (channels-last); logits come back as float32."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model.to(memory_format=torch.channels_last)

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = self.model(batch.contiguous(memory_format=torch.channels_last))
        return logits.float()


def cpu_capability_flags() -> set[str]:
    """Coarse x86 flags from torch's own dispatch level ("DEFAULT", "AVX2", "AVX512", ...)."""
    capability = torch.backends.cpu.get_cpu_capability().upper()
    flags = set()
    if capability.startswith(("AVX2", "AVX512")):
        flags.add("avx2")
    if capability.startswith("AVX512"):
        flags.add("avx512f")
    return flags
