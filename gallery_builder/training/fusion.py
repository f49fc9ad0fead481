"""Ensemble fusion: the gallery vector and its uncertainty from N transformed embeddings."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["fuse"]


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
