"""The evaluation of the reference experiment: every setting, rejection, accuracy against N,
the update study and the recommendation.

Settings (exact search, mean +- std over head-training seeds where heads are involved):
``sym:query`` query model on both sides; ``sym:G`` gallery model G on both sides (reference);
``kd:G`` a distilled query model searched against G's own index; ``MODE:G`` one gallery model
through its head (N = 1); ``unified:query`` the identity member alone (the query model on
both sides, through the query head); ``MODE:mean`` the paper's plain mean of the N heads;
``MODE:fused`` the N heads and the query model's own embedding of the gallery image (the
identity member), fused with weights fitted on the validation classes; ``MODE:neighbours`` the
query model's own member averaged over each gallery image's nearest neighbours in the gallery
models' view (the mean of their cosine similarities; the view, k and the similarity exponent
fitted on the validation classes); ``MODE:ensemble`` whichever of the two wins on validation.
MODE is ``unified`` or ``to-query``. Everything that is
chosen (weights, neighbours, the recommended setting) is chosen on the validation split, never
on the search classes (:func:`~gallery_builder.evaluation.fusion_fit.value`: Recall@1 first,
MAP@R deciding near ties), against a validation gallery padded
with training images as distractors (:func:`~gallery_builder.data.splits.distractor_index`).
"""

from __future__ import annotations

import itertools
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
from gallery_builder.evaluation.fusion_fit import (
    ValidationView,
    choose,
    fit_neighbours,
    fit_weights,
    write_recommendation,
)
from gallery_builder.evaluation.metrics import (
    gallery_ceiling,
    recall_at_1,
    retrieval_metrics,
    search,
)
from gallery_builder.evaluation.parallel import train_models, worker_count
from gallery_builder.evaluation.rejection import (
    GALLERY_COVERAGE,
    QUERY_COVERAGE,
    aurc,
    kept_order,
    n_kept,
    rank_average,
    selective_scores,
)
from gallery_builder.training.fit import embed, embed_views
from gallery_builder.training.fusion import average_in_view
from gallery_builder.training.heads import (
    MODES,
    QUERY_MEMBER,
    HeadSet,
    save_heads,
    train_heads,
    train_query_head,
)

log = logging.getLogger(__name__)

__all__ = ["run_experiment"]

_PARTS = ("val_gallery", "val_query", "gallery", "query")


class _Embeddings:
    """A model's embeddings of the training, validation and search images; the validation
    gallery's are followed by those of its distractors (training images). A distilled model
    embeds only the queries (it searches against its teacher's index)."""

    def __init__(self, model, splits: Splits, name: str, distilled: bool = False) -> None:
        if distilled:
            for part in ("val_query", "query"):
                setattr(self, part, embed(model, getattr(splits, part).images))
            return
        self.train = embed(model, splits.train.images, progress=f"{name} train")
        for part in _PARTS:
            setattr(self, part, embed(model, getattr(splits, part).images))
        self.val_gallery = torch.cat([self.val_gallery, self.train[splits.val_distractors]])


