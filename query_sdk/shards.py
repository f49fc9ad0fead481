"""Searching a gallery's shards (no torch): exact merge of per-shard hnswlib top-k, and
:class:`Gallery`, a verified set of loaded shards searched by vector with optional rejection.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .gallery_format import (
    MANIFEST_FILE,
    GalleryError,
    Manifest,
    check_unit_rows,
    load_shard,
    parse_manifest,
    read_manifest_bytes,
    verify_gallery,
)

__all__ = ["search_shards", "Gallery", "Hit"]

# hnswlib 0.8 keeps, besides the index file's data, 65536 label-operation mutexes per index,
# and per element a mutex and an unordered_map entry (label -> internal id).
_HNSW_FIXED = 65536 * 40
_HNSW_PER_ITEM = 40 + 56


def search_shards(
    shards: Sequence[tuple[object, int]], queries: np.ndarray, k: int, num_threads: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """Search every shard and merge: (labels, scores), each (queries, k), best first.

    ``shards`` are pairs of a loaded ``hnswlib.Index`` (space ``ip`` on L2-normalised vectors,
    its ef already set) and its number of live (not deleted) items; a score is the cosine
    similarity. Where fewer than k live items exist, labels are -1 and scores -inf.
    """
    queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
    labels, scores = [], []
    for index, live in shards:
        kk = min(k, live)
        if kk <= 0:
            continue
        lab, dist = index.knn_query(queries, k=kk, num_threads=num_threads)
        labels.append(lab.astype(np.int64))
        scores.append(1.0 - dist)
    if not labels:
        n = len(queries)
        return np.full((n, k), -1, np.int64), np.full((n, k), -np.inf, np.float32)
    labels, scores = np.concatenate(labels, axis=1), np.concatenate(scores, axis=1)
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    labels = np.take_along_axis(labels, order, axis=1)
    scores = np.take_along_axis(scores, order, axis=1).astype(np.float32)
    if labels.shape[1] < k:
        pad = k - labels.shape[1]
        labels = np.pad(labels, ((0, 0), (0, pad)), constant_values=-1)
        scores = np.pad(scores, ((0, 0), (0, pad)), constant_values=-np.inf)
    return labels, scores


@dataclass(frozen=True)
class Hit:
    """One search result: the gallery item's id, cosine similarity to the query (higher is
    closer), its stored ensemble uncertainty, its payload and its class (from the sidecar's
    ``classes``; ``None`` when it has none)."""

    id: str
    score: float
    uncertainty: float
    payload: dict | None = None
    class_name: str | None = None


class Gallery:
    """A gallery folder, verified before it is trusted, with some or all shards loaded.

    Open it with :meth:`open`; :meth:`search` takes L2-normalised query vectors in the
    gallery's space and returns the exact merge of every loaded shard's top-k, each shard
    searched with the manifest's ``ef_search``.
    """

    def __init__(self, folder: Path, manifest: Manifest, shards: list[int], loaded: list) -> None:
        self.folder, self.manifest, self.shards = folder, manifest, shards
        self._pairs = [(index, int((~meta.deleted).sum())) for index, meta in loaded]
        metas = [meta for _, meta in loaded]
        labels = np.concatenate([m.labels for m in metas]) if metas else np.zeros(0, np.int64)
        self._order = np.argsort(labels, kind="stable")
        self._sorted_labels = labels[self._order]
        self._uncertainty = (
            np.concatenate([m.uncertainty for m in metas]) if metas else np.zeros(0, np.float32)
        )
        self._ids = [i for m in metas for i in m.ids]
        self._payload = [p for m in metas for p in m.payload]
        self._classes = [c or None for m in metas for c in (m.classes or [""] * len(m))]
        self._memory = (
            sum(
                manifest.shards[i].files[manifest.shards[i].index_file]["bytes"]
                + _HNSW_FIXED
                + manifest.shards[i].count * _HNSW_PER_ITEM
                for i in shards
            )
            + sum(sys.getsizeof(x) + 8 for x in self._ids + self._payload + self._classes)
            + self._uncertainty.nbytes
            + self._sorted_labels.nbytes
            + self._order.nbytes
        )

    @classmethod
    def open(
        cls,
        folder: str | os.PathLike[str],
        *,
        shards: Sequence[int] | None = None,
        public_key: str | bytes | None = None,
        space_id: str | None = None,
        dim: int | None = None,
    ) -> Gallery:
        """Verify and load a gallery (only the shards at positions ``shards``, default all).

        Checked before anything reaches hnswlib: the signature of ``manifest.json`` when a
        ``public_key`` is given (unsigned galleries are then refused), the format version,
        ``space_id`` and ``dim`` when given, and every selected shard's sizes, sha256, index
        header and sidecar. Raises GalleryError (SignatureError) naming the file and problem.
        """
        folder = Path(folder)
        data = read_manifest_bytes(folder)
        if public_key is not None:
            from .signing import verify_manifest

            verify_manifest(folder, data, public_key)
        manifest = parse_manifest(data, where=str(folder / MANIFEST_FILE))
        if space_id is not None and manifest.space_id != space_id:
            raise GalleryError(
                f"{folder}: the gallery is in embedding space {manifest.space_id!r}, the query "
                f"model is in space {space_id!r}; they are not compatible (use a gallery "
                "built or reprojected for this query model, or the matching query bundle)"
            )
        if dim is not None and manifest.dim != dim:
            raise GalleryError(
                f"{folder / MANIFEST_FILE}: dim {manifest.dim}, the query model gives {dim}"
            )
        selected = list(range(len(manifest.shards))) if shards is None else list(shards)
        if len(set(selected)) != len(selected):
            raise ValueError(f"shards lists a shard more than once: {selected}")
        verify_gallery(folder, manifest, selected)
        ef = manifest.hnsw["ef_search"]
        loaded = [
            load_shard(folder, manifest.shards[i], manifest.dim, ef, verify=False) for i in selected
        ]
        return cls(folder, manifest, selected, loaded)

    @property
    def count(self) -> int:
        """Live (not deleted) items in the loaded shards."""
        return sum(live for _, live in self._pairs)

    @property
    def memory_bytes(self) -> int:
        """Estimated memory the loaded shards take: hnswlib's index data (the index file's
        size) and its lock tables and label map, plus the ids, payloads, classes and
        uncertainties."""
        return self._memory

    def __repr__(self) -> str:
        return (
            f"Gallery({str(self.folder)!r}, space_id={self.manifest.space_id!r}, "
            f"shards={len(self.shards)}/{len(self.manifest.shards)}, items={self.count}, "
            f"memory={self._memory / 2**20:.1f} MiB)"
        )

    def uncertainty_limit(self, max_uncertainty: float | str | None) -> float | None:
        """The threshold for ``max_uncertainty``: a number, or a quantile name from the
        manifest's ``uncertainty_quantiles`` such as ``"q0.9"`` (or ``"0.9"``)."""
        if max_uncertainty is None:
            return None
        quantiles = self.manifest.uncertainty_quantiles
        if isinstance(max_uncertainty, str):
            names = ", ".join(f"q{k}" for k in sorted(quantiles, key=float))
            try:
                wanted = float(max_uncertainty.strip().lower().removeprefix("q"))
            except ValueError:
                wanted = None
            for key, value in quantiles.items():
                if wanted is not None and float(key) == wanted:
                    return float(value)
            raise ValueError(
                f"max_uncertainty {max_uncertainty!r}: the manifest has no such "
                f"uncertainty quantile; it has {names or 'none'}"
            )
        if (
            isinstance(max_uncertainty, bool)
            or not isinstance(max_uncertainty, (int, float))
            or not math.isfinite(max_uncertainty)
        ):
            raise ValueError(
                f"max_uncertainty must be a finite number or a quantile name such "
                f"as 'q0.9', got {max_uncertainty!r}"
            )
        return float(max_uncertainty)

    def search(
        self,
        vectors: np.ndarray,
        k: int = 10,
        max_uncertainty: float | str | None = None,
        threads: int = 1,
    ) -> list[list[Hit]]:
        """Top-k hits for each query vector (N, dim) or (dim,), best first.

        With ``max_uncertainty`` (see :meth:`uncertainty_limit`), items whose stored
        uncertainty is above it are left out, and the k best of the others are returned.
        A ``k`` above the live item count returns all items (see :meth:`search_labels`).
        """
        labels, scores = self.search_labels(vectors, k, max_uncertainty, threads)
        out = []
        for row_labels, row_scores in zip(labels, scores, strict=True):
            valid = row_labels >= 0
            rows = self._rows(row_labels[valid]).tolist()
            out.append(
                [
                    Hit(
                        self._ids[r],
                        float(s),
                        float(self._uncertainty[r]),
                        self._payload[r],
                        self._classes[r],
                    )
                    for r, s in zip(rows, row_scores[valid].tolist(), strict=True)
                ]
            )
        return out

    def search_labels(
        self,
        vectors: np.ndarray,
        k: int = 10,
        max_uncertainty: float | str | None = None,
        threads: int = 1,
    ) -> tuple[np.ndarray, np.ndarray]:
        """As :meth:`search`, as arrays: hnswlib labels and scores (N, min(k, count)), best
        first; -1 / -inf pad rows with fewer hits (items left out by ``max_uncertainty``).

        Asking for more hits than the loaded shards' live items returns all items: ``k`` is
        clamped to :attr:`count`, so a huge ``k`` costs no more memory than the gallery.
        ``threads`` above the CPU count are clamped to it (hnswlib starts that many threads).
        """
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be a positive int, got {k!r}")
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ValueError(f"threads must be a positive int, got {threads!r}")
        threads = min(threads, os.cpu_count() or 1)
        limit = self.uncertainty_limit(max_uncertainty)
        queries = self._check_queries(vectors)
        n, total = len(queries), self.count
        k = want = min(k, total)
        labels = np.full((n, k), -1, np.int64)
        scores = np.full((n, k), -np.inf, np.float32)
        fetch, todo = want, np.arange(n)
        while todo.size and want:
            found, sims = search_shards(self._pairs, queries[todo], fetch, threads)
            keep = found >= 0
            if limit is not None:
                keep &= self._uncertainty[self._rows(np.maximum(found, 0))] <= limit
            done = (keep.sum(axis=1) >= want) | (fetch >= total)
            for row in np.flatnonzero(done):
                got = found[row][keep[row]][:k]
                labels[todo[row], : len(got)] = got
                scores[todo[row], : len(got)] = sims[row][keep[row]][:k]
            todo, fetch = todo[~done], min(total, fetch * 4)
        return labels, scores

    def _rows(self, labels: np.ndarray) -> np.ndarray:
        """Row numbers (into the concatenated sidecars) of hnswlib labels."""
        pos = np.searchsorted(self._sorted_labels, labels)
        return self._order[np.minimum(pos, len(self._order) - 1)]

    def _check_queries(self, vectors: np.ndarray) -> np.ndarray:
        q = np.asarray(vectors, dtype=np.float32)
        if q.ndim == 1:
            q = q[None]
        if q.ndim != 2 or q.shape[1] != self.manifest.dim:
            raise ValueError(
                f"query vectors must be (N, {self.manifest.dim}) or "
                f"({self.manifest.dim},), got shape {np.shape(vectors)}"
            )
        check_unit_rows(q, "query vectors")
        return np.ascontiguousarray(q)
