"""The evaluation of the reference experiment: every setting, rejection and the update study.

Settings (exact search, mean +- std over head-training seeds where heads are involved):
``sym:query`` query model on both sides; ``sym:G`` gallery model G on both sides (reference);
``kd:G`` a distilled query model searched against G's own index; ``MODE:G`` one gallery model
through its head (N = 1); ``MODE:ensemble`` all N, fused; MODE in ``unified`` / ``to-query``.
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from gallery_builder.evaluation.experiment import (
    ExperimentConfig,
    Splits,
    get_distilled,
    get_model,
    load_splits,
)
from gallery_builder.evaluation.metrics import recall_at_1, retrieval_metrics, search
from gallery_builder.evaluation.rejection import (
    GALLERY_COVERAGE,
    QUERY_COVERAGE,
    aurc,
    kept_order,
    n_kept,
    rank_average,
    selective_scores,
)
from gallery_builder.training.fit import embed
from gallery_builder.training.heads import MODES, HeadSet, save_heads, train_heads, train_query_head

log = logging.getLogger(__name__)

__all__ = ["run_experiment"]


class _Embeddings:
    """A model's embeddings of the train, gallery and query images, and with ``mirrored`` of
    the train images' mirror images (the distilled baselines' augmentation)."""

    def __init__(self, model, splits: Splits, name: str, mirrored: bool = False) -> None:
        self.train = embed(model, splits.train.images, progress=f"{name} train")
        self.train_mirrored = embed(model, splits.train.images, flip=True) if mirrored else None
        self.gallery = embed(model, splits.gallery.images)
        self.query = embed(model, splits.query.images)


class _Stopwatch:
    """Wall-clock seconds per stage of a run: logged as each ends, kept for the report."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, stage: str):
        start = time.perf_counter()
        yield
        self.seconds[stage] = round(time.perf_counter() - start, 1)
        log.info("%s: %.0f s", stage, self.seconds[stage])


def run_experiment(cfg: ExperimentConfig, out: Path) -> dict:
    """Train (or reuse) every model, evaluate every setting; returns the report dict."""
    out = Path(out)
    stage = _Stopwatch()
    models_dir = out / "models"
    splits = load_splits(cfg)
    log.info(splits.protocol)
    # heads train on the originals: adding their mirror images doubled the heads' training time
    # and did not lift the ensemble (Fashion-MNIST demo, unified mode, 3 seeds)
    train_labels = torch.as_tensor(splits.train.labels)
    gl = torch.as_tensor(splits.gallery.labels)
    ql = torch.as_tensor(splits.query.labels)

    with stage("gallery models"):
        gallery = {
            ms.name: get_model(ms, cfg, splits.train, models_dir, "gallery")
            for ms in cfg.gallery_models
        }
    with stage("query models"):
        query, query_cfg = get_model(cfg.query_model, cfg, splits.train, models_dir, "query")
        old_query, _ = get_model(cfg.old_query_model, cfg, splits.train, models_dir, "query")
    with stage("embeddings"):
        eg = {g: _Embeddings(m, splits, g, mirrored=True) for g, (m, _) in gallery.items()}
        eq = _Embeddings(query, splits, "query")
        eoq = _Embeddings(old_query, splits, "query-old")
    with stage("distilled models"):
        distilled = {
            g: get_distilled(
                cfg.query_model,
                g,
                eg[g].train,
                eg[g].train_mirrored,
                c["fingerprint"],
                cfg,
                splits.train,
                models_dir,
            )
            for g, (_, c) in gallery.items()
        }
    raw_train = {g: e.train for g, e in eg.items()}
    raw_gallery = {g: e.gallery for g, e in eg.items()}

    def metrics(q, g):
        return retrieval_metrics(q, ql, g, gl)

    settings: dict[str, dict] = {"sym:query": metrics(eq.query, eq.gallery)}
    for g in gallery:
        settings[f"sym:{g}"] = metrics(eg[g].query, eg[g].gallery)
    for g, (m, _) in distilled.items():
        settings[f"kd:{g}"] = metrics(embed(m, splits.query.images), eg[g].gallery)

    runs: dict[str, list[dict]] = {}
    first: dict[str, tuple[HeadSet, torch.Tensor, torch.Tensor, torch.Tensor]] = {}
    for mode in MODES:
        for seed in cfg.head_seeds:
            with stage(f"{mode} heads, seed {seed}"):
                heads = train_heads(
                    mode,
                    raw_train,
                    eq.train,
                    train_labels,
                    replace(cfg.heads, seed=seed),
                    dim=cfg.unified_dim if mode == "unified" else None,
                )
            qv = heads.encode_query(eq.query)
            for g in gallery:
                gv, _ = heads.encode_gallery(raw_gallery, [g])
                runs.setdefault(f"{mode}:{g}", []).append(metrics(qv, gv))
            gv, unc = heads.encode_gallery(raw_gallery)
            runs.setdefault(f"{mode}:ensemble", []).append(metrics(qv, gv))
            if mode not in first:
                first[mode] = (heads, gv, unc, qv)
                save_heads(
                    out / "heads" / mode,
                    heads,
                    query_cfg["fingerprint"],
                    {g: c["fingerprint"] for g, (_, c) in gallery.items()},
                    cfg.heads,
                    {"data": splits.train.name, "images": len(train_labels)},
                )
    for name, values in runs.items():
        settings[name] = _mean_std(values)
    for name in settings:
        settings[name].setdefault("recall_at_1_std", 0.0)

    default_mode = max(MODES, key=lambda m: settings[f"{m}:ensemble"]["recall_at_1"])
    heads, gv, unc, qv = first[default_mode]
    with stage("rejection"):
        rejection = _rejection(gv, unc, qv, gl, ql)
    with stage("update study"):
        update = {
            "mode": default_mode,
            "modes": _update_study(
                cfg, raw_train, raw_gallery, eq, eoq, train_labels, gl, ql, first
            ),
        }
    update.update(update["modes"][default_mode])

    models = {
        name: {
            "params": c["params"],
            "mflops": c["mflops"],
            "embedding_dim": c["embedding_dim"],
            "role": c["role"],
            "architecture": c["identity"]["architecture"],
        }
        for name, (_, c) in {
            **gallery,
            "query": (query, query_cfg),
            **{f"kd-{g}": v for g, v in distilled.items()},
        }.items()
    }
    return {
        "dataset": cfg.dataset,
        "protocol": splits.protocol,
        "default_mode": default_mode,
        "settings": settings,
        "rejection": rejection,
        "update": update,
        "models": models,
        "head_seeds": list(cfg.head_seeds),
        "stage_seconds": stage.seconds,
        "sizes": {
            "train": len(splits.train),
            "gallery": len(splits.gallery),
            "query": len(splits.query),
        },
    }


