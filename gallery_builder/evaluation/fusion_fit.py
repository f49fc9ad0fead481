"""Fusion weights fitted on validation classes, so that a weak member cannot drag the fused
vector down (and the query model's own member can only add to what it achieves alone)."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path

import torch

from gallery_builder.training.fusion import fuse
from gallery_builder.training.heads import QUERY_MEMBER
from query_sdk.errors import DataError
from query_sdk.fileio import read_json, write_json_atomic

__all__ = [
    "fit_weights",
    "WEIGHT_LEVELS",
    "RECOMMENDATION_FILE",
    "write_recommendation",
    "recommended",
]

#: What an experiment recommends deploying, read by cmce-build-gallery and cmce-export.
RECOMMENDATION_FILE = "recommendation.json"

#: The weights a member can take, relative to the others (0 drops it).
WEIGHT_LEVELS = (0, 1, 2, 3, 4)


def fit_weights(
    members: dict[str, torch.Tensor],
    score: Callable[[torch.Tensor], float],
    levels: tuple[int, ...] = WEIGHT_LEVELS,
    exhaustive_up_to: int = 5,
) -> tuple[dict[str, float], float]:
    """The fusion weights of ``members`` (name -> (B, D) transformed validation embeddings)
    that maximise ``score(fused vectors)``, and that score.

    Up to ``exhaustive_up_to`` members every combination of ``levels`` is tried; beyond, a
    coordinate ascent from equal weights. Ties keep the combination found first, which in
    the exhaustive order is the one with the smallest weights (the simplest).
    """
    names = list(members)
    stacked = torch.stack([members[n] for n in names])

    def value(w: tuple[int, ...]) -> float:
        return score(fuse(stacked, torch.tensor(w, dtype=torch.float32))[0])

    if len(names) <= exhaustive_up_to:
        grid = sorted(
            (w for w in itertools.product(levels, repeat=len(names)) if any(w)),
            key=lambda w: (sum(w), w[::-1]),
        )
        best = max(grid, key=value)  # max keeps the first of equal values
        return dict(zip(names, map(float, best), strict=True)), value(best)
    best = tuple([1] * len(names))
    best_value, improved = value(best), True
    while improved:
        improved = False
        for i, level in itertools.product(range(len(names)), levels):
            w = best[:i] + (level,) + best[i + 1 :]
            if any(w) and (v := value(w)) > best_value:
                best, best_value, improved = w, v, True
    return dict(zip(names, map(float, best), strict=True)), best_value


def write_recommendation(out: Path, recommendation: dict, query_name: str) -> Path:
    """``<out>/recommendation.json``: the chosen mode and members, with the folders (relative
    to ``out``) of the models and heads that build and export use."""
    members = [m for m in recommendation["members"] if m != QUERY_MEMBER]
    doc = {
        **recommendation,
        "heads": f"heads/{recommendation['mode']}",
        "query_model": f"models/{query_name}",
        # the query model is a member too when its own embedding has weight
        "gallery_models": [f"models/{m}" for m in members]
        + ([f"models/{query_name}"] if QUERY_MEMBER in recommendation["members"] else []),
    }
    path = Path(out) / RECOMMENDATION_FILE
    write_json_atomic(path, doc)
    return path


def recommended(experiment: Path) -> dict[str, Path | list[Path]]:
    """The folders an experiment recommends: ``heads``, ``query_model``, ``gallery_models``
    (absolute, each inside the experiment folder); DataError naming the file otherwise."""
    experiment = Path(experiment).resolve()
    path = experiment / RECOMMENDATION_FILE
    doc = read_json(path)
    try:
        found = {
            "heads": experiment / doc["heads"],
            "query_model": experiment / doc["query_model"],
            "gallery_models": [experiment / m for m in doc["gallery_models"]],
        }
    except (KeyError, TypeError) as e:
        raise DataError(f"{path}: not an experiment recommendation ({e})") from e
    for p in [found["heads"], found["query_model"], *found["gallery_models"]]:
        if experiment not in p.resolve().parents:
            raise DataError(f"{path}: {p} is outside the experiment folder")
    return found
