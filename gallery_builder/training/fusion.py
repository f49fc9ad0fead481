"""Ensemble fusion: the gallery vector and its uncertainty from N transformed embeddings, and
the averaging of gallery vectors over the neighbourhoods the gallery models see."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "fuse",
    "graph_space",
    "nearest_neighbours",
    "weighted_average",
    "neighbour_average",
    "average_in_view",
]


def fuse(
    transformed: torch.Tensor, weights: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fuse (N, B, D) transformed embeddings of B images by N members.

    Each of the N embeddings is L2-normalised first. The gallery vector is the L2-normalised
    weighted mean (``weights`` (N,), non-negative; equal when None). The uncertainty is the
    weighted mean pairwise cosine distance between the members,
    ``1 - sum_{i<j} w_i w_j <t_i, t_j> / sum_{i<j} w_i w_j``, in [0, 2]: 0 when all agree, and it
    needs no reference point (unlike a distance to the mean, it does not shrink as N grows). It
    is 0 when fewer than two members have weight.
    """
    if transformed.ndim != 3:
        raise ValueError(f"expected (models, batch, dim), got shape {tuple(transformed.shape)}")
    n = transformed.shape[0]
    w = torch.ones(n) if weights is None else torch.as_tensor(weights, dtype=torch.float32)
    if w.shape != (n,) or bool((w < 0).any()) or not float(w.sum()) > 0:
        raise ValueError(f"need {n} non-negative weights with a positive sum, got {w.tolist()}")
    w = w / w.sum()
    t = F.normalize(transformed.float(), dim=-1)
    total = torch.einsum("n,nbd->bd", w, t)
    vector = F.normalize(total, dim=-1)
    # |sum_i w_i t_i|^2 = sum_i w_i^2 + 2 sum_{i<j} w_i w_j <t_i, t_j>
    squares = float(w.pow(2).sum())
    pairs = (1 - squares) / 2
    if pairs < 1e-9:
        return vector, torch.zeros(t.shape[1])
    pair_sum = (total.pow(2).sum(dim=-1) - squares) / 2
    return vector, (1 - pair_sum / pairs).clamp(0, 2)


def graph_space(raw: dict[str, torch.Tensor], weights: dict[str, float]) -> torch.Tensor:
    """(B, sum of dims) vectors whose inner product is the ``weights``-weighted mean of the
    models' cosine similarities: the gallery models' own view of which images are alike."""
    total = sum(w for w in weights.values() if w > 0)
    parts = [
        (w / total) ** 0.5 * F.normalize(raw[n].float(), dim=-1)
        for n, w in weights.items()
        if w > 0
    ]
    return torch.cat(parts, dim=1)


def nearest_neighbours(graph: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each of the B items' ``k`` nearest other items in ``graph`` (B, G) by inner product:
    (similarities, indices), each (B, min(k, B - 1)). Exact search, O(B^2 G), in blocks of
    bounded memory."""
    n = len(graph)
    k = max(0, min(int(k), n - 1))
    g = graph.float()
    sims_out, idx_out = torch.empty(n, k), torch.empty(n, k, dtype=torch.long)
    block = max(16, 2**25 // max(n, 1))  # at most 32M similarities (128 MB) at a time
    for s in range(0, n if k else 0, block):
        sims = g[s : s + block] @ g.T
        rows = torch.arange(len(sims))
        sims[rows, rows + s] = -float("inf")  # the item itself is not its neighbour
        sims_out[s : s + block], idx_out[s : s + block] = sims.topk(k, dim=1)
    return sims_out, idx_out


def weighted_average(
    vectors: torch.Tensor, neighbours: tuple[torch.Tensor, torch.Tensor], k: int, alpha: float
) -> torch.Tensor:
    """Each of the B ``vectors`` replaced by the L2-normalised sum of itself (weight 1) and its
    first ``k`` ``neighbours`` (from :func:`nearest_neighbours`), each weighted by its
    similarity to the power ``alpha`` (negative similarities count 0)."""
    sims, idx = neighbours[0][:, :k], neighbours[1][:, :k]
    v = vectors.float()
    w = sims.clamp(min=0) ** alpha
    return F.normalize(v + (w[..., None] * v[idx]).sum(1), dim=-1)


def neighbour_average(
    vectors: torch.Tensor, graph: torch.Tensor, k: int, alpha: float
) -> torch.Tensor:
    """Database-side augmentation (αDBA, Radenović et al., 2018) with the neighbours found in
    another space than the one averaged: each of the B ``vectors`` averaged over its ``k``
    nearest other items in ``graph`` (B, G) (:func:`weighted_average`)."""
    return weighted_average(vectors, nearest_neighbours(graph, k), k, alpha)


def average_in_view(
    vectors: torch.Tensor, raw: dict[str, torch.Tensor], neighbours: dict
) -> torch.Tensor:
    """``vectors`` averaged over their neighbours in the view of ``raw``'s models, as a
    ``{"k", "alpha", "graph"}`` setting (``HeadSet.neighbours``) says."""
    space = graph_space(raw, neighbours["graph"])
    return neighbour_average(vectors, space, neighbours["k"], neighbours["alpha"])
