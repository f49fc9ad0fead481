"""Random views of training images: affine jitter, colour jitter and optional mirroring.

Models train on these views, and heads train on the embeddings of several views of each image
(a head sees embeddings, not pixels, so new views are its only augmentation). Every draw comes
from the caller's generator, so a run repeats exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["Augment"]


@dataclass
class Augment:
    """Per-image random view settings; all zero / False is the identity.

    ``flip`` mirrors half the images left-right: right for photos of objects and faces, wrong
    for text (it turns a "b" into a "d"), so it is off unless a recipe turns it on. ``shift`` is
    the largest translation as a share of the side, ``scale`` the largest zoom in or out as a
    share, ``rotate`` the largest rotation in degrees, ``color`` the largest brightness,
    contrast and (RGB) per-channel gain change as a share. Pixels that the affine map brings in
    from outside repeat the border, so a uniform background stays uniform.
    """

    flip: bool = False
    shift: float = 0.08
    scale: float = 0.12
    rotate: float = 8.0
    color: float = 0.2

    def __post_init__(self) -> None:
        for name in ("shift", "scale", "rotate", "color"):
            if not 0 <= getattr(self, name) < (180 if name == "rotate" else 1):
                limit = "180 degrees" if name == "rotate" else "1"
                raise ValueError(
                    f"augment.{name} must be in [0, {limit}), got {getattr(self, name)}"
                )

    @property
    def identity(self) -> bool:
        return not (self.flip or self.shift or self.scale or self.rotate or self.color)

    def __call__(self, images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """Views of uint8 (or 0..255 float) NHWC images, as float NHWC in 0..255."""
        x = images.permute(0, 3, 1, 2).float()
        if self.identity or len(x) == 0:
            return x.permute(0, 2, 3, 1)
        n = len(x)

        def uniform(*shape: int) -> torch.Tensor:
            return torch.rand(*shape, generator=gen) * 2 - 1

        if self.flip:
            mirrored = torch.rand(n, generator=gen) < 0.5
            x = torch.where(mirrored[:, None, None, None], x.flip(3), x)
        if self.shift or self.scale or self.rotate:
            angle = uniform(n) * math.radians(self.rotate)
            zoom = 1 + uniform(n) * self.scale
            cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
            shift = uniform(n, 2) * 2 * self.shift  # affine_grid's coordinates span 2
            theta = torch.stack(
                [torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)],
                1,
            )
            grid = F.affine_grid(theta, list(x.shape), align_corners=False)
            x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
        if self.color:
            mean = x.mean(dim=(1, 2, 3), keepdim=True)
            contrast = 1 + uniform(n, 1, 1, 1) * self.color
            brightness = uniform(n, 1, 1, 1) * self.color * 127.5
            gain = 1 + uniform(n, x.shape[1], 1, 1) * self.color / 2 if x.shape[1] > 1 else 1
            x = ((x - mean) * contrast + mean + brightness) * gain
        return x.clamp(0, 255).permute(0, 2, 3, 1)
