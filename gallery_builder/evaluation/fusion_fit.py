"""Fusion weights fitted on validation classes, so that a weak member cannot drag the fused
vector down (and the query model's own member can only add to what it achieves alone), and
the neighbour averaging of the query model's own member over the gallery models' view."""

from __future__ import annotations

import functools
import hashlib
import itertools
from pathlib import Path

import torch
import torch.nn.functional as F

from gallery_builder.evaluation.metrics import per_query_metrics, retrieval_metrics
from gallery_builder.training.fusion import graph_space, nearest_neighbours, weighted_average
from gallery_builder.training.heads import QUERY_MEMBER
from query_sdk.errors import DataError
from query_sdk.fileio import read_json, write_json_atomic

__all__ = [
    "fit_weights",
    "fit_neighbours",
    "choose",
    "value",
    "clearly_better",
    "MAP_WEIGHT",
    "graph_candidates",
    "ValidationView",
    "WEIGHT_LEVELS",
    "NEIGHBOUR_KS",
    "NEIGHBOUR_ALPHAS",
    "RECOMMENDATION_FILE",
    "write_recommendation",
    "recommended",
]

#: What an experiment recommends deploying, read by cmce-build-gallery and cmce-export.
RECOMMENDATION_FILE = "recommendation.json"

#: The weights a member can take, relative to the others (0 drops it).
WEIGHT_LEVELS = (0.0, 0.5, 1.0, 2.0, 4.0)

#: Neighbour counts and similarity exponents the neighbour averaging is fitted over.
NEIGHBOUR_KS = (1, 2, 3, 5, 8)
NEIGHBOUR_ALPHAS = (1.0, 3.0, 10.0, 30.0)

#: How much MAP@R counts against Recall@1 in every choice made on validation (:func:`value`).
MAP_WEIGHT = 0.01