def _mean_std(values: list[dict]) -> dict:
    out = {}
    for key in values[0]:
        arr = np.array([v[key] for v in values])
        out[key] = float(arr.mean())
        out[f"{key}_std"] = float(arr.std(ddof=1)) if len(arr) > 1 else 0.0
    return out


def _update_study(cfg, raw_train, raw_gallery, eq, eoq, train_labels, gl, ql, first) -> dict:
    """Old query model (less data, shorter training) vs a new one, against one gallery that no
    gallery model is run for again."""
    s = replace(cfg.heads, seed=cfg.head_seeds[0])
    out = {}
    # unified: the gallery is encoded once with the old space's heads and never touched again
    old = train_heads("unified", raw_train, eoq.train, train_labels, s, dim=cfg.unified_dim)
    gv, _ = old.encode_gallery(raw_gallery)
    new = train_query_head(old, raw_train, eq.train, train_labels, s)
    assert torch.equal(new.encode_gallery(raw_gallery)[0], gv)  # gallery side untouched
    out["unified"] = {
        "old_query_recall_at_1": recall_at_1(old.encode_query(eoq.query), ql, gv, gl),
        "new_query_recall_at_1": recall_at_1(new.encode_query(eq.query), ql, gv, gl),
        "gallery_reencoded": False,
    }
    # to-query: new gallery heads into the new query space, re-projecting stored raw embeddings
    old = train_heads("to-query", raw_train, eoq.train, train_labels, s)
    reprojected, _ = first["to-query"][0].encode_gallery(raw_gallery)
    out["to-query"] = {
        "old_query_recall_at_1": recall_at_1(
            old.encode_query(eoq.query), ql, old.encode_gallery(raw_gallery)[0], gl
        ),
        "new_query_recall_at_1": recall_at_1(eq.query, ql, reprojected, gl),
        "gallery_reencoded": False,
    }
    return out


def _rejection(gv, unc, qv, gl, ql) -> dict:
    unc_np = unc.numpy()
    n = len(gv)
    # gallery_drop: remove the most uncertain gallery images, re-run the queries
    order = kept_order(-unc_np)
    rng = np.random.default_rng(0)
    drop, drop_random = [], []
    for c in GALLERY_COVERAGE:
        keep = torch.as_tensor(order[: n_kept(n, c)])
        drop.append(recall_at_1(qv, ql, gv[keep], gl[keep]))
        drop_random.append(
            float(
                np.mean(
                    [
                        recall_at_1(qv, ql, gv[idx], gl[idx])
                        for idx in (
                            torch.as_tensor(rng.permutation(n)[: n_kept(n, c)]) for _ in range(3)
                        )
                    ]
                )
            )
        )
    # gallery_quality: does the leave-one-out nearest gallery neighbour share the label?
    _, nn2 = search(gv, gv, 2)
    self_first = nn2[:, 0] == torch.arange(n)
    neighbour = torch.where(self_first, nn2[:, 1], nn2[:, 0])
    agree = (gl[neighbour] == gl).numpy()
    quality = selective_scores(-unc_np, agree, GALLERY_COVERAGE)
    # query_time: trust each query's top hit by its stored spread, its similarity, or both
    top_score, top = search(qv, gv, 1)
    top, top_score = top[:, 0], top_score[:, 0].numpy()
    correct = (gl[top] == ql).numpy()
    rules = {"spread": -unc_np[top.numpy()], "similarity": top_score}
    rules["combined"] = rank_average(rules["spread"], rules["similarity"])
    curves = {k: selective_scores(v, correct, QUERY_COVERAGE) for k, v in rules.items()}
    areas = {k: aurc(QUERY_COVERAGE, v) for k, v in curves.items()}
    best = min(areas, key=areas.get)
    flat_q = [float(correct.mean())] * len(QUERY_COVERAGE)
    flat_g = [float(agree.mean())] * len(GALLERY_COVERAGE)
    return {
        "gallery_drop": _view(GALLERY_COVERAGE, drop, drop_random),
        "gallery_quality": _view(GALLERY_COVERAGE, quality, flat_g),
        "query_time": {
            **_view(QUERY_COVERAGE, curves["spread"], flat_q),
            "score_similarity": curves["similarity"],
            "aurc_similarity": areas["similarity"],
            "score_combined": curves["combined"],
            "aurc_combined": areas["combined"],
            "score_best": curves[best],
            "aurc_best": areas[best],
            "best_rule": best,
        },
    }


def _view(coverage, score, score_random) -> dict:
    return {
        "coverage": list(coverage),
        "score": list(score),
        "score_random": list(score_random),
        "aurc": aurc(coverage, score),
        "aurc_random": aurc(coverage, score_random),
    }
