"""Query images as the model takes them: a path, a PIL image or a numpy array -> uint8
(H, W, C) per the bundle's :class:`~query_sdk.spec.InputSpec` (no torch).

Files are decoded within a pixel budget derived from the spec (:func:`pixel_budget`), checked
on the header before any pixel is decoded: a 164 KB PNG can claim 13000x13000 pixels.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import IO, Any

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from .errors import DataError
from .fileio import check_regular_file
from .spec import InputSpec, to_model_input

__all__ = [
    "ImageError",
    "ImageLike",
    "MIN_PIXEL_BUDGET",
    "pixel_budget",
    "decode_image",
    "load_image",
    "describe",
]

ImageLike = str | os.PathLike | Image.Image | np.ndarray

#: Pixels any spec may decode: 4096x4096 (16.8 MP) holds a 12 MP phone photo at full size.
MIN_PIXEL_BUDGET = 4096 * 4096
#: JPEG (and MPO) can be decoded at 1/2, 1/4 or 1/8 of its size (DCT scaling, ``Image.draft``)
_JPEG_SCALES = (2, 4, 8)


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


def pixel_budget(spec: InputSpec) -> int:
    """The most pixels an image for ``spec`` is decoded to: ``max(4096 * 4096, 4 * H * W)``.

    A file whose header claims more is refused before decoding, except JPEGs, which are decoded
    reduced (1/2, 1/4 or 1/8 a side) into the budget: a 200 MP phone photo still works, at 1/4.
    The model sees a few hundred pixels a side, so nothing it could use is lost. As sides are
    at most :data:`~query_sdk.spec.MAX_SIDE`, the budget (at most 67 MP) stays below Pillow's
    default ``MAX_IMAGE_PIXELS`` (89 MP): its warning and ``DecompressionBombError`` never fire,
    ours does, naming the file and the sizes.
    """
    return max(MIN_PIXEL_BUDGET, 4 * spec.height * spec.width)


def _identify(fp: IO[bytes], name: str) -> ImageFile.ImageFile:
    """``Image.open`` of an open file without Pillow's decompression-bomb check, which would
    warn (or refuse a 200 MP JPEG we can decode reduced) before :func:`_within_budget` runs:
    the same plugin registry, tried in the same order."""
    prefix = fp.read(16)
    for load_plugins in (Image.preinit, Image.init):
        load_plugins()
        for fmt in list(Image.ID):
            factory, accept = Image.OPEN[fmt]
            fits = accept is None or accept(prefix)
            if not fits or isinstance(fits, str):
                continue
            fp.seek(0)
            try:
                return factory(fp, name)
            except (SyntaxError, IndexError, TypeError, struct.error):
                continue
    raise UnidentifiedImageError(f"cannot identify image file {name!r}")


def _within_budget(im: ImageFile.ImageFile, spec: InputSpec, name: str) -> None:
    """Refuse (or, for JPEG, set up a reduced decode of) an image whose header claims more
    pixels than :func:`pixel_budget`; nothing is decoded yet."""
    budget = pixel_budget(spec)
    width, height = im.size
    if width * height <= budget:
        return
    if im.format in ("JPEG", "MPO"):
        for scale in _JPEG_SCALES:
            if (width // scale) * (height // scale) <= budget:
                im.draft(None, (max(width // scale, 1), max(height // scale, 1)))
                break
    if im.size[0] * im.size[1] > budget:
        raise ImageError(
            f"{name}: {width}x{height} pixels is more than the {budget} an image for this "
            f"{spec.height}x{spec.width} model may decode to (max(4096x4096, 4x its input)); "
            "downscale it first"
        )


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

    Only regular files are opened (a FIFO or device would hang the reader), and only within
    :func:`pixel_budget` (ImageError otherwise). Decoder errors propagate as they are (the
    gallery builder skips such files); :func:`load_image` wraps them in ImageError.
    """
    path = Path(path)
    check_regular_file(path, "image", ImageError)
    with open(path, "rb") as fp, _identify(fp, str(path)) as im:
        _within_budget(im, spec, str(path))
        return _from_pil(im, spec)


def load_image(image: ImageLike, spec: InputSpec) -> np.ndarray:
    """One image as (H, W, C) uint8 at the spec's size and channels; ImageError naming it.

    Arrays must be uint8 (H, W) or (H, W, C) with C in 1, 3, 4; resizing and grey <-> RGB
    follow :func:`~query_sdk.spec.to_model_input`.
    """
    try:
        if isinstance(image, (str, os.PathLike)):
            return decode_image(image, spec)
        if isinstance(image, ImageFile.ImageFile):  # opened from a file, maybe not decoded
            _within_budget(image, spec, describe(image))
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
