"""Write an experiment's report: ``report.json`` (the contract), ``report.md`` and PNG plots."""

from __future__ import annotations

import os
from pathlib import Path

from query_sdk.fileio import atomic_path, write_bytes_atomic, write_json_atomic

__all__ = ["write_report", "markdown"]


def write_report(report: dict, out: Path) -> list[Path]:
    """Write report.json, report.md, settings.png and rejection.png into ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "report.json", report)
    files = [
        out / "report.json",
        _plot_settings(report, out / "settings.png"),
        _plot_rejection(report, out / "rejection.png"),
        _plot_against_n(report, out / "against_n.png"),
    ]
    write_bytes_atomic(out / "report.md", markdown(report).encode("utf-8"))
    return [out / "report.md", *files]


def _order(settings: dict) -> list[str]:
    prefix = ["sym:", "kd:", "to-query:", "unified:"]
    return sorted(
        settings,
        key=lambda n: (
            next((i for i, p in enumerate(prefix) if n.startswith(p)), 9),
            n.endswith((":mean", ":fused", ":neighbours", ":ensemble")),
            n.endswith((":fused", ":neighbours", ":ensemble")),
            n.endswith(":ensemble"),
            n,
        ),
    )


def settings_table(report: dict) -> str:
    """The settings as a Markdown table (mean +- std over head seeds)."""
    rows = ["| setting | Recall@1 (%) | Recall@5 (%) | MAP@R (%) |", "|---|---|---|---|"]
    for name in _order(report["settings"]):
        s = report["settings"][name]
        std = f" ± {100 * s['recall_at_1_std']:.2f}" if s["recall_at_1_std"] else ""
        map_std = f" ± {100 * s['map_at_r_std']:.2f}" if s.get("map_at_r_std") else ""
        bold = "**" if name == f"{report['default_mode']}:ensemble" else ""
        rows.append(
            f"| {bold}{name}{bold} | {100 * s['recall_at_1']:.2f}{std} | "
            f"{100 * s['recall_at_5']:.2f} | {100 * s['map_at_r']:.2f}{map_std} |"
        )
    return "\n".join(rows)


def markdown(report: dict) -> str:
    rej, upd = report["rejection"], report["update"]
    qt = rej["query_time"]
    at90 = qt["coverage"].index(0.9)
    err_full, err90 = 1 - qt["score_best"][0], 1 - qt["score_best"][at90]
    models = "\n".join(
        f"| {n} | {m['role']} | {m['architecture']} | {m['embedding_dim']} | {m['params']:,} | "
        f"{m['mflops']:.2f} |"
        for n, m in report["models"].items()
    )
    upd_rows = "\n".join(
        f"| {mode} | {100 * u['old_query_recall_at_1']:.2f} | "
        f"{100 * u['new_query_recall_at_1']:.2f} | {100 * u['rebuilt_recall_at_1']:.2f} |"
        for mode, u in upd["modes"].items()
    )
    views = {
        "gallery_drop": "queries' Recall@1 as uncertain gallery images are dropped",
        "gallery_quality": "leave-one-out gallery neighbour agrees",
        "query_time": "top hit kept",
    }
    rej_rows = "\n".join(
        f"| {v} ({what}) | {rej[v]['aurc']:.4f} | {rej[v]['aurc_random']:.4f} | "
        + (
            f"similarity {qt['aurc_similarity']:.4f}, combined {qt['aurc_combined']:.4f}"
            if v == "query_time"
            else ""
        )
        + " |"
        for v, what in views.items()
    )
    fewer = 100 * (1 - err90 / err_full) if err_full else 0.0
    stages = report.get("stage_seconds", {})
    time_rows = "\n".join(f"| {name} | {sec:.0f} |" for name, sec in stages.items())
    return f"""# cmce report: {report["dataset"]}

Protocol: {report["protocol"]}. Exact search, cosine similarity. Settings with heads are the
mean ± std over {len(report["head_seeds"])} head-training seeds; other settings are one model.
Default mode (the better ensemble): **{report["default_mode"]}**.

## Retrieval

{settings_table(report)}

