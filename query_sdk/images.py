"""Query images as the model takes them: a path, a PIL image or a numpy array -> uint8
(H, W, C) per the bundle's :class:`~query_sdk.spec.InputSpec` (no torch)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from .errors import DataError
from .spec import InputSpec, to_model_input

__all__ = ["ImageError", "ImageLike", "decode_image", "load_image", "describe"]

ImageLike = str | os.PathLike | Image.Image | np.ndarray


class ImageError(DataError):
    """An image could not be read or converted; the message names the file."""


def describe(image: Any) -> str:
    """A short name for an image in messages: its path, or its kind and size."""
    if isinstance(image, (str, os.PathLike)):
        return str(image)
    if isinstance(image, Image.Image):
        return f"PIL image {image.mode} {image.width}x{image.height}"
    if isinstance(image, np.ndarray):
        return f"array {image.dtype} {image.shape}"
    return type(image).__name__


def _from_pil(im: Image.Image, spec: InputSpec) -> np.ndarray:
    """A PIL image as (H, W, C) uint8 per the spec: EXIF orientation applied, 16-bit grey
    scaled (not clipped), palette transparency kept until the grey/RGB conversion."""
    im = ImageOps.exif_transpose(im)
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode.startswith("I;16") or im.mode == "I":
        wide = np.asarray(im, dtype=np.float64)
        im = Image.fromarray(np.clip(np.rint(wide * 255 / 65535), 0, 255).astype(np.uint8))
    pixels = np.asarray(im.convert("L" if spec.channels == 1 else "RGB"))
    return to_model_input(pixels[None], spec)[0]


def decode_image(path: str | os.PathLike[str], spec: InputSpec) -> np.ndarray:
    """One image file as (H, W, C) uint8 at the spec's size and channels.

    Decoder errors propagate as they are (the gallery builder skips such files);
    :func:`load_image` wraps them in ImageError.
    """
    with Image.open(Path(path)) as im:
        return _from_pil(im, spec)


def load_image(image: ImageLike, spec: InputSpec) -> np.ndarray:
    """One image as (H, W, C) uint8 at the spec's size and channels; ImageError naming it.

    Arrays must be uint8 (H, W) or (H, W, C) with C in 1, 3, 4; resizing and grey <-> RGB
    follow :func:`~query_sdk.spec.to_model_input`.
    """
    try:
        if isinstance(image, (str, os.PathLike)):
            return decode_image(image, spec)
        if isinstance(image, Image.Image):
            return _from_pil(image, spec)
        if not isinstance(image, np.ndarray):
            raise ImageError(
                f"{describe(image)}: expected a path, a PIL image or a uint8 numpy array"
            )
        if image.dtype != np.uint8:
            raise ImageError(f"{describe(image)}: arrays must be uint8 pixels (0..255)")
        if image.ndim not in (2, 3):
            raise ImageError(f"{describe(image)}: expected (H, W) or (H, W, C)")
        return to_model_input(image[None], spec)[0]
    except ImageError:
        raise
    except Exception as exc:  # any decoder failure (OSError, DecompressionBombError, ...)
        raise ImageError(
            f"{describe(image)}: cannot use this image: {type(exc).__name__}: {exc}"
        ) from exc