@torch.no_grad()
def fit_weights(
    members: dict[str, torch.Tensor],
    query: torch.Tensor,
    query_labels: torch.Tensor,
    gallery_labels: torch.Tensor,
    levels: tuple[float, ...] = WEIGHT_LEVELS,
    max_queries: int = 1000,
) -> tuple[dict[str, float], float]:
    """The fusion weights of ``members`` (name -> (B, D) transformed validation gallery
    embeddings) that win on the validation ``query`` vectors by :func:`value`, and that value.

    Coordinate ascent over ``levels`` from equal weights (the paper's mean), from the best
    single member and from the query model's own member, by the one-standard-error rule
    (:func:`clearly_better`): a change must win by more than its noise on these queries, and
    another start's weights replace equal weights only when they clearly beat them, so that
    weights fitted to a few hundred validation queries do not chase their noise. Per-member
    scores are computed once (the fused score is their weighted sum over the fused vector's
    norm), on at most ``max_queries`` queries drawn with a fixed seed.
    """
    names = list(members)
    if len(query) > max_queries:
        keep = torch.randperm(len(query), generator=torch.Generator().manual_seed(0))
        keep = keep[:max_queries].sort().values
        query, query_labels = query[keep], torch.as_tensor(query_labels)[keep]
    t = F.normalize(torch.stack([members[n].float() for n in names]), dim=-1)  # (M, B, D)
    scores = torch.einsum("qd,mbd->mqb", query.float(), t)
    gram = torch.einsum("mbd,nbd->bmn", t, t)

    @functools.cache  # the ascents revisit weight vectors
    def fitness(w: tuple[float, ...]) -> torch.Tensor:
        wt = torch.tensor(w)
        norm = torch.einsum("m,bmn,n->b", wt, gram, wt).clamp_min(1e-12).sqrt()
        fused = torch.einsum("m,mqb->qb", wt, scores) / norm
        return value(  # each query's share of the value
            per_query_metrics(lambda a, b: fused[a:b], len(query), query_labels, gallery_labels)
        )

    def beats(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
        return clearly_better(fitness(a), fitness(b))

    singles = {n: tuple(float(i == j) for j in range(len(names))) for i, n in enumerate(names)}

    def ascend(w: tuple[float, ...]) -> tuple[float, ...]:
        improved = True
        while improved:
            improved = False
            for i, level in itertools.product(range(len(names)), levels):
                c = w[:i] + (level,) + w[i + 1 :]
                if c != w and any(c) and beats(c, w):
                    w, improved = c, True
        return w

    starts = [max(singles.values(), key=lambda w: fitness(w).mean().item())]
    if QUERY_MEMBER in singles:
        starts.append(singles[QUERY_MEMBER])
    w = ascend((1.0,) * len(names))
    for other in map(ascend, starts):
        if beats(other, w):
            w = other
    return dict(zip(names, w, strict=True)), fitness(w).mean().item()


def clearly_better(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether per-query values ``a`` beat ``b`` (the same queries) by more than one standard
    error of their paired difference: the one-standard-error rule of model selection, which
    keeps the simpler choice ``b`` unless the validation queries clearly say otherwise.

    Fashion-MNIST (2,500 validation queries, 1,000 of them fitting the weights): on the
    values alone the unified weights left equal on a few queries' lead (one member dropped,
    another doubled, differently in each head seed): 84.55 +- 0.26 Recall@1 and 70.58 +- 0.26
    MAP@R on the test images, against 84.72 +- 0.07 and 70.91 +- 0.08 at equal weights, which
    this rule keeps there. Fitting on all 2,500 queries without the rule did no better."""
    d = (a - b).double()
    return bool(d.mean() > d.std() / len(d) ** 0.5) if len(d) > 1 else bool(d.mean() > 0)


def value(metrics: dict) -> float | torch.Tensor:
    """What every choice on validation maximises: Recall@1 + :data:`MAP_WEIGHT` x MAP@R (of
    per-query metrics, each query's share of it).

    Recall@1 comes first because the two trade against each other on unseen classes: the
    heavier the neighbour averaging, the higher MAP@R and the lower Recall@1. MAP@R still
    decides between settings whose Recall@1 differs by a few validation queries (noise): ten
    MAP@R points outweigh 0.1 Recall@1 points. Measured on the three presets (validation
    against search): a plain sum let MAP@R buy Recall@1 away (glyphs: the chosen averaging
    lost 0.27 Recall@1 to the query model alone; han: the recommendation 0.12); Recall@1
    alone preferred a setting 2 of 5,000 validation queries ahead and 9.1 MAP@R points behind
    (Fashion-MNIST: `to-query:ensemble`, 1.18 Recall@1 and 9.6 MAP@R below `unified:ensemble`
    on the test images); the weight keeps all three right between 0.0044 and 0.015."""
    return metrics["recall_at_1"] + MAP_WEIGHT * metrics["map_at_r"]


def choose(candidates: dict) -> object:
    """The key of the best of ``candidates`` (key -> validation metrics) by :func:`value`;
    the first listed on equal value."""
    return max(candidates, key=lambda c: value(candidates[c]))


def graph_candidates(names: list[str]) -> list[tuple[str, ...]]:
    """The views the neighbours may be found in: all of the gallery models ``names``, and,
    for two or more, each set that leaves one out (so that a weak member cannot spoil the
    neighbours); the models of a view count equally."""
    names = tuple(names)
    return [names, *(tuple(n for n in names if n != d) for d in names if len(names) > 1)]


class ValidationView:
    """The validation gallery as the gallery models see it (``raw``: name -> (B, D) raw
    embeddings): each view's nearest neighbours are found once, and each evaluated averaging
    is remembered by content (the to-query mode's own member is the same for every head seed
    and subset of gallery models, so the accuracy-against-N study re-fits for free)."""

    def __init__(self, raw: dict[str, torch.Tensor]) -> None:
        self.raw = raw
        self._neighbours: dict[tuple[str, ...], tuple[torch.Tensor, torch.Tensor]] = {}
        self._metrics: dict[tuple, dict] = {}

    def neighbours(self, graph: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        if graph not in self._neighbours:
            space = graph_space(self.raw, dict.fromkeys(graph, 1.0))
            self._neighbours[graph] = nearest_neighbours(space, max(NEIGHBOUR_KS))
        return self._neighbours[graph]

    @torch.no_grad()
    def averaged_metrics(
        self,
        own: torch.Tensor,
        own_key: bytes,
        graph: tuple[str, ...],
        k: int,
        alpha: float,
        scored,
    ) -> dict:
        """``scored(vectors)``'s metrics of ``own`` (digest ``own_key``) averaged over ``k``
        neighbours in ``graph`` at similarity exponent ``alpha``."""
        key = (own_key, scored.key, graph, k, alpha)
        if key not in self._metrics:
            self._metrics[key] = scored(weighted_average(own, self.neighbours(graph), k, alpha))
        return self._metrics[key]


def _digest(t: torch.Tensor) -> bytes:
    return hashlib.blake2b(t.float().contiguous().numpy().tobytes(), digest_size=16).digest()


class _Scored:
    """Validation metrics of fixed queries against gallery vectors."""

    def __init__(self, query: torch.Tensor, query_labels, gallery_labels) -> None:
        self.query, self.query_labels, self.gallery_labels = query, query_labels, gallery_labels
        self.key = (_digest(query), _digest(torch.as_tensor(gallery_labels)))

    def __call__(self, vectors: torch.Tensor) -> dict:
        return retrieval_metrics(self.query, self.query_labels, vectors, self.gallery_labels)


@torch.no_grad()
def fit_neighbours(
    own: torch.Tensor,
    view: ValidationView,
    names: list[str],
    query: torch.Tensor,
    query_labels: torch.Tensor,
    gallery_labels: torch.Tensor,
) -> tuple[dict | None, dict]:
    """The neighbour averaging of the query model's own member ``own`` (its vectors of the
    validation gallery) over the gallery models ``names`` in ``view`` that wins on the
    validation ``query`` vectors (:func:`choose`), over the views of
    :func:`graph_candidates` x :data:`NEIGHBOUR_KS` x :data:`NEIGHBOUR_ALPHAS`, or ``own``
    alone: ``({k, alpha, graph}, metrics)``, or ``(None, own's metrics)``
    when ``own`` alone wins. Listed lightest first (the smaller k, the larger alpha), so that
    exact ties keep the lighter averaging."""
    own = F.normalize(own.float(), dim=-1)
    scored = _Scored(query, query_labels, gallery_labels)
    candidates = {None: scored(own)}  # listed first: it wins ties
    own_key = _digest(own)  # once: every candidate shares it
    for graph in graph_candidates(names):
        for k in NEIGHBOUR_KS:
            for alpha in sorted(NEIGHBOUR_ALPHAS, reverse=True):
                candidates[graph, k, alpha] = view.averaged_metrics(
                    own, own_key, graph, k, alpha, scored
                )
    best = choose(candidates)
    if best is None:
        return None, candidates[None]
    graph, k, alpha = best
    return {"k": k, "alpha": alpha, "graph": dict.fromkeys(graph, 1.0)}, candidates[best]


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