`sym:X`: model X on both sides. `kd:G`: a query model distilled from G (the query model's
architecture, training budget and augmentation), searched against G's index. `MODE:G`: gallery
model G through its head. `unified:query`: the query model on both sides through the query
head (the ensemble's identity member alone). `MODE:mean`: the plain mean of the N heads (the
paper's fusion). `MODE:fused`: the N heads and the query model's own embedding of the
gallery image, fused with weights fitted on the validation split. `MODE:neighbours`: the query
model's own embedding of each gallery image averaged with its nearest gallery neighbours as the
gallery models see them (the mean of their cosine similarities; which models, how many
neighbours and how steeply they are weighted fitted on the validation split).
`MODE:ensemble`: whichever of `fused` and `neighbours` wins on the validation split (per head
seed).

{_gap_sentence(report)}

![settings](settings.png)

## Accuracy against the number of gallery models

{_against_n_tables(report)}

![against N](against_n.png)

## Models

| model | role | architecture | dim | parameters | MFLOPs / image |
|---|---|---|---|---|---|
{models}

## Rejection by ensemble spread ({report["default_mode"]} mode)

Uncertainty of a gallery image = mean pairwise cosine distance of its N transformed embeddings.
AURC = mean error over the coverage range (lower is better).

| view | AURC spread | AURC random | other rules |
|---|---|---|---|
{rej_rows}

Best query-time rule: **{qt["best_rule"]}**: error {100 * err_full:.2f}% at full coverage,
{100 * err90:.2f}% at 90% coverage ({fewer:.1f}% fewer errors).

{_gallery_drop_sentence(report)}

![rejection](rejection.png)

## Compatible query-model update

A new query model (more data, longer training) against a gallery encoded once for the old one;
no gallery model is run again (`unified`: the gallery fuses the old query model's own member
with weights fitted on the validation classes, and a new query head learns to land on those
stored vectors; `to-query`: new gallery heads re-project the stored raw gallery embeddings,
without the old query model's own member, which lives in the old space). The old query model
is deployed as the default deploys it: its own member fused and the ensemble fitted on the
validation classes.
Refreshing instead re-encodes only the query model's own member with the new query model and
fuses it with the stored gallery-model embeddings through heads trained for it
(`cmce-build-gallery refresh`): what a rebuild reaches, without running a gallery model.

| mode | old query Recall@1 (%) | new query Recall@1 (%) | gallery refreshed for the new one (%) |
|---|---|---|---|
{upd_rows}

{_update_sentence(report)}

## Recommendation

{_recommendation(report)}

## Where the time went

Wall-clock seconds per stage (models found in the cache take next to none).

| stage | seconds |
|---|---|
{time_rows}
"""


def _update_sentence(report: dict) -> str:
    """Whether the default mode's update is worth deploying, against keeping the old query
    model or refreshing the gallery (only the query model runs again)."""
    update = report["update"]
    old, new, refreshed = (
        100 * update[f"{k}_recall_at_1"] for k in ("old_query", "new_query", "rebuilt")
    )
    refresh = f"`cmce-build-gallery refresh`, {_refresh_cost(report)}"
    if new >= old:
        return (
            f"The update gains {new - old:.2f} points of Recall@1 without touching the gallery "
            f"(`{update['mode']}`); refreshing the gallery for the new query model ({refresh}) "
            f"reaches {refreshed:.2f}."
        )
    return (
        f"The update loses {old - new:.2f} points of Recall@1 against the old query model "
        f"(`{update['mode']}`): keep the old query model, or refresh the gallery for the new one "
        f"({refresh}: {refreshed:.2f})."
    )


def _refresh_cost(report: dict) -> str:
    """What a refresh runs against a full rebuild: the query model's share of the ensemble's
    multiply-adds per image."""
    models = report["models"]
    members = [m for m in report["recommendation"]["members"] if m in models]
    total = sum(models[m]["mflops"] for m in {*members, "query"})
    query = models["query"]["mflops"]
    return f"only the query model runs again: {query:.2f} of {total:.2f} MFLOPs per image"


def _pct(x: float) -> str:
    return f"{100 * x:.2f}"


def _gap_sentence(report: dict) -> str:
    """How much of the gap between the best ``kd:G`` and the best ``sym:G`` the ensemble closes."""
    s = report["settings"]
    ens = f"{report['default_mode']}:ensemble"
    sym = [n for n in s if n.startswith("sym:") and n != "sym:query"]
    kd = [n for n in s if n.startswith("kd:")]
    if not sym or not kd or ens not in s:
        return ""
    ceiling = report.get("gallery_ceiling")
    parts = []
    for key, label in (("recall_at_1", "Recall@1"), ("map_at_r", "MAP@R")):
        best_sym = max(sym, key=lambda n: s[n][key])
        best_kd = max(kd, key=lambda n: s[n][key])
        gap = s[best_sym][key] - s[best_kd][key]
        text = (
            f"{label}: best `kd` {best_kd} {_pct(s[best_kd][key])}, best `sym` {best_sym} "
            f"{_pct(s[best_sym][key])}, `{ens}` {_pct(s[ens][key])} — "
        )
        if gap <= 0:
            parts.append(text + "no gap to close")
            continue
        closed = (s[ens][key] - s[best_kd][key]) / gap
        if closed < 0:
            text += f"below `{best_kd}` ({100 * (s[ens][key] - s[best_kd][key]):+.2f})"
        elif closed <= 1:
            text += f"it closes {100 * closed:.0f}% of the gap"
        else:
            text += f"above `{best_sym}` itself (+{100 * (s[ens][key] - s[best_sym][key]):.2f})"
        if ceiling:
            share = (ceiling[key] - s[best_kd][key]) / gap
            reach = (
                f"below `{best_kd}`: this query model cannot reach distillation"
                if share < 0
                else f"{100 * share:.0f}%"
                if share <= 1
                else f"above `{best_sym}`"
            )
            text += f" (ceiling {_pct(ceiling[key])}: {reach})"
        parts.append(text)
    out = "Gap between distillation and the gallery models themselves: " + "; ".join(parts) + "."
    # the identity member alone: through the query head, or as it is in to-query mode
    own = "unified:query" if report["default_mode"] == "unified" else "sym:query"
    if own in s:
        added = ", ".join(
            f"{label} {100 * (s[ens][k] - s[own][k]):+.2f}"
            for k, label in (("recall_at_1", "Recall@1"), ("map_at_r", "MAP@R"))
        )
        out += (
            f"\n\nWhat the gallery models add to the query model's own member (`{own}` → "
            f"`{ens}`): {added} points."
        )
    if ceiling:
        out += (
            "\n\nCeiling: what a gallery side that knew every gallery image's class would reach "
            f"with this query side ({ceiling['mode']} mode): each gallery vector moved towards "
            "its class's mean, the best over how far. A bound read off the search classes' "
            "labels, not a setting: about the most a better gallery side can add to this query "
            "model."
        )
    return out


def _against_n_tables(report: dict) -> str:
    rows = []
    for mode, curve in report.get("against_n", {}).items():
        for r in curve["rows"]:
            rows.append(
                f"| {mode} (line-up) | {r['n']} | {r['subsets']} | {_pct(r['mean_recall_at_1'])} | "
                f"{_pct(r['ensemble_recall_at_1'])} | {_pct(r['mean_map_at_r'])} | "
                f"{_pct(r['ensemble_map_at_r'])} |"
            )
    div = report.get("diversity", {})
    for axis, curve in div.get("axes", {}).items():
        for r in curve["rows"]:
            rows.append(
                f"| {div['mode']}, {axis} ({', '.join(curve['models'])}) | {r['n']} | "
                f"{r['subsets']} | {_pct(r['mean_recall_at_1'])} | "
                f"{_pct(r['ensemble_recall_at_1'])} | {_pct(r['mean_map_at_r'])} | "
                f"{_pct(r['ensemble_map_at_r'])} |"
            )
    return (
        "Mean over every subset of N gallery models, on the search classes. `mean`: the plain "
        "mean of their heads; `ensemble`: `MODE:ensemble` (fitted on validation with all the "
        "gallery models) on these N: its fused weights, or the own member averaged over the "
        "neighbours those of them in its view see, with the same neighbour count and exponent "
        "(not fitted again per subset: on a few thousand validation queries that choice is "
        "noisier than what one more model adds). Diversity axes: the same architecture with other "
        "seeds, with other data subsets, and other architectures (their heads train on the "
        "training images without extra views, one seed).\n\n"
        "| models | N | subsets | Recall@1 mean | Recall@1 ensemble | MAP@R mean | "
        "MAP@R ensemble |\n|---|---|---|---|---|---|---|\n" + "\n".join(rows)
    )


def _gallery_drop_sentence(report: dict) -> str:
    drop = report["rejection"]["gallery_drop"]
    change = drop["score"][-1] - drop["score"][0]
    cov = drop["coverage"][-1]
    verdict = "lifts" if change > 0 else "lowers"
    why = (
        f"the dropped images were the top hit of {drop['dropped_right_hits']} queries they "
        f"answered rightly and of {drop['dropped_wrong_hits']} they answered wrongly"
    ) + ("" if change > 0 else "; reject at query time instead")
    count = f" (median {drop['images_per_class']:g} gallery images per class)"
    return (
        f"`gallery_drop`: keeping {100 * cov:.0f}% of the gallery {verdict} the queries' "
        f"Recall@1 from {_pct(drop['score'][0])} to {_pct(drop['score'][-1])}{count}: {why}."
    )


def _recommendation(report: dict) -> str:
    rec = report.get("recommendation")
    if not rec:
        return ""
    v = rec["validation"]
    weights = ", ".join(f"{n} {w:g}" for n, w in rec["weights"].items())
    best, runner = rec["setting"], rec["runner_up"]
    averaged = ""
    if nb := rec.get("neighbours"):
        graph = ", ".join(f"{n} {w:g}" for n, w in nb["graph"].items())
        averaged = (
            f", each gallery vector averaged with its {nb['k']} nearest gallery neighbours "
            f"(similarity to the power {nb['alpha']:g}) as the gallery models see them "
            f"({graph})"
        )
    deploy = (
        f"Build the gallery in **{rec['mode']}** mode with members {', '.join(rec['members'])} "
        f"(fusion weights {weights}{averaged}); `cmce-build-gallery build --experiment DIR` "
        "and `cmce-export --experiment DIR` use this choice by default."
    )
    if not best.startswith(("unified:", "to-query:")):
        deploy = (
            f"On validation **{best}** beats every head setting; if you still deploy heads, the "
            f"best is {rec['heads_setting']}. " + deploy
        )
    return (
        f"Chosen on the validation split ({report.get('split', {}).get('validation', 'held out')}"
        "), never on the search classes (Recall@1 + 0.01 MAP@R: Recall@1 first, MAP@R "
        "deciding between settings a few queries apart): "
        f"**{best}** with "
        "validation Recall@1 "
        f"{_pct(v[best]['recall_at_1'])} and MAP@R {_pct(v[best]['map_at_r'])}, "
        f"{100 * rec['margin_recall_at_1']:+.2f} Recall@1 and "
        f"{100 * rec['margin_map_at_r']:+.2f} MAP@R points over the runner-up {runner} "
        f"(query model alone: {_pct(v['sym:query']['recall_at_1'])} / "
        f"{_pct(v['sym:query']['map_at_r'])}). On the search classes it "
        f"ranks #{rec['search_rank_recall_at_1']} by Recall@1 and "
        f"#{rec['search_rank_map_at_r']} by MAP@R of the {rec['deployable']} deployable "
        "settings.\n\n" + deploy
    )


def _plot_against_n(report: dict, path: Path) -> Path:
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    curves = {f"{m} (line-up)": c for m, c in report.get("against_n", {}).items()}
    curves.update({a: c for a, c in report.get("diversity", {}).get("axes", {}).items()})
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    for ax, key, title in ((axes[0], "recall_at_1", "Recall@1"), (axes[1], "map_at_r", "MAP@R")):
        for label, c in curves.items():
            n = [r["n"] for r in c["rows"]]
            ax.plot(n, [100 * r[f"ensemble_{key}"] for r in c["rows"]], marker="o", label=label)
            ax.plot(
                n,
                [100 * r[f"mean_{key}"] for r in c["rows"]],
                marker=".",
                linestyle="--",
                label=f"{label}, plain mean",
            )
        sq = report["settings"]["sym:query"][key]
        ax.axhline(100 * sq, color="#8c8c8c", linestyle=":", label="sym:query")
        if ceiling := report.get("gallery_ceiling"):
            ax.axhline(
                100 * ceiling[key], color="#2ca02c", linestyle="-.", label="ceiling (labels known)"
            )
        ax.set_xlabel("gallery models N")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(f"{title} (%)")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7)
    fig.suptitle(f"{report['dataset']}: accuracy against N")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return path


def _pyplot():
    os.environ.setdefault("MPLBACKEND", "Agg")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _plot_settings(report: dict, path: Path) -> Path:
    plt = _pyplot()
    names = _order(report["settings"])
    s = report["settings"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 0.35 * len(names) + 1.5), sharey=True)
    for ax, key, title in ((axes[0], "recall_at_1", "Recall@1"), (axes[1], "map_at_r", "MAP@R")):
        values = [100 * s[n][key] for n in names]
        errors = [100 * s[n].get(f"{key}_std", 0.0) for n in names]
        colors = [
            "#c44e52"
            if n.endswith("ensemble")
            else "#4c72b0"
            if n.startswith(("unified", "to-query"))
            else "#8c8c8c"
            for n in names
        ]
        ax.barh(names, values, xerr=errors, color=colors)
        ax.set_xlim(min(values) * 0.9, max(values) * 1.02)
        ax.set_xlabel(f"{title} (%)")
        ax.invert_yaxis()
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle(f"{report['dataset']}: asymmetric retrieval by setting")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return path


def _plot_rejection(report: dict, path: Path) -> Path:
    plt = _pyplot()
    rej = report["rejection"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    panels = [
        ("gallery_drop", "queries' Recall@1", {"score": "spread", "score_random": "random"}),
        ("gallery_quality", "neighbour agreement", {"score": "spread", "score_random": "random"}),
        (
            "query_time",
            "accuracy of kept queries",
            {
                "score": "spread",
                "score_similarity": "similarity",
                "score_combined": "combined",
                "score_random": "random",
            },
        ),
    ]
    for ax, (view, ylabel, curves) in zip(axes, panels, strict=True):
        for key, label in curves.items():
            ax.plot(
                rej[view]["coverage"],
                [100 * v for v in rej[view][key]],
                marker=".",
                label=label,
                linestyle="--" if label == "random" else "-",
            )
        ax.set_title(view)
        ax.set_xlabel("coverage (kept fraction)")
        ax.set_ylabel(f"{ylabel} (%)")
        ax.invert_xaxis()
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return path
