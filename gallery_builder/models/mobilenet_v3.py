"""MobileNetV3-Small (Howard et al., "Searching for MobileNetV3", ICCV 2019), as torchvision's
``mobilenet_v3_small`` builds it, for latency figures comparable with published phone numbers.

torchvision does not import beside the pinned torch here, so the same architecture is written
out: the same layer table, squeeze-and-excitation widths, batch-norm settings and classifier,
hence the same 2,542,856 parameters (torchvision's published count) and about 56-60 M
multiply-adds at 224x224. Registered as ``mobilenet_v3_small`` (role ``query``, 224x224 RGB
only); it is wrapped in :class:`EmbeddingNet` like every model here (uint8 NHWC in, the
1000 classifier outputs L2-normalised out), so it exports through the same path as the
project's query model.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from query_sdk.spec import InputSpec

from ._registry import EmbeddingNet, register_model

__all__ = ["PUBLISHED_PARAMS", "IMAGENET_SPEC", "mobilenet_v3_small"]

PUBLISHED_PARAMS = 2_542_856  # torchvision.models.MobileNet_V3_Small_Weights.IMAGENET1K_V1
IMAGENET_SPEC = InputSpec(224, 224, 3, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))

# input channels, kernel, expanded channels, output channels, squeeze-excite, hard-swish, stride
_SMALL = (
    (16, 3, 16, 16, True, False, 2),
    (16, 3, 72, 24, False, False, 2),
    (24, 3, 88, 24, False, False, 1),
    (24, 5, 96, 40, True, True, 2),
    (40, 5, 240, 40, True, True, 1),
    (40, 5, 240, 40, True, True, 1),
    (40, 5, 120, 48, True, True, 1),
    (48, 5, 144, 48, True, True, 1),
    (48, 5, 288, 96, True, True, 2),
    (96, 5, 576, 96, True, True, 1),
    (96, 5, 576, 96, True, True, 1),
)
_BN = partial(nn.BatchNorm2d, eps=0.001, momentum=0.01)


def _make_divisible(v: float, divisor: int = 8) -> int:
    new = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new + divisor if new < 0.9 * v else new


def _conv_bn(
    c_in: int,
    c_out: int,
    kernel: int,
    stride: int = 1,
    groups: int = 1,
    act: type[nn.Module] | None = nn.Hardswish,
) -> nn.Sequential:
    layers = [
        nn.Conv2d(c_in, c_out, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
        _BN(c_out),
    ]
    if act is not None:
        layers.append(act())
    return nn.Sequential(*layers)


class SqueezeExcitation(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        squeeze = _make_divisible(channels // 4)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.fc2 = nn.Conv2d(squeeze, channels, 1)
        self.relu, self.gate = nn.ReLU(), nn.Hardsigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(self.fc2(self.relu(self.fc1(self.avgpool(x)))))


class InvertedResidual(nn.Module):
    def __init__(
        self, c_in: int, kernel: int, expanded: int, c_out: int, se: bool, hs: bool, stride: int
    ) -> None:
        super().__init__()
        act = nn.Hardswish if hs else nn.ReLU
        layers: list[nn.Module] = []
        if expanded != c_in:
            layers.append(_conv_bn(c_in, expanded, 1, act=act))
        layers.append(_conv_bn(expanded, expanded, kernel, stride, groups=expanded, act=act))
        if se:
            layers.append(SqueezeExcitation(expanded))
        layers.append(_conv_bn(expanded, c_out, 1, act=None))
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.block(x)
        return x + y if self.residual else y


def _backbone(num_classes: int) -> nn.Sequential:
    layers: list[nn.Module] = [_conv_bn(3, 16, 3, 2)]
    layers += [InvertedResidual(*row) for row in _SMALL]
    layers.append(_conv_bn(96, 576, 1))
    return nn.Sequential(
        *layers,
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(576, 1024),
        nn.Hardswish(),
        nn.Dropout(0.2),
        nn.Linear(1024, num_classes),
    )


@register_model("mobilenet_v3_small", role="query", native_input=IMAGENET_SPEC)
def mobilenet_v3_small(
    input_spec: InputSpec = IMAGENET_SPEC, embedding_dim: int | None = None, num_classes: int = 1000
) -> EmbeddingNet:
    """torchvision's layout; ``embedding_dim=None`` keeps the ``num_classes`` outputs."""
    if input_spec.channels != 3:
        raise ValueError(f"MobileNetV3-Small takes RGB images, got {input_spec.channels} channels")
    return EmbeddingNet(_backbone(num_classes), num_classes, embedding_dim, input_spec)
