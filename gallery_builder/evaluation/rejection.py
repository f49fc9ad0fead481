"""Risk-coverage analysis: how accuracy rises as the least trusted items are rejected.

A curve keeps the ``coverage`` fraction of items with the highest confidence and reports the
score (accuracy) among them. AURC is the area under the error (1 - score) curve over the
coverage grid, divided by the grid's span: the mean error over the range, lower is better.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = [
    "GALLERY_COVERAGE",
    "QUERY_COVERAGE",
    "kept_order",
    "n_kept",
    "selective_scores",
    "aurc",
    "rank_average",
]

GALLERY_COVERAGE = [round(1.0 - 0.05 * i, 2) for i in range(11)]  # drop 0 .. 50 %
QUERY_COVERAGE = [round(1.0 - 0.05 * i, 2) for i in range(19)]  # keep 100 .. 10 %


def kept_order(confidence: np.ndarray) -> np.ndarray:
    """Indices from most to least trusted (stable for ties)."""
    return np.argsort(-np.asarray(confidence, dtype=np.float64), kind="stable")


def n_kept(n: int, coverage: float) -> int:
    return max(1, math.ceil(round(coverage * n, 6)))


def selective_scores(
    confidence: np.ndarray, correct: np.ndarray, coverage: list[float]
) -> list[float]:
    """Mean of ``correct`` over the most confident ``coverage`` fraction, per coverage."""
    correct = np.asarray(correct, dtype=np.float64)[kept_order(confidence)]
    running = np.cumsum(correct)
    return [float(running[n_kept(len(correct), c) - 1] / n_kept(len(correct), c)) for c in coverage]


def aurc(coverage: list[float], score: list[float]) -> float:
    """Mean error (1 - score) over the coverage range, by the trapezoid rule."""
    c = np.asarray(coverage, dtype=np.float64)
    e = 1.0 - np.asarray(score, dtype=np.float64)
    span = c.max() - c.min()
    if span == 0:
        return float(e.mean())
    return float(abs(np.sum((e[1:] + e[:-1]) / 2 * np.diff(c))) / span)


def rank_average(*confidences: np.ndarray) -> np.ndarray:
    """Combine confidences by their mean rank (scale-free; ties share the lower rank)."""
    ranks = [
        np.searchsorted(np.sort(c), c, side="left")
        for c in (np.asarray(c, dtype=np.float64) for c in confidences)
    ]
    return np.mean(ranks, axis=0) / max(len(ranks[0]) - 1, 1)
