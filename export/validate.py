"""Numeric checks of exported artifacts against the fp32 torch model they came from.

Cosine similarity per held-out image (min and mean) and, with a gallery, the change of
Recall@1: queries are embedded by the artifact, searched in the gallery's hnswlib shards through
query_sdk (the same search an app runs), and a hit counts when the top item has the query's
class. A gallery item's class comes from its id: ``<built-in source>/<index>`` (e.g.
``fashion-mnist:train/17``) looks the label up in that source, ``<class>/<file>`` (an image
folder) is its first path component.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from gallery_builder.data.datasets import ImageSet, load_source
from gallery_builder.data.sources import BUILTINS
from query_sdk.gallery_format import GalleryError, load_shard, verify_gallery
from query_sdk.shards import search_shards

from .errors import ExportError

__all__ = ["cosine_stats", "GalleryCheck"]


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


def _item_classes(ids: list[str]) -> list[str]:
    """Class name of each gallery item, from its id (see the module docstring)."""
    sources: dict[str, ImageSet] = {}
    names = []
    for item_id in ids:
        head, _, tail = item_id.rpartition("/")
        if head in BUILTINS and tail.isdigit():
            if head not in sources:
                sources[head] = load_source(head)
            data = sources[head]
            names.append(data.classes[int(data.labels[int(tail)])])
        elif "/" in item_id:
            names.append(item_id.split("/", 1)[0])
        else:
            raise ExportError(
                f"gallery item id {item_id!r} says no class (expected '<source>/<index>' of a "
                "built-in source or '<class>/<file>' of an image folder)"
            )
    return names


class GalleryCheck:
    """A verified, loaded gallery and the Recall@1 of query vectors against it."""

    def __init__(self, folder: Path, space_id: str) -> None:
        folder = Path(folder)
        try:
            manifest = verify_gallery(folder)
            loaded = [
                load_shard(folder, s, manifest.dim, manifest.hnsw["ef_search"], verify=False)
                for s in manifest.shards
            ]
        except GalleryError as exc:
            raise ExportError(f"gallery {folder}: {exc}") from exc
        if manifest.space_id != space_id:
            raise ExportError(
                f"gallery {folder} is in space {manifest.space_id}, the exported model maps into "
                f"{space_id}: use the gallery built with these heads (or reproject it)"
            )
        self.space_id = manifest.space_id
        self._shards = [
            (index, s.live) for (index, _), s in zip(loaded, manifest.shards, strict=True)
        ]
        self._classes: dict[int, str] = {}  # hnswlib label -> class name
        for _, meta in loaded:
            self._classes.update(zip(meta.labels.tolist(), _item_classes(meta.ids), strict=True))

    def recall_at_1(self, vectors: np.ndarray, classes: list[str]) -> float:
        """Fraction of queries whose top gallery item has their class."""
        labels, _ = search_shards(self._shards, vectors, k=1)
        hits = [
            self._classes.get(int(lab)) == c for lab, c in zip(labels[:, 0], classes, strict=True)
        ]
        return float(np.mean(hits))
