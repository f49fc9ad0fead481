"""Real images for calibration (int8) and validation, checked against the model's input spec.

A source is a built-in name (``fashion-mnist:train``, ``fashion-mnist:test``, ``digits``, the
font sets ``glyphs`` and ``han``), an image folder (one sub-folder per class; files are decoded
to the spec's size and channels, as the gallery builder does) or a ``.npy`` file holding uint8
images (N, H, W, C) exactly as the app passes them (memory-mapped, so only the images picked are
read). Built-in and ``.npy`` images must already have the spec's shape: a mismatch is an error
naming the expected shape, never a silent resize. When calibration and validation use the same
source they get disjoint images, so validation is always on held-out images.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from gallery_builder.data.datasets import DataError, ImageSet, load_source
from query_sdk.spec import InputSpec

from .errors import ExportError, one_line

__all__ = ["MIN_VALIDATION_IMAGES", "load_images", "calibration_and_validation"]

MIN_VALIDATION_IMAGES = 256


def _expected(spec: InputSpec) -> str:
    return f"uint8 (N, {spec.height}, {spec.width}, {spec.channels}) (N, H, W, C)"


def load_images(source: str, spec: InputSpec, what: str) -> ImageSet:
    """All images of ``source`` as the model takes them; ExportError if their shape differs."""
    path = Path(source).expanduser()
    if source.endswith(".npy"):
        if not path.is_file():
            raise ExportError(f"{what} source {source}: no such file (or not a regular file)")
        try:  # memory-mapped: a header claiming more than the file holds is refused, not allocated
            images = np.load(path, mmap_mode="r", allow_pickle=False)
        except (ValueError, EOFError) as exc:
            raise ExportError(
                f"{what} source {source}: not a plain .npy array: {one_line(exc)}"
            ) from exc
        labels = np.full(len(images) if images.ndim else 0, -1, np.int64)
        data = None
    else:
        try:
            data = load_source(source, spec if path.is_dir() else None)
        except DataError as exc:
            raise ExportError(f"{what} source: {exc}") from exc
        images, labels = data.images, data.labels
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != spec.shape:
        raise ExportError(
            f"{what} source {source}: images are {images.dtype} {tuple(images.shape)}, the model "
            f"takes {_expected(spec)}; give images of that shape"
        )
    if data is None:
        names = [f"{source}[{i}]" for i in range(len(images))]
        return ImageSet(images, labels, source, names, [])
    return data


def _take(data: ImageSet, index: np.ndarray) -> ImageSet:
    return data.subset(np.sort(index))


def calibration_and_validation(
    calibration: str | None,
    validation: str,
    spec: InputSpec,
    n_calibration: int,
    n_validation: int,
    seed: int = 0,
) -> tuple[ImageSet | None, ImageSet]:
    """Pick ``n_calibration`` and ``n_validation`` images (seeded, disjoint if same source).

    ExportError when a source has fewer images than asked for, or ``n_validation`` is below
    MIN_VALIDATION_IMAGES.
    """
    if calibration is not None and n_calibration < 1:
        raise ExportError(f"calibration needs at least 1 image, asked for {n_calibration}")
    if n_validation < MIN_VALIDATION_IMAGES:
        raise ExportError(
            f"validation needs at least {MIN_VALIDATION_IMAGES} images, asked for {n_validation}"
        )
    rng = np.random.default_rng(seed)
    val_data = load_images(validation, spec, "validation")
    if calibration is None:
        order = rng.permutation(len(val_data))
        _enough(validation, "validation", len(val_data), n_validation, spec)
        return None, _take(val_data, order[:n_validation])
    if calibration == validation:
        order = rng.permutation(len(val_data))
        _enough(
            validation,
            "calibration + validation",
            len(val_data),
            n_calibration + n_validation,
            spec,
        )
        return (
            _take(val_data, order[:n_calibration]),
            _take(val_data, order[n_calibration : n_calibration + n_validation]),
        )
    cal_data = load_images(calibration, spec, "calibration")
    _enough(calibration, "calibration", len(cal_data), n_calibration, spec)
    _enough(validation, "validation", len(val_data), n_validation, spec)
    return (
        _take(cal_data, rng.permutation(len(cal_data))[:n_calibration]),
        _take(val_data, rng.permutation(len(val_data))[:n_validation]),
    )


def _enough(source: str, what: str, have: int, need: int, spec: InputSpec) -> None:
    if have < need:
        raise ExportError(
            f"{what} source {source}: {have} images of {_expected(spec)}, at least {need} needed "
            "(lower --calibration-images/--validation-images or give more images)"
        )
