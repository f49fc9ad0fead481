"""Wide, shallow plain CNN in the VGG tradition (Simonyan & Zisserman, 2015): a 5x5 stem,
max-pooling between stages, no residuals, dropout before the embedding."""

from __future__ import annotations

from torch import nn

from query_sdk.spec import InputSpec

from ._registry import EmbeddingNet, register_model


def _stage(c_in: int, c_out: int, kernel: int) -> list[nn.Module]:
    return [
        nn.Conv2d(c_in, c_out, kernel, padding=kernel // 2, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(),
    ]


@register_model("widecnn", role="gallery")
def widecnn(
    input_spec: InputSpec, embedding_dim: int = 128, width: int = 48, dropout: float = 0.2
) -> EmbeddingNet:
    backbone = nn.Sequential(
        *_stage(input_spec.channels, width, 5),
        nn.MaxPool2d(2),
        *_stage(width, 2 * width, 3),
        nn.MaxPool2d(2),
        *_stage(2 * width, 4 * width, 3),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Dropout(dropout),
    )
    return EmbeddingNet(backbone, 4 * width, embedding_dim, input_spec)
