"""Small Vision Transformer (Dosovitskiy et al., "An Image is Worth 16x16 Words", 2021):
non-overlapping patches, learned position embeddings, pre-norm encoder, mean-pooled tokens.
Optionally a convolutional stem in place of the patch projection (Xiao et al., "Early
Convolutions Help Transformers See Better", 2021): stride-2 3x3 convolutions down to the patch
grid, which makes the optimisation far less sensitive to the learning rate on small data."""

from __future__ import annotations

import math

import torch
from torch import nn

from query_sdk.spec import InputSpec

from ._registry import EmbeddingNet, register_model


class ViTBackbone(nn.Module):
    def __init__(
        self,
        spec: InputSpec,
        patch: int,
        dim: int,
        depth: int,
        heads: int,
        mlp_ratio: float,
        conv_stem: bool = False,
    ) -> None:
        super().__init__()
        if spec.height % patch or spec.width % patch:
            raise ValueError(
                f"vit: input {spec.height}x{spec.width} is not divisible by patch size {patch}"
            )
        tokens = (spec.height // patch) * (spec.width // patch)
        self.patchify = (
            _conv_stem(spec.channels, dim, patch)
            if conv_stem
            else nn.Conv2d(spec.channels, dim, patch, patch)
        )
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


def _conv_stem(channels: int, dim: int, patch: int) -> nn.Sequential:
    """3x3 stride-2 convolutions (BN, ReLU) for each factor 2 of ``patch``, widening towards
    ``dim``, then one projection to ``dim`` over what stride is left: the patch grid."""
    layers: list[nn.Module] = []
    halvings = (patch & -patch).bit_length() - 1  # factors of 2 in patch
    c = channels
    for i in range(halvings):
        out = max(8, dim >> (halvings - i))
        layers += [nn.Conv2d(c, out, 3, 2, 1, bias=False), nn.BatchNorm2d(out), nn.ReLU()]
        c = out
    rest = patch >> halvings
    layers.append(nn.Conv2d(c, dim, rest, rest) if rest > 1 else nn.Conv2d(c, dim, 1))
    return nn.Sequential(*layers)


def auto_patch(spec: InputSpec, max_tokens: int = 16) -> int:
    """The smallest patch side dividing both image sides that gives at most ``max_tokens``
    tokens (a 4x4 grid: on a 2-core CPU more tokens cost more than they bring at these sizes)."""
    for p in range(1, min(spec.height, spec.width) + 1):
        divides = spec.height % p == 0 and spec.width % p == 0
        if divides and (spec.height // p) * (spec.width // p) <= max_tokens:
            return p
    return math.gcd(spec.height, spec.width)


# at the CNNs' 1e-2 it collapsed on the glyphs (Recall@1 21.9 on unseen classes, 86.8 at 3e-3)
@register_model("vit", role="gallery", lr=3e-3)
def vit(
    input_spec: InputSpec,
    embedding_dim: int = 128,
    patch: int | None = None,
    dim: int = 64,
    depth: int = 4,
    heads: int = 4,
    mlp_ratio: float = 2.0,
    conv_stem: bool = False,
) -> EmbeddingNet:
    """``patch`` None: :func:`auto_patch` for the input; ``conv_stem``: convolutions instead
    of the linear patch projection."""
    patch = patch or auto_patch(input_spec)
    backbone = ViTBackbone(input_spec, patch, dim, depth, heads, mlp_ratio, conv_stem)
    return EmbeddingNet(backbone, dim, embedding_dim, input_spec)
