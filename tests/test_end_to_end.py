"""A tiny train -> eval run of the reference experiment on scikit-learn's digits."""

from __future__ import annotations

import copy
import json

import pytest
from PIL import Image

from gallery_builder.evaluation.fusion_fit import value
from gallery_builder.evaluation.metrics import CEILING_PULLS
from gallery_builder.evaluation.report import markdown
from gallery_builder.training.heads import load_heads

SETTING_KEYS = {"recall_at_1", "recall_at_1_std", "recall_at_5", "map_at_r"}
VIEW_KEYS = {"coverage", "score", "score_random", "aurc", "aurc_random"}


@pytest.fixture
def run(digits_run):
    return digits_run


def test_report_follows_the_contract(run):
    cfg, report, out = run
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk["default_mode"] in ("unified", "to-query")
    assert on_disk["dataset"] == "digits" and "gallery" in on_disk["protocol"]
    names = [m.name for m in cfg.gallery_models]
    expected = {"sym:query", *(f"sym:{g}" for g in names), *(f"kd:{g}" for g in names)}
    for mode in ("unified", "to-query"):
        expected |= {f"{mode}:{g}" for g in names} | {f"{mode}:mean", f"{mode}:ensemble"}
        expected |= {f"{mode}:fused", f"{mode}:neighbours"}  # the ensemble's two candidates
    expected.add("unified:query")  # the identity member alone (to-query's is sym:query)
    assert set(on_disk["settings"]) == expected
    for values in on_disk["settings"].values():
        assert SETTING_KEYS <= set(values)
        assert all(0.0 <= values[k] <= 1.0 for k in ("recall_at_1", "recall_at_5", "map_at_r"))
        assert values["recall_at_1"] <= values["recall_at_5"]
    rej = on_disk["rejection"]
    assert VIEW_KEYS <= set(rej["gallery_drop"]) and VIEW_KEYS <= set(rej["gallery_quality"])
    assert VIEW_KEYS | {"score_similarity", "score_best", "aurc_similarity", "aurc_best"} <= set(
        rej["query_time"]
    )
    for view in rej.values():
        assert view["coverage"][0] == 1.0 and view["coverage"] == sorted(view["coverage"])[::-1]
        assert len(view["score"]) == len(view["coverage"]) == len(view["score_random"])
        # nothing is rejected at full coverage: every rule starts at the same score
        assert view["score"][0] == pytest.approx(view["score_random"][0], abs=1e-6)
    assert set(on_disk["update"]) >= {"old_query_recall_at_1", "new_query_recall_at_1"}
    ceiling = on_disk["gallery_ceiling"]
    assert ceiling["mode"] == on_disk["default_mode"]
    for key in ("recall_at_1", "map_at_r"):
        assert 0.0 < ceiling[key] <= 1.0
        assert ceiling[f"{key}_pull"] is None or ceiling[f"{key}_pull"] in CEILING_PULLS
    models = on_disk["models"]
    assert models["query"]["mflops"] < min(models[g]["mflops"] for g in names)
    assert all(m["params"] > 0 for m in models.values())


def test_models_learn_and_the_ensemble_helps(run):
    _, report, _ = run
    s = report["settings"]
    assert s["sym:resnet"]["recall_at_1"] > 0.8  # 10 classes: chance is 0.1
    mode = report["default_mode"]
    singles = [
        v["recall_at_1"]
        for k, v in s.items()
        if k.startswith(f"{mode}:") and not k.endswith("ensemble")
    ]
    assert s[f"{mode}:ensemble"]["recall_at_1"] > sum(singles) / len(singles)
    assert s[f"{mode}:ensemble"]["recall_at_1"] > 0.3


def test_recommendation_is_the_validation_winner_with_its_margins(run):
    _, report, _ = run
    rec, val = report["recommendation"], report["validation"]
    deployable = [
        n
        for n in val
        if (not n.startswith("sym:") or n == "sym:query")
        and not n.endswith((":fused", ":neighbours"))  # the ensemble's candidates
    ]
    ranked = sorted(deployable, key=lambda n: value(val[n]), reverse=True)  # the rule's order
    assert [rec["setting"], rec["runner_up"]] == ranked[:2]
    best, runner = (val[n] for n in ranked[:2])
    assert rec["margin_recall_at_1"] == pytest.approx(best["recall_at_1"] - runner["recall_at_1"])
    assert rec["margin_map_at_r"] == pytest.approx(best["map_at_r"] - runner["map_at_r"])


def test_spread_finds_bad_gallery_images(run):
    _, report, _ = run
    quality = report["rejection"]["gallery_quality"]
    assert quality["aurc"] < quality["aurc_random"]
    assert quality["score"][-1] > quality["score"][0]


