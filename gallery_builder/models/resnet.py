"""ResNet-style CNN (He et al., "Deep Residual Learning for Image Recognition", 2016),
sized for small images: a 3x3 stem and three stages of basic blocks."""

from __future__ import annotations

from torch import nn

from query_sdk.spec import InputSpec

from ._registry import EmbeddingNet, register_model


def _conv_bn(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out))


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(_conv_bn(c_in, c_out, stride), nn.ReLU(), _conv_bn(c_out, c_out))
        self.shortcut = (
            nn.Identity()
            if stride == 1 and c_in == c_out
            else nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))
        )
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(self.body(x) + self.shortcut(x))


def _resnet(channels: int, width: int, blocks: tuple[int, ...]) -> tuple[nn.Module, int]:
    layers: list[nn.Module] = [_conv_bn(channels, width), nn.ReLU()]
    c = width
    for stage, n in enumerate(blocks):
        c_out = width * 2**stage
        for i in range(n):
            layers.append(BasicBlock(c, c_out, 2 if stage > 0 and i == 0 else 1))
            c = c_out
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    return nn.Sequential(*layers), c


@register_model("resnet", role="gallery")
def resnet(
    input_spec: InputSpec, embedding_dim: int = 128, width: int = 16, blocks=(1, 1, 1)
) -> EmbeddingNet:
    backbone, features = _resnet(input_spec.channels, width, tuple(blocks))
    return EmbeddingNet(backbone, features, embedding_dim, input_spec)
