"""Exact merge of per-shard hnswlib results into one top-k (no torch)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["search_shards"]


def search_shards(shards: Sequence[tuple[object, int]], queries: np.ndarray, k: int,
                  num_threads: int = 1) -> tuple[np.ndarray, np.ndarray]:
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

