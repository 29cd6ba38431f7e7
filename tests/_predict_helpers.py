"""Pieces shared by the prediction tests (test_predict, test_inputs, test_radiometry)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

CLASSES = ["water", "forest", "field", "town"]
COLORS = [(0, 0, 255), (0, 128, 0), (255, 255, 0), (200, 0, 0)]


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny tensors gain nothing from intra-op threads, and on a busy 2-core machine the thread
    hand-offs cost more than the maths; restore the setting afterwards. (Autouse in every test
    module that imports it.)"""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def per_pixel_model(bands: int = 3, classes: int = 4, seed: int = 0) -> nn.Module:
    """1x1 convolutions only: each output pixel depends on its own input pixel alone."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(bands, 16, 1), nn.ReLU(), nn.Conv2d(16, classes, 1)).eval()
