"""The method's parts for unseen classes: random views, step budgets, weighted fusion with the
query model's own member, weights fitted on validation, and the recommendation file."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from gallery_builder.evaluation.experiment import ExperimentConfig
from gallery_builder.evaluation.fusion_fit import (
    clearly_better,
    fit_weights,
    recommended,
    value,
    write_recommendation,
)
from gallery_builder.evaluation.metrics import retrieval_metrics
from gallery_builder.evaluation.run import _on_subset, _unnamed
from gallery_builder.training.augment import Augment
from gallery_builder.training.fit import TrainSettings, planned_epochs
from gallery_builder.training.fusion import fuse
from gallery_builder.training.heads import (
    QUERY_MEMBER,
    HeadSet,
    HeadSettings,
    load_heads,
    save_heads,
    train_heads,
)
from query_sdk.errors import DataError


def _images(n=8, side=12, channels=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, side, side, channels), generator=g, dtype=torch.uint8)


def test_views_repeat_with_the_generator_and_differ_between_draws():
    x = _images()
    aug = Augment()
    a = aug(x, torch.Generator().manual_seed(1))
    b = aug(x, torch.Generator().manual_seed(1))
    c = aug(x, torch.Generator().manual_seed(2))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    assert a.shape == x.shape and a.dtype == torch.float32
    assert float(a.min()) >= 0 and float(a.max()) <= 255


def test_identity_views_are_the_images_and_mirroring_is_off_by_default():
    x = _images()
    none = Augment(shift=0, scale=0, rotate=0, color=0)
    assert torch.equal(none(x, torch.Generator()), x.float())
    assert Augment().flip is False
    flip_only = Augment(flip=True, shift=0, scale=0, rotate=0, color=0)
    out = flip_only(x, torch.Generator().manual_seed(0))
    mirrored = [torch.equal(out[i], x[i].flip(1).float()) for i in range(len(x))]
    kept = [torch.equal(out[i], x[i].float()) for i in range(len(x))]
    assert all(m or k for m, k in zip(mirrored, kept, strict=True)) and any(mirrored)


@pytest.mark.parametrize("field", ["shift", "scale", "color"])
def test_augment_bounds_are_checked(field):
    with pytest.raises(ValueError, match=f"augment.{field}"):
        Augment(**{field: 1.5})


def test_step_budget_gives_small_data_more_passes():
    s = TrainSettings(steps=1000, batch_size=100)
    assert planned_epochs(s, 1000) == 100  # 10 batches an epoch
    assert planned_epochs(s, 100_000) == 1
    assert planned_epochs(TrainSettings(epochs=3), 10**6) == 3
    with pytest.raises(ValueError, match="steps"):
        TrainSettings(steps=0)


def test_step_budget_rises_to_steps_per_class_and_min_epochs():
    s = TrainSettings(steps=1000, steps_per_class=5, min_epochs=20, batch_size=256)
    assert s.for_data(40, 10_000).steps == 1000  # few classes and images: the fixed budget
    assert s.for_data(400, 10_000).steps == 2000
    assert s.for_data(401, 10_000).steps == 2005 and s.for_data(401, 0).steps_per_class == 5
    assert s.for_data(40, 24_814).steps == 1939 == math.ceil(20 * 24_814 / 256)  # 20 passes
    assert s.for_data(401, 24_814).steps == 2005 and s.for_data(401, 30_000).steps == 2344
    off = TrainSettings(steps=1000, steps_per_class=0, min_epochs=0)
    assert off.for_data(10**4, 10**7).steps == 1000
    with pytest.raises(ValueError, match="min_epochs must be at least 0, got -1"):
        TrainSettings(min_epochs=-1)


def test_open_set_heads_train_for_steps_so_small_data_get_more_passes():
    heads = ExperimentConfig().heads
    assert heads.epochs is None
    small, large = planned_epochs(heads, 40_000), planned_epochs(heads, 400_000)
    assert small == round(heads.steps / math.ceil(40_000 / heads.batch_size)) > large >= 1


def test_old_query_model_has_half_the_images_and_steps_but_the_full_per_class_floor():
    cfg = ExperimentConfig()
    old, new = cfg.old_query_model.train, cfg.query_model.train
    assert cfg.old_query_model.subset == 0.5 and old.steps == new.steps // 2
    assert old.for_data(40, 5_000).steps == 500 < new.for_data(40, 10_000).steps  # half
    assert old.for_data(240, 5_000).steps == new.for_data(240, 10_000).steps == 1200  # the floor
    # many images: the per-image floor halves with the images
    assert 2 * old.for_data(40, 12_407).steps - new.for_data(40, 24_814).steps in (0, 1)


def test_weighted_fusion_ignores_a_zero_weight_member():
    t = F.normalize(torch.randn(3, 5, 8), dim=-1)
    v, u = fuse(t, torch.tensor([1.0, 1.0, 0.0]))
    v2, u2 = fuse(t[:2])
    assert torch.allclose(v, v2, atol=1e-6) and torch.allclose(u, u2, atol=1e-6)
    v1, u1 = fuse(t, torch.tensor([0.0, 2.0, 0.0]))
    assert torch.allclose(v1, t[1], atol=1e-6) and torch.all(u1 == 0)
    with pytest.raises(ValueError, match="non-negative"):
        fuse(t, torch.tensor([1.0, -1.0, 1.0]))


def _clusters(n_classes=6, per_class=8, dim=16, noise=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(n_classes, dim, generator=g), dim=-1)
    labels = torch.arange(n_classes).repeat_interleave(per_class)
    x = F.normalize(centres[labels] + noise * torch.randn(len(labels), dim, generator=g), dim=-1)
    return x, labels


def test_fitted_weights_keep_a_member_that_is_noise_from_dragging_the_fusion_down():
    x, labels = _clusters(per_class=80, noise=0.5, seed=1)
    gallery, gl, query, ql = x[0::2], labels[0::2], x[1::2], labels[1::2]
    noise = F.normalize(
        torch.randn(gallery.shape, generator=torch.Generator().manual_seed(3)), dim=-1
    )

    def score(g):
        return value(retrieval_metrics(query, ql, g, gl))

    weights, best = fit_weights({"good": gallery, "noise": noise}, query, ql, gl)
    even = score(fuse(torch.stack([gallery, noise]))[0])
    assert even < score(gallery) - 0.05  # equal weights: noise spoils it
    assert weights["noise"] <= weights["good"] / 4
    assert best >= score(gallery)
    fused, _ = fuse(
        torch.stack([gallery, noise]), torch.tensor([weights["good"], weights["noise"]])
    )
    assert score(fused) == pytest.approx(best)


def test_fitted_weights_stay_equal_when_the_validation_lead_is_noise():
    """Two members as good as each other: whichever leads on these queries does so by a
    few of them, and the one-standard-error rule keeps the equal weights."""
    x, labels = _clusters(per_class=40, noise=0.6, seed=4)
    gallery, gl, query, ql = x[0::2], labels[0::2], x[1::2], labels[1::2]
    g = torch.Generator().manual_seed(5)
    members = {
        n: F.normalize(gallery + 0.3 * torch.randn(gallery.shape, generator=g), dim=-1)
        for n in ("a", "b")
    }
    values = {n: value(retrieval_metrics(query, ql, m, gl)) for n, m in members.items()}
    assert values["a"] != values["b"]  # one of them leads
    weights, _ = fit_weights(members, query, ql, gl)
    assert weights["a"] == weights["b"] > 0


def test_clearly_better_is_the_one_standard_error_rule():
    base = torch.zeros(400)
    base[:300] = 1  # 300 of 400 queries right
    mixed = base.clone()
    mixed[300:310] = 1  # 10 more right ...
    mixed[:7] = 0  # ... and 7 fewer: a lead of 3, within one standard error (10.3 queries)
    assert not clearly_better(mixed, base)
    only_gains = base.clone()
    only_gains[300:303] = 1  # 3 more right and none lost: beyond it
    assert clearly_better(only_gains, base)
    assert not clearly_better(base, base)
    assert not clearly_better(base, only_gains)


def test_against_n_restricts_a_fused_ensemble_to_the_subsets_models():
    ensemble = {"weights": {"a": 2.0, "b": 0.0, "c": 1.0, QUERY_MEMBER: 4.0}, "neighbours": None}
    assert _on_subset(ensemble, ["a", "c"])["weights"] == {"a": 2.0, "c": 1.0, QUERY_MEMBER: 4.0}
    assert _on_subset(ensemble, ["b"]) == {
        "weights": {"b": 0.0, QUERY_MEMBER: 4.0},  # the fit left b out: the own member alone
        "neighbours": None,
    }
    only_b = {"weights": {"a": 1.0, "b": 0.0, QUERY_MEMBER: 0.0}, "neighbours": None}
    assert _on_subset(only_b, ["b"])["weights"] == {"b": 1.0}  # nothing left: the plain mean
    # other models (the diversity axes): each counts 1, the own member keeps its weight
    assert _on_subset(_unnamed(ensemble), ["x", "y"]) == {
        "weights": {"x": 1.0, "y": 1.0, QUERY_MEMBER: 4.0},
        "neighbours": None,
    }


def test_against_n_keeps_a_neighbour_ensembles_settings_on_the_subsets_view():
    nb = {"k": 5, "alpha": 30.0, "graph": {"a": 1.0, "b": 1.0}}
    ensemble = {"weights": {"a": 0.0, "b": 0.0, "c": 0.0, QUERY_MEMBER: 1.0}, "neighbours": nb}
    on_ac = _on_subset(ensemble, ["a", "c"])
    assert on_ac["weights"] == {"a": 0.0, "c": 0.0, QUERY_MEMBER: 1.0}
    assert on_ac["neighbours"] == {"k": 5, "alpha": 30.0, "graph": {"a": 1.0}}
    assert _on_subset(ensemble, ["c"])["neighbours"] is None  # c is not in the view
    # other models (the diversity axes): the same k and exponent, every model in the view
    other = _on_subset(_unnamed(ensemble), ["x", "y"])
    assert other["neighbours"] == {"k": 5, "alpha": 30.0, "graph": {"x": 1.0, "y": 1.0}}
    assert other["weights"] == {"x": 0.0, "y": 0.0, QUERY_MEMBER: 1.0}


def test_fitted_weights_put_recall_at_1_first():
    """A class-level member lifts MAP@R and blurs near duplicates: the fit may add it only
    as far as the own member's Recall@1 holds (to within a few of 480 queries)."""
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(8, 16, generator=g)
    labels = torch.arange(8).repeat_interleave(60)
    look = centres[labels] + 1.2 * torch.randn(len(labels), 16, generator=g)  # each image's own
    own = look + 0.3 * torch.randn(len(labels), 16, generator=g)
    query = F.normalize(look + torch.randn(len(labels), 16, generator=g), dim=-1)
    blur = centres[labels] + torch.randn(len(labels), 16, generator=g)

    def fitted(name: str) -> dict[str, float]:
        members = {name: own, "blur": blur}
        weights, _ = fit_weights(members, query, labels, labels)
        vectors = torch.stack([F.normalize(members[n], dim=-1) for n in members])
        fused, _ = fuse(vectors, torch.tensor([weights[n] for n in members]))
        return retrieval_metrics(query, labels, fused, labels)

    alone = retrieval_metrics(query, labels, F.normalize(own, dim=-1), labels)
    vectors = torch.stack([F.normalize(own, dim=-1), F.normalize(blur, dim=-1)])
    even = retrieval_metrics(query, labels, fuse(vectors)[0], labels)
    assert even["map_at_r"] > alone["map_at_r"] and even["recall_at_1"] < alone["recall_at_1"]
    for name in (QUERY_MEMBER, "own"):
        kept = fitted(name)
        assert kept["recall_at_1"] >= alone["recall_at_1"] - 0.01 > even["recall_at_1"]
        assert kept["map_at_r"] > alone["map_at_r"]