class _Stopwatch:
    """Wall-clock seconds per stage of a run: logged as each ends, kept for the report."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, stage: str):
        start = time.perf_counter()
        yield
        self.seconds[stage] = round(time.perf_counter() - start + self.seconds.get(stage, 0), 1)
        log.info("%s: %.0f s", stage, self.seconds[stage])


class _Scorer:
    """Retrieval metrics of query vectors against gallery vectors, on the search split
    (``gallery``/``query``) or the validation split (``val_gallery``/``val_query``; each
    distractor labelled by its training class, past every validation label, so that no query
    matches it)."""

    def __init__(self, splits: Splits) -> None:
        self.labels = {p: torch.as_tensor(getattr(splits, p).labels) for p in _PARTS}
        past = int(max(self.labels["val_gallery"].max(), self.labels["val_query"].max())) + 1
        distractors = torch.as_tensor(splits.train.labels[splits.val_distractors]) + past
        self.labels["val_gallery"] = torch.cat([self.labels["val_gallery"], distractors])

    def __call__(self, q: torch.Tensor, g: torch.Tensor, val: bool = False) -> dict:
        prefix = "val_" if val else ""
        return retrieval_metrics(
            q, self.labels[prefix + "query"], g, self.labels[prefix + "gallery"]
        )

    @property
    def val_labels(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.labels["val_query"], self.labels["val_gallery"]


def run_experiment(cfg: ExperimentConfig, out: Path) -> dict:
    """Train (or reuse) every model, evaluate every setting; returns the report dict."""
    out = Path(out)
    stage = _Stopwatch()
    models_dir = out / "models"
    splits = load_splits(cfg)
    log.info(splits.protocol)
    score = _Scorer(splits)

    if (workers := worker_count(cfg)) > 1:
        with stage(f"models, {workers} at a time"):  # the stages below then load them
            train_models(cfg, splits.train, models_dir, workers)
    with stage("gallery models"):
        gallery = {
            ms.name: get_model(ms, cfg, splits.train, models_dir, "gallery")
            for ms in cfg.gallery_models
        }
    with stage("diversity models"):
        extra = {
            ms.name: get_model(ms, cfg, splits.train, models_dir, "gallery")
            for ms in cfg.diversity_models
        }
    with stage("query models"):
        query, query_cfg = get_model(cfg.query_model, cfg, splits.train, models_dir, "query")
        old_query, _ = get_model(cfg.old_query_model, cfg, splits.train, models_dir, "query")
    with stage("distilled models"):
        distilled = {
            g: get_distilled(cfg.query_model, g, m, c["fingerprint"], cfg, splits.train, models_dir)
            for g, (m, c) in gallery.items()
        }
    with stage("embeddings"):
        eg = {g: _Embeddings(m, splits, g) for g, (m, _) in {**gallery, **extra}.items()}
        eq = _Embeddings(query, splits, "query")
        eoq = _Embeddings(old_query, splits, "query-old")
        # heads see embeddings, not pixels: random views of the training images are their
        # augmentation (every model embeds the same view); the diversity study's heads train
        # on the images alone (views would double its cost)
        views = embed_views(
            {
                **{g: m for g, (m, _) in gallery.items()},
                "query": query,
                "query-old": old_query,
            },
            splits.train.images,
            cfg.query_model.train.augment,
            cfg.heads_views,
            seed=cfg.head_seeds[0],
        )
    head_train = {g: torch.cat([eg[g].train, views[g]]) for g in gallery}
    q_train = torch.cat([eq.train, views["query"]])
    oq_train = torch.cat([eoq.train, views["query-old"]])
    labels = torch.as_tensor(splits.train.labels).repeat(1 + cfg.heads_views)

    settings: dict[str, dict] = {}
    val: dict[str, dict] = {}
    view = ValidationView({g: e.val_gallery for g, e in eg.items()})

    def record(name: str, q_of, g_of) -> None:
        """``q_of(val)`` and ``g_of(val)`` give the query and gallery vectors of a split."""
        settings[name] = score(q_of(False), g_of(False))
        val[name] = score(q_of(True), g_of(True), val=True)

    def part(e, side: str):
        return lambda v: getattr(e, ("val_" if v else "") + side)

    record("sym:query", part(eq, "query"), part(eq, "gallery"))
    for g in gallery:
        record(f"sym:{g}", part(eg[g], "query"), part(eg[g], "gallery"))
    with stage("embeddings"):
        ekd = {
            g: _Embeddings(m, splits, f"kd-{g}", distilled=True) for g, (m, _) in distilled.items()
        }
    for g in gallery:
        record(f"kd:{g}", part(ekd[g], "query"), part(eg[g], "gallery"))

    raw = {
        p: {**{g: getattr(eg[g], p) for g in gallery}, QUERY_MEMBER: getattr(eq, p)} for p in _PARTS
    }
    runs: dict[str, list[dict]] = {}
    val_runs: dict[str, list[dict]] = {}
    first: dict[str, dict] = {}
    for mode in MODES:
        for seed in cfg.head_seeds:
            with stage(f"{mode} heads"):
                heads = train_heads(
                    mode,
                    head_train,
                    q_train,
                    labels,
                    replace(cfg.heads, seed=seed),
                    dim=cfg.unified_dim if mode == "unified" else None,
                    identity=True,
                )
            result = _evaluate_heads(heads, raw, score, view)
            for name, (search_m, val_m) in result["settings"].items():
                runs.setdefault(f"{mode}:{name}", []).append(search_m)
                val_runs.setdefault(f"{mode}:{name}", []).append(val_m)
            if mode not in first:
                first[mode] = {"heads": heads, **result}
    for name, values in runs.items():
        settings[name] = _mean_std(values)
        val[name] = _mean_std(val_runs[name])
    for table in (settings, val):
        for name in table:
            table[name].setdefault("recall_at_1_std", 0.0)
            table[name].setdefault("map_at_r_std", 0.0)

    recommendation = _recommend(val, settings, first)
    default_mode = recommendation["mode"]
    for mode, f in first.items():
        chosen = recommendation if mode == default_mode else f
        f["heads"].set_weights(chosen["weights"])
        f["heads"].set_neighbours(chosen["neighbours"])
        save_heads(
            out / "heads" / mode,
            f["heads"],
            query_cfg["fingerprint"],
            {g: c["fingerprint"] for g, (_, c) in gallery.items()},
            cfg.heads,
            {"data": splits.train.name, "images": len(splits.train), "views": cfg.heads_views},
        )
    write_recommendation(out, recommendation, cfg.query_model.name)
    with stage("accuracy against N"):
        against_n = {mode: _against_n(f["heads"], raw, score, f) for mode, f in first.items()}
        diversity = {}
        for axis, names in cfg.diversity.items():
            axis_heads = train_heads(
                default_mode,
                {g: eg[g].train for g in names},
                eq.train,
                torch.as_tensor(splits.train.labels),
                replace(cfg.heads, seed=cfg.head_seeds[0]),
                dim=cfg.unified_dim if default_mode == "unified" else None,
                identity=True,
            )
            axis_raw = {
                p: {**{g: getattr(eg[g], p) for g in names}, QUERY_MEMBER: getattr(eq, p)}
                for p in _PARTS
            }
            diversity[axis] = {
                "models": names,
                **_against_n(axis_heads, axis_raw, score, _unnamed(first[default_mode])),
            }
    heads = first[default_mode]["heads"]
    qv = heads.encode_query(eq.query)
    with torch.no_grad():  # the ceiling: about the most a gallery side can add to this query side
        own = heads.transform_gallery(QUERY_MEMBER, eq.gallery.float())
    ceiling = gallery_ceiling(qv, score.labels["query"], own, score.labels["gallery"])
    with stage("rejection"):
        gv, unc = heads.gallery_vectors(raw["gallery"])
        rejection = _rejection(gv, unc, qv, score.labels["gallery"], score.labels["query"])
    with stage("update study"):
        update = {
            "mode": default_mode,
            "modes": _update_study(
                cfg, head_train, raw, eq, eoq, q_train, oq_train, labels, score, view, first
            ),
        }
    # what re-encoding the gallery for the new query model reaches: a rebuild, or a refresh
    # (only the query model's own member re-encoded; the same vectors)
    for mode, u in update["modes"].items():
        u["rebuilt_recall_at_1"] = settings[f"{mode}:ensemble"]["recall_at_1"]
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
            **extra,
            **{f"kd-{g}": v for g, v in distilled.items()},
        }.items()
    }
    return {
        "dataset": cfg.dataset,
        "protocol": splits.protocol,
        "open_set": splits.open_set,
        "split": splits.split,
        "default_mode": default_mode,
        "settings": settings,
        "validation": val,
        "recommendation": recommendation,
        "gallery_ceiling": {"mode": default_mode, **ceiling},
        "against_n": against_n,
        "diversity": {"mode": default_mode, "axes": diversity},
        "rejection": rejection,
        "update": update,
        "models": models,
        "head_seeds": list(cfg.head_seeds),
        "stage_seconds": stage.seconds,
        "sizes": {p: len(getattr(splits, p)) for p in ("train", *_PARTS)},
    }


def _evaluate_heads(heads: HeadSet, raw: dict, score: _Scorer, view: ValidationView) -> dict:
    """One head set's settings on search and validation: each member alone, the plain mean of
    the gallery models' heads, the members fused by weights fitted on validation (``fused``),
    the query model's own member averaged over the gallery models' neighbours
    (``neighbours``), and the ensemble: whichever of those two wins on validation."""
    q = {v: heads.encode_query(raw["val_query" if v else "query"][QUERY_MEMBER]) for v in (0, 1)}
    out = {}

    def add(name: str, choice: dict) -> None:
        out[name] = tuple(
            score(q[v], _gallery(heads, raw["val_gallery" if v else "gallery"], choice), bool(v))
            for v in (0, 1)
        )

    # the identity member alone through the query head (to-query has none: that is sym:query)
    for g in heads.members if heads.query is not None else heads.names:
        add(g, {"weights": {g: 1.0}, "neighbours": None})
    add("mean", {"weights": dict.fromkeys(heads.names, 1.0), "neighbours": None})
    fit = _fit_ensemble(heads, raw, q[1], score, view, heads.members)
    for name, choice in fit.items():
        if choice is not None:
            add(name, choice)
    return {"settings": out, **fit["ensemble"], "fused": fit["fused"]}


def _fit_ensemble(
    heads: HeadSet,
    raw: dict,
    q_val: torch.Tensor,
    score: _Scorer,
    view: ValidationView,
    names: list[str],
) -> dict[str, dict | None]:
    """The ensemble of ``names`` fitted on the validation split: ``fused`` (fusion weights),
    ``neighbours`` (the query model's own member averaged over its neighbours in the gallery
    models' view, or alone where averaging does not help; None without that member) and
    ``ensemble``, the one of the two that wins on validation (:func:`choose`). Each is
    ``{"weights", "neighbours"}`` as :class:`HeadSet` takes them."""
    val = raw["val_gallery"]
    with torch.no_grad():
        members = {m: heads.transform_gallery(m, val[m].float()) for m in names}
        weights, _ = fit_weights(members, q_val, *score.val_labels)
    fused = {"weights": weights, "neighbours": None}
    if QUERY_MEMBER not in names:
        return {"fused": fused, "neighbours": None, "ensemble": fused}
    neighbours, averaged_val = fit_neighbours(
        members[QUERY_MEMBER],
        view,
        [n for n in names if n != QUERY_MEMBER],
        q_val,
        *score.val_labels,
    )
    averaged = {"weights": {m: float(m == QUERY_MEMBER) for m in names}, "neighbours": neighbours}
    if neighbours is None:  # the own member alone: it does not compete with the fusion
        return {"fused": fused, "neighbours": averaged, "ensemble": fused}
    fused_val = score(q_val, _gallery(heads, val, fused), val=True)
    best = choose({"fused": fused_val, "neighbours": averaged_val})
    return {
        "fused": fused,
        "neighbours": averaged,
        "ensemble": fused if best == "fused" else averaged,
    }


def _gallery(heads: HeadSet, raw: dict, choice: dict) -> torch.Tensor:
    """Gallery vectors of ``raw`` fused with ``choice["weights"]`` (its members), averaged
    over ``choice["neighbours"]`` when set."""
    weights = {n: w for n, w in choice["weights"].items() if w > 0}
    vectors = heads.encode_gallery(raw, list(weights), weights)[0]
    if not (nb := choice["neighbours"]):
        return vectors
    return average_in_view(vectors, raw, nb)


def _against_n(heads: HeadSet, raw: dict, score: _Scorer, ensemble: dict) -> dict:
    """Recall@1 and MAP@R on the search classes against the number of gallery models N: the
    mean over every subset of N models, for the plain mean of their heads and for the
    ``ensemble`` (the mode's fitted ensemble of the whole line-up) on that subset
    (:func:`_on_subset`).

    The ensemble is not fitted again for each subset: on Fashion-MNIST's 2,500 validation
    queries that choice is noise at the size of what one more model adds (a pair's averaging
    over one model's neighbours, 0.24 Recall@1 points ahead of the fused pair on validation,
    was 0.93 behind on the test images, and took the curve down at N = 2)."""
    q = heads.encode_query(raw["query"][QUERY_MEMBER])
    rows = []
    for n in range(1, len(heads.names) + 1):
        mean, ens = [], []
        for subset in itertools.combinations(heads.names, n):
            names = list(subset)
            plain = {"weights": dict.fromkeys(names, 1.0), "neighbours": None}
            mean.append(score(q, _gallery(heads, raw["gallery"], plain)))
            ens.append(score(q, _gallery(heads, raw["gallery"], _on_subset(ensemble, names))))
        rows.append(
            {
                "n": n,
                "subsets": len(mean),
                **{
                    f"mean_{k}": float(np.mean([m[k] for m in mean]))
                    for k in ("recall_at_1", "map_at_r")
                },
                **{
                    f"ensemble_{k}": float(np.mean([m[k] for m in ens]))
                    for k in ("recall_at_1", "map_at_r")
                },
            }
        )
    return {"rows": rows}


def _on_subset(ensemble: dict, names: list[str]) -> dict:
    """``ensemble`` (``{"weights", "neighbours"}``) on the gallery models ``names`` and the
    query model's own member: fused with its weights (1 for a model it does not name), or the
    own member averaged over the neighbours that those of ``names`` in its view (all of them
    for a view of None) see, alone if none is; the plain mean where its weights leave
    nothing."""
    own = {QUERY_MEMBER: ensemble["weights"].get(QUERY_MEMBER, 1.0)}
    if nb := ensemble["neighbours"]:
        view = nb["graph"]
        graph = {n: 1.0 for n in names if view is None or view.get(n, 0.0) > 0}
        weights = {**dict.fromkeys(names, 0.0), **own}
        return {"weights": weights, "neighbours": {**nb, "graph": graph} if graph else None}
    weights = {**{n: ensemble["weights"].get(n, 1.0) for n in names}, **own}
    if not any(w > 0 for w in weights.values()):
        weights = dict.fromkeys(names, 1.0)
    return {"weights": weights, "neighbours": None}


def _unnamed(ensemble: dict) -> dict:
    """``ensemble``'s kind and settings for other gallery models: the own member's weight,
    the neighbour count and exponent; every gallery model counts equally (a view of None)."""
    nb = ensemble["neighbours"]
    return {
        "weights": {QUERY_MEMBER: ensemble["weights"].get(QUERY_MEMBER, 1.0)},
        "neighbours": {**nb, "graph": None} if nb else None,
    }


def _recommend(val: dict, settings: dict, first: dict) -> dict:
    """The deployable setting that wins on the validation split (:func:`choose`: Recall@1
    first, MAP@R deciding near ties), with its margin over the runner-up and over the query
    model alone; ``sym:G`` is a reference, not a choice (the phone runs the query model)."""

    def deployable(name: str) -> bool:  # fused and neighbours are the ensemble's candidates
        return (not name.startswith("sym:") or name == "sym:query") and not name.endswith(
            (":fused", ":neighbours")
        )

    candidates = {n: val[n] for n in val if deployable(n)}
    best = choose(candidates)
    runner_up = choose({n: m for n, m in candidates.items() if n != best})
    mode_setting = choose({n: m for n, m in candidates.items() if n.split(":")[0] in first})
    mode = mode_setting.split(":")[0]
    member = mode_setting.split(":", 1)[1]
    f = first[mode]
    neighbours = None
    if member == "ensemble":
        weights, neighbours = f["weights"], f["neighbours"]
    elif member == "mean":
        weights = {n: float(n != QUERY_MEMBER) for n in f["heads"].members}
    else:
        weights = {n: float(n == member) for n in f["heads"].members}
    graph = neighbours["graph"] if neighbours else {}
    return {
        "setting": best,
        "mode": mode,
        "heads_setting": mode_setting,
        # what a gallery vector needs: the fused members and those that find the neighbours
        "members": [n for n, w in weights.items() if w > 0 or graph.get(n, 0) > 0],
        "weights": weights,
        "neighbours": neighbours,
        "validation": {n: val[n] for n in (best, runner_up, "sym:query")},
        "margin_recall_at_1": val[best]["recall_at_1"] - val[runner_up]["recall_at_1"],
        "margin_map_at_r": val[best]["map_at_r"] - val[runner_up]["map_at_r"],
        "runner_up": runner_up,
        "search": {n: settings[n] for n in (best, runner_up)},
        # where the choice lands on the search classes among the deployable settings
        "deployable": len(candidates),
        **{
            f"search_rank_{key}": sorted(
                candidates, key=lambda n: settings[n][key], reverse=True
            ).index(best)
            + 1
            for key in ("recall_at_1", "map_at_r")
        },
    }


def _mean_std(values: list[dict]) -> dict:
    out = {}
    for key in values[0]:
        arr = np.array([v[key] for v in values])
        out[key] = float(arr.mean())
        out[f"{key}_std"] = float(arr.std(ddof=1)) if len(arr) > 1 else 0.0
    return out


def _update_study(
    cfg, head_train, raw, eq, eoq, q_train, oq_train, labels, score, view, first
) -> dict:
    """Old query model (less data, shorter training) vs a new one, against one gallery that no
    gallery model is run for again."""
    s = replace(cfg.heads, seed=cfg.head_seeds[0])
    gallery_raw = {g: raw["gallery"][g] for g in head_train}
    gl, ql = score.labels["gallery"], score.labels["query"]
    out = {}
    # unified, as deployed with the old query model: its own member fused, the ensemble fitted
    # on the validation classes; the gallery is encoded once and never touched again
    old = train_heads(
        "unified", head_train, oq_train, labels, s, dim=cfg.unified_dim, identity=True
    )
    val_raw = {"val_gallery": {**raw["val_gallery"], QUERY_MEMBER: eoq.val_gallery}}
    chosen = _fit_ensemble(old, val_raw, old.encode_query(eoq.val_query), score, view, old.members)
    old.set_weights(chosen["ensemble"]["weights"])
    gv = _gallery(old, {**gallery_raw, QUERY_MEMBER: eoq.gallery}, chosen["ensemble"])
    # the new head lands on the training images' fused vectors (they are no gallery: not
    # averaged over neighbours)
    new = train_query_head(old, {**head_train, QUERY_MEMBER: oq_train}, q_train, labels, s)
    out["unified"] = {
        "old_query_recall_at_1": recall_at_1(old.encode_query(eoq.query), ql, gv, gl),
        "new_query_recall_at_1": recall_at_1(new.encode_query(eq.query), ql, gv, gl),
        "gallery_reencoded": False,
    }
    # to-query, as deployed with the old query model (its own member, the ensemble fitted on
    # validation); the update: the new query model's gallery heads re-project the stored raw
    # embeddings, fused at weights fitted on validation over them alone (the old query
    # model's member is in the old space)
    old = train_heads("to-query", head_train, oq_train, labels, s, identity=True)
    chosen = _fit_ensemble(old, val_raw, old.encode_query(eoq.val_query), score, view, old.members)
    gv = _gallery(old, {**gallery_raw, QUERY_MEMBER: eoq.gallery}, chosen["ensemble"])
    new = first["to-query"]["heads"]
    fit = _fit_ensemble(new, raw, new.encode_query(eq.val_query), score, view, list(head_train))
    reprojected = _gallery(new, gallery_raw, fit["ensemble"])
    out["to-query"] = {
        "old_query_recall_at_1": recall_at_1(old.encode_query(eoq.query), ql, gv, gl),
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
    counts = np.bincount(gl.numpy())
    dropped = np.ones(n, dtype=bool)  # the images the smallest coverage drops
    dropped[order[: n_kept(n, GALLERY_COVERAGE[-1])]] = False
    hit_dropped = dropped[top.numpy()]
    return {
        "gallery_drop": {
            **_view(GALLERY_COVERAGE, drop, drop_random),
            "images_per_class": float(np.median(counts[counts > 0])),
            # queries whose top hit (full gallery) is dropped: lost answers, removed confusions
            "dropped_right_hits": int((hit_dropped & correct).sum()),
            "dropped_wrong_hits": int((hit_dropped & ~correct).sum()),
        },
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
