"""Light query network in the MobileNet style (Howard et al., "MobileNets", 2017):
a strided stem and depthwise-separable convolutions, a few hundred thousand MACs at 28x28."""

from __future__ import annotations

from torch import nn

from query_sdk.spec import InputSpec

from ._registry import EmbeddingNet, register_model


def _separable(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_in, 3, stride, 1, groups=c_in, bias=False),
        nn.BatchNorm2d(c_in),
        nn.ReLU6(),
        nn.Conv2d(c_in, c_out, 1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU6(),
    )


@register_model("mobilenet", role="query")
def mobilenet(
    input_spec: InputSpec,
    embedding_dim: int = 64,
    width: int = 16,
    stages=((2, 1), (4, 2), (4, 1), (8, 2)),
) -> EmbeddingNet:
    """``stages`` lists (channel multiplier of ``width``, stride) per separable block."""
    layers: list[nn.Module] = [
        nn.Conv2d(input_spec.channels, width, 3, 2, 1, bias=False),
        nn.BatchNorm2d(width),
        nn.ReLU6(),
    ]
    c = width
    for mult, stride in stages:
        layers.append(_separable(c, width * mult, stride))
        c = width * mult
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    return EmbeddingNet(nn.Sequential(*layers), c, embedding_dim, input_spec)