def test_update_keeps_the_gallery_and_says_whether_it_pays(run):
    _, report, out = run
    unified = report["update"]["modes"]["unified"]
    assert unified["gallery_reencoded"] is False
    rebuilt = report["settings"]["unified:ensemble"]["recall_at_1"]
    assert unified["rebuilt_recall_at_1"] == rebuilt
    change = 100 * (unified["new_query_recall_at_1"] - unified["old_query_recall_at_1"])
    md = (out / "report.md").read_text()
    models = report["models"]
    members = {*report["recommendation"]["members"], "query"}
    cost = (
        f"only the query model runs again: {models['query']['mflops']:.2f} of "
        f"{sum(models[m]['mflops'] for m in members):.2f} MFLOPs per image"
    )
    if change >= 0:
        assert f"The update gains {change:.2f} points" in md
        assert f"(`cmce-build-gallery refresh`, {cost}) reaches {100 * rebuilt:.2f}." in md
    else:
        assert f"The update loses {-change:.2f} points" in md
        assert f"refresh the gallery for the new one (`cmce-build-gallery refresh`, {cost}: " in md
        assert f"{cost}: {100 * rebuilt:.2f})." in md


@pytest.mark.parametrize("new", [0.2, 0.9])
def test_update_sentence_follows_the_sign(run, new):
    report = copy.deepcopy(run[1])
    report["update"].update(old_query_recall_at_1=0.5, new_query_recall_at_1=new)
    md = markdown(report)
    if new < 0.5:
        assert "The update loses 30.00 points of Recall@1 against the old query model" in md
    else:
        assert "The update gains 40.00 points of Recall@1 without touching the gallery" in md


def test_artifacts_are_written(run):
    _, report, out = run
    for png in ("settings.png", "rejection.png"):
        with Image.open(out / png) as im:
            assert im.format == "PNG" and im.width > 400
    md = (out / "report.md").read_text()
    assert f"**{report['default_mode']}:ensemble**" in md
    assert f"(ceiling {100 * report['gallery_ceiling']['recall_at_1']:.2f}: " in md
    mode, s = report["default_mode"], report["settings"]
    own = "unified:query" if mode == "unified" else "sym:query"  # to-query's own is sym:query
    added = 100 * (s[f"{mode}:ensemble"]["map_at_r"] - s[own]["map_at_r"])
    assert f"(`{own}` → `{mode}:ensemble`): Recall@1 " in md
    assert f"MAP@R {added:+.2f} points" in md
    stages = report["stage_seconds"]  # trained from scratch here, so each stage took time
    assert {"gallery models", "embeddings", "distilled models", "update study"} <= set(stages)
    assert stages["gallery models"] > 0 and stages["distilled models"] > 0
    assert f"| gallery models | {stages['gallery models']:.0f} |" in md
    heads, config = load_heads(out / "heads" / "unified")
    assert config["space_id"].startswith("unified-") and heads.mode == "unified"
    assert (out / "models" / "query" / "weights.safetensors").is_file()


def test_cached_models_are_reused(run, caplog):
    cfg, report, out = run
    from gallery_builder.evaluation.experiment import get_model, load_splits

    splits = load_splits(cfg)
    with caplog.at_level("INFO", logger="gallery_builder.evaluation.experiment"):
        _, config = get_model(cfg.query_model, cfg, splits.train, out / "models", "query")
    assert "reusing" in caplog.text
    assert config["params"] == report["models"]["query"]["params"]


def test_gap_sentence_when_the_ensemble_passes_the_gallery_models_or_trails_distillation(run):
    _, report, _ = run
    report = copy.deepcopy(report)
    s, ens = report["settings"], f"{report['default_mode']}:ensemble"
    best_sym = max(
        (n for n in s if n.startswith("sym:") and n != "sym:query"), key=lambda n: s[n]["map_at_r"]
    )
    s[ens]["map_at_r"] = s[best_sym]["map_at_r"] + 0.0123
    md = markdown(report)
    assert f"`{ens}` {100 * s[ens]['map_at_r']:.2f} — above `{best_sym}` itself (+1.23)" in md
    best_kd = max((n for n in s if n.startswith("kd:")), key=lambda n: s[n]["map_at_r"])
    s[ens]["map_at_r"] = s[best_kd]["map_at_r"] - 0.0456  # below distillation: no share
    md = markdown(report)
    assert f"`{ens}` {100 * s[ens]['map_at_r']:.2f} — below `{best_kd}` (-4.56)" in md


def test_the_recommended_heads_carry_the_chosen_ensemble(run):
    """What the report recommends is what the builder gets: the heads folder of the default
    mode holds the recommended weights and neighbour averaging; the other mode its own fit."""
    _, report, out = run
    rec = report["recommendation"]
    heads, _ = load_heads(out / "heads" / report["default_mode"])
    assert heads.weights == rec["weights"]
    assert heads.neighbours == rec["neighbours"]
    graph = (rec["neighbours"] or {}).get("graph", {})
    assert set(rec["members"]) == {n for n, w in rec["weights"].items() if w > 0} | {
        n for n, w in graph.items() if w > 0
    }
    assert set(heads.inputs) == set(rec["members"])


def test_a_ceiling_below_distillation_is_said_in_words(run):
    """Few images per class: a query model trained alone can sit below what distillation
    reaches even with a perfect gallery; the report says so instead of a negative share."""
    report = copy.deepcopy(run[1])
    best_kd = max(
        (n for n in report["settings"] if n.startswith("kd:")),
        key=lambda n: report["settings"][n]["recall_at_1"],
    )
    report["gallery_ceiling"]["recall_at_1"] = report["settings"][best_kd]["recall_at_1"] - 0.2
    md = markdown(report)
    assert f"below `{best_kd}`: this query model cannot reach distillation" in md
