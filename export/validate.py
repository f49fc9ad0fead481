"""Numeric checks of exported artifacts against the fp32 torch model they came from.

Cosine similarity per held-out image (min and mean) and, with a gallery, the change of
Recall@1: queries are embedded by the artifact, searched in the gallery through
``query_sdk.Gallery`` (verified when opened; the same search an app runs), and a hit counts when
the top item's class, stored in its shard sidecar by the gallery builder, is the query's class.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from query_sdk.errors import FormatError
from query_sdk.shards import Gallery, Hit

from .errors import ExportError

__all__ = ["cosine_stats", "GalleryCheck", "top1_recall"]


def cosine_stats(reference: np.ndarray, output: np.ndarray) -> tuple[float, float]:
    """(min, mean) cosine similarity between matching rows."""
    if reference.shape != output.shape:
        raise ExportError(f"artifact output shape {output.shape}, torch gives {reference.shape}")
    ref = reference.astype(np.float64)
    out = output.astype(np.float64)
    cos = (ref * out).sum(1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(out, axis=1) + 1e-30)
    if not np.isfinite(cos).all():
        raise ExportError("artifact output contains NaN/inf")
    return float(cos.min()), float(cos.mean())


class GalleryCheck:
    """A verified gallery in the exported model's space and the Recall@1 of query vectors."""

    def __init__(self, folder: Path, space_id: str) -> None:
        self.folder = Path(folder)
        try:
            self._gallery = Gallery.open(self.folder, space_id=space_id)
        except FormatError as exc:  # GalleryError, SignatureError, unreadable files
            raise ExportError(f"--gallery {self.folder}: {exc}") from exc
        self.space_id = space_id

    def recall_at_1(self, vectors: np.ndarray, classes: list[str]) -> float:
        """Fraction of queries whose top gallery item has their class."""
        return top1_recall(self._gallery.search(vectors, k=1), classes, self.folder)


def top1_recall(hits: list[list[Hit]], classes: list[str], gallery: Path) -> float:
    """Fraction of queries (``hits`` rows) whose top hit's sidecar class is theirs; ExportError
    when a top item has no class label (a gallery built before they were stored, or from a
    list file)."""
    for row in hits:
        if row and row[0].class_name is None:
            raise ExportError(
                f"gallery {gallery}: item {row[0].id!r} has no class label in its shard "
                "sidecar, which a Recall@1 check needs: rebuild the gallery with "
                "cmce-build-gallery build from class folders or a built-in dataset (or "
                "reproject one whose raw store keeps classes)"
            )
    found = [row[0].class_name if row else None for row in hits]
    return float(np.mean([f == c for f, c in zip(found, classes, strict=True)]))
