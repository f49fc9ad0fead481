"""Ensemble fusion: the gallery vector and its uncertainty from N transformed embeddings."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["fuse"]


def fuse(transformed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Fuse (N, B, D) transformed embeddings of B images by N gallery models.

    Each of the N embeddings is L2-normalised first. The gallery vector is the L2-normalised
    mean. The uncertainty is the mean pairwise cosine distance between the N embeddings,
    ``1 - mean_{i<j} <t_i, t_j>``, in [0, 2]: 0 when all models agree, and it needs no
    reference point (unlike a distance to the mean, it does not shrink as N grows). It is 0 for
    N = 1.
    """
    if transformed.ndim != 3:
        raise ValueError(f"expected (models, batch, dim), got shape {tuple(transformed.shape)}")
    t = F.normalize(transformed.float(), dim=-1)
    n = t.shape[0]
    total = t.sum(dim=0)
    vector = F.normalize(total, dim=-1)
    if n == 1:
        return vector, torch.zeros(t.shape[1])
    # |sum|^2 = N + 2 * sum_{i<j} <t_i, t_j>
    pair_sum = (total.pow(2).sum(dim=-1) - n) / 2
    uncertainty = 1 - pair_sum / (n * (n - 1) / 2)
    return vector, uncertainty.clamp(0, 2)
