"""A user's own backbone for the checkpoint import tests (tests/test_models.py).

``tiny_net`` is the kind of factory ``import_external`` takes as ``"module:name"``: it maps
normalised NCHW images to (batch, FEATURES) features.
"""

from __future__ import annotations

from torch import nn

FEATURES = 16


def tiny_net(channels: int = 1, width: int = 4) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(channels, width, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(4 * width, FEATURES),
    )
