"""Exact retrieval metrics on L2-normalised embeddings (inner product = cosine similarity).

Recall@K: the fraction of queries with at least one gallery item of their label among the top
K. MAP@R (Musgrave et al., "A Metric Learning Reality Check", 2020): for a query with R gallery
items of its label, the mean over the top R ranks of precision@i counted at relevant ranks.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = [
    "CEILING_PULLS",
    "search",
    "retrieval_metrics",
    "scored_metrics",
    "per_query_metrics",
    "recall_at_1",
    "gallery_ceiling",
]

#: How far the ceiling moves each gallery vector towards its class's mean (inf: onto it).
CEILING_PULLS = (0.0, 0.25, 0.5, 1.0, 2.0, math.inf)


@torch.no_grad()
def search(
    query: torch.Tensor, gallery: torch.Tensor, k: int, chunk: int = 1024
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k by inner product: (scores, indices), each (queries, k)."""
    k = min(k, len(gallery))
    scores, indices = [], []
    for start in range(0, len(query), chunk):
        s, i = (query[start : start + chunk] @ gallery.T).topk(k, dim=1)
        scores.append(s)
        indices.append(i)
    return torch.cat(scores), torch.cat(indices)


@torch.no_grad()
def recall_at_1(query, query_labels, gallery, gallery_labels) -> float:
    _, idx = search(query, gallery, 1)
    return (gallery_labels[idx[:, 0]] == query_labels).float().mean().item()


@torch.no_grad()
def retrieval_metrics(
    query: torch.Tensor,
    query_labels: torch.Tensor,
    gallery: torch.Tensor,
    gallery_labels: torch.Tensor,
    chunk: int = 256,
) -> dict[str, float]:
    """Recall@1, Recall@5 and MAP@R of queries against a separate gallery, by exact search."""
    return scored_metrics(
        lambda start, stop: query[start:stop] @ gallery.T,
        len(query),
        query_labels,
        gallery_labels,
        chunk,
    )


@torch.no_grad()
def scored_metrics(
    scores,
    n_queries: int,
    query_labels: torch.Tensor,
    gallery_labels: torch.Tensor,
    chunk: int = 256,
) -> dict[str, float]:
    """:func:`retrieval_metrics` from similarity scores: ``scores(start, stop)`` gives the
    (stop - start, gallery) scores of those queries (fusion weights are fitted this way, from
    precomputed per-member scores)."""
    per_query = per_query_metrics(scores, n_queries, query_labels, gallery_labels, chunk)
    return {k: v.mean().item() for k, v in per_query.items()}


@torch.no_grad()
def per_query_metrics(
    scores,
    n_queries: int,
    query_labels: torch.Tensor,
    gallery_labels: torch.Tensor,
    chunk: int = 256,
) -> dict[str, torch.Tensor]:
    """Each query's Recall@1, Recall@5 (0 or 1) and average precision at R, each (n_queries,),
    from ``scores`` as :func:`scored_metrics` takes them; the metrics are their means (a
    query without a gallery item of its label scores 0)."""
    query_labels = torch.as_tensor(query_labels)
    gallery_labels = torch.as_tensor(gallery_labels)
    counts = torch.bincount(gallery_labels, minlength=int(query_labels.max()) + 1)
    r = counts[query_labels]
    max_r = min(max(int(r.max()), 5), len(gallery_labels))
    keys = ("recall_at_1", "recall_at_5", "map_at_r")
    out = {k: torch.zeros(n_queries, dtype=torch.float64) for k in keys}
    for start in range(0, n_queries, chunk):
        stop = min(start + chunk, n_queries)
        _, idx = scores(start, stop).topk(max_r, dim=1)
        rel = (gallery_labels[idx] == query_labels[start:stop, None]).float()
        out["recall_at_1"][start:stop] = rel[:, 0]
        out["recall_at_5"][start:stop] = rel[:, :5].amax(dim=1)
        rq = r[start:stop]
        ranks = torch.arange(1, rel.shape[1] + 1)
        rel = rel * (ranks[None, :] <= rq[:, None])
        precision = rel.cumsum(dim=1) / ranks
        out["map_at_r"][start:stop] = (precision * rel).sum(dim=1) / rq.clamp(min=1)
    return out


@torch.no_grad()
def gallery_ceiling(
    query: torch.Tensor,
    query_labels: torch.Tensor,
    gallery: torch.Tensor,
    gallery_labels: torch.Tensor,
) -> dict:
    """What a gallery side could reach against these query vectors if it knew every gallery
    image's class: each gallery vector moved towards its class's mean (``g + pull * mean``,
    ``pull`` in :data:`CEILING_PULLS`), the best Recall@1 and the best MAP@R over the pulls,
    each with its pull (``None``: the class mean itself).

    Read off the labels, never a deployable setting: an estimate of how much a better gallery
    side (a bigger ensemble, better heads) can add to a given query side.
    """
    gallery_labels = torch.as_tensor(gallery_labels)
    g = F.normalize(gallery.float(), dim=-1)
    sums = torch.zeros(int(gallery_labels.max()) + 1, g.shape[1]).index_add_(0, gallery_labels, g)
    mean = F.normalize(sums, dim=-1)[gallery_labels]
    out: dict = {}
    for pull in CEILING_PULLS:
        moved = mean if math.isinf(pull) else F.normalize(g + pull * mean, dim=-1)
        m = retrieval_metrics(query, query_labels, moved, gallery_labels)
        for key in ("recall_at_1", "map_at_r"):
            if key not in out or m[key] > out[key]:
                out[key], out[f"{key}_pull"] = m[key], None if math.isinf(pull) else pull
    return out
