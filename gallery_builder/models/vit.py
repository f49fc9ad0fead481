"""Small Vision Transformer (Dosovitskiy et al., "An Image is Worth 16x16 Words", 2021):
non-overlapping patches, learned position embeddings, pre-norm encoder, mean-pooled tokens."""

from __future__ import annotations

import math

import torch
from torch import nn

from query_sdk.spec import InputSpec

from ._registry import EmbeddingNet, register_model


class ViTBackbone(nn.Module):
    def __init__(
        self, spec: InputSpec, patch: int, dim: int, depth: int, heads: int, mlp_ratio: float
    ) -> None:
        super().__init__()
        if spec.height % patch or spec.width % patch:
            raise ValueError(
                f"vit: input {spec.height}x{spec.width} is not divisible by patch size {patch}"
            )
        tokens = (spec.height // patch) * (spec.width // patch)
        self.patchify = nn.Conv2d(spec.channels, dim, patch, patch)
        self.position = nn.Parameter(torch.randn(1, tokens, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(
            dim,
            heads,
            int(dim * mlp_ratio),
            dropout=0.0,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x):
        x = self.patchify(x).flatten(2).transpose(1, 2) + self.position
        return self.norm(self.encoder(x)).mean(dim=1)


def auto_patch(spec: InputSpec, max_tokens: int = 16) -> int:
    """The smallest patch side dividing both image sides that gives at most ``max_tokens``
    tokens (a 4x4 grid: on a 2-core CPU more tokens cost more than they bring at these sizes)."""
    for p in range(1, min(spec.height, spec.width) + 1):
        divides = spec.height % p == 0 and spec.width % p == 0
        if divides and (spec.height // p) * (spec.width // p) <= max_tokens:
            return p
    return math.gcd(spec.height, spec.width)


@register_model("vit", role="gallery")
def vit(
    input_spec: InputSpec,
    embedding_dim: int = 128,
    patch: int | None = None,
    dim: int = 64,
    depth: int = 4,
    heads: int = 4,
    mlp_ratio: float = 2.0,
) -> EmbeddingNet:
    """``patch`` None: :func:`auto_patch` for the input."""
    patch = patch or auto_patch(input_spec)
    backbone = ViTBackbone(input_spec, patch, dim, depth, heads, mlp_ratio)
    return EmbeddingNet(backbone, dim, embedding_dim, input_spec)
