"""The input spec: how an image becomes a model's input tensor.

It travels with the weights (checkpoint ``config.json``), the export bundle and the gallery
manifest, so that every side preprocesses the same way and nobody hard-codes it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np

__all__ = ["MAX_SIDE", "InputSpec", "to_model_input"]

#: Largest height or width a spec may name. Query models take a few hundred pixels a side and
#: gallery models rarely above 1024; 4096 leaves room for any real model while bounding what a
#: crafted manifest can make a reader allocate (one 4096x4096x3 uint8 image is 48 MiB).
MAX_SIDE = 4096


@dataclass(frozen=True)
class InputSpec:
    """An image as the model takes it.

    The model sees ``(pixel / 255 - mean) / std`` in NCHW layout, ``height`` x ``width``,
    ``channels`` (1 = grey, 3 = RGB). Images arrive as uint8 NHWC; conversion (resize, grey <->
    RGB) happens before that, normalisation inside the model. Height and width are ints of at
    most :data:`MAX_SIDE`.
    """

    height: int
    width: int
    channels: int
    mean: tuple[float, ...] = field(default=(0.5,))
    std: tuple[float, ...] = field(default=(0.5,))
    dtype: str = "uint8"
    layout: str = "NHWC"

    def __post_init__(self) -> None:
        for name in ("height", "width", "channels"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{name} must be an int, got {value!r}")
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {self.channels}")
        if self.height < 1 or self.width < 1:
            raise ValueError(f"height and width must be positive, got {self.height}x{self.width}")
        if self.height > MAX_SIDE or self.width > MAX_SIDE:
            raise ValueError(
                f"height and width must be at most {MAX_SIDE} (no real model takes larger "
                f"images), got {self.height}x{self.width}"
            )
        for name in ("mean", "std"):
            values = tuple(float(v) for v in getattr(self, name))
            if len(values) == 1:
                values = values * self.channels
            if len(values) != self.channels:
                raise ValueError(f"{name} needs 1 or {self.channels} values, got {len(values)}")
            object.__setattr__(self, name, values)
        if not all(math.isfinite(v) for v in self.mean + self.std):
            raise ValueError(f"mean and std must be finite, got {self.mean} and {self.std}")
        if any(s <= 0 for s in self.std):
            raise ValueError(f"std must be positive, got {self.std}")
        if self.dtype != "uint8" or self.layout != "NHWC":
            raise ValueError("only uint8 NHWC images are supported as model input")

    @property
    def shape(self) -> tuple[int, int, int]:
        """Shape of one image as the app passes it: (height, width, channels)."""
        return (self.height, self.width, self.channels)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> InputSpec:
        known = {"height", "width", "channels", "mean", "std", "dtype", "layout"}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown input spec keys {sorted(unknown)}; known: {sorted(known)}")
        return cls(**{k: tuple(v) if k in ("mean", "std") else v for k, v in d.items()})


def to_model_input(images: np.ndarray, spec: InputSpec) -> np.ndarray:
    """Convert uint8 images (N, H, W[, C]) to the spec's size and channels (N, H, W, C) uint8.

    Grey becomes RGB by repetition, RGB becomes grey by ITU-R 601 luma (Pillow's convert("L")
    fixed point, as for decoded files); a size mismatch is
    resized with bilinear filtering (Pillow).
    """
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise ValueError(f"images must be uint8, got {images.dtype}")
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3, 4):
        raise ValueError(f"images must be (N, H, W[, C]) with C in 1, 3, 4; got {images.shape}")
    if images.shape[-1] == 4:
        images = images[..., :3]
    if images.shape[-1] != spec.channels:
        if spec.channels == 3:
            images = np.repeat(images, 3, axis=-1)
        else:
            # Pillow's convert("L"): 16-bit fixed point, exact in integers on every CPU
            luma = images.astype(np.uint32) @ np.array([19595, 38470, 7471], np.uint32)
            images = ((luma + 0x8000) >> 16).astype(np.uint8)[..., None]
    if images.shape[1:3] != (spec.height, spec.width):
        from PIL import Image

        mode = "L" if spec.channels == 1 else "RGB"
        images = np.stack(
            [
                np.asarray(
                    Image.fromarray(im.squeeze(-1) if mode == "L" else im, mode).resize(
                        (spec.width, spec.height), Image.BILINEAR
                    )
                ).reshape(spec.shape)
                for im in images
            ]
        )
    return np.ascontiguousarray(images)