def test_the_query_member_is_the_query_embedding_in_to_query_mode(tmp_path):
    raw = {"g": torch.randn(64, 12)}
    q = torch.randn(64, 8)
    labels = torch.arange(64) % 4
    heads = train_heads("to-query", raw, q, labels, HeadSettings(epochs=1), identity=True)
    assert heads.members == ["g", QUERY_MEMBER]
    assert torch.allclose(heads.transform_gallery(QUERY_MEMBER, q), F.normalize(q, dim=-1))
    heads.set_weights({"g": 0.0, QUERY_MEMBER: 1.0})
    vectors, spread = heads.encode_gallery({"g": raw["g"], QUERY_MEMBER: q})
    assert torch.allclose(vectors, F.normalize(q, dim=-1), atol=1e-6)
    assert torch.all(spread == 0)
    save_heads(tmp_path / "h", heads, "qfp", {"g": "gfp"}, HeadSettings(epochs=1), {})
    loaded, config = load_heads(tmp_path / "h")
    assert loaded.identity and loaded.weights == {"g": 0.0, QUERY_MEMBER: 1.0}
    assert {m["name"]: m["fingerprint"] for m in config["gallery_models"]} == {
        "g": "gfp",
        QUERY_MEMBER: "qfp",
    }


def test_weights_must_name_the_members():
    heads = HeadSet("to-query", 8, {"g": 12}, 8, 4, identity=True)
    with pytest.raises(ValueError, match="members"):
        heads.set_weights({"g": 1.0})
    with pytest.raises(ValueError, match="query model's member"):
        HeadSet("to-query", 8, {QUERY_MEMBER: 12}, 8, 4)


def test_recommendation_file_round_trip_and_paths_stay_inside(tmp_path):
    rec = {"mode": "to-query", "members": ["resnet", QUERY_MEMBER], "weights": {}}
    write_recommendation(tmp_path, rec, "query")
    found = recommended(tmp_path)
    assert found["heads"] == tmp_path.resolve() / "heads" / "to-query"
    assert found["gallery_models"] == [
        tmp_path.resolve() / "models" / "resnet",
        tmp_path.resolve() / "models" / "query",
    ]
    doc = json.loads((tmp_path / "recommendation.json").read_text())
    doc["heads"] = "../../etc"
    (tmp_path / "recommendation.json").write_text(json.dumps(doc))
    with pytest.raises(DataError, match="outside the experiment folder"):
        recommended(tmp_path)
