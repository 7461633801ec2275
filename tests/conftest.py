"""Fixtures shared across the test suite."""

from __future__ import annotations

from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="session")
def resnet18_weights(tmp_path_factory) -> Path:
    """A ResNet-18 state dict with seeded random weights, saved the way torchvision's files are.

    The official weights cannot be downloaded here; tests exercise the real load path with these.
    """
    import torch
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None)
    path = tmp_path_factory.mktemp("weights") / "resnet18-random.pth"
    torch.save(model.state_dict(), path)
    return path
