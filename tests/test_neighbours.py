"""Neighbour averaging: gallery vectors averaged over the neighbours the gallery models see
(``neighbour_average``, ``graph_space``), held by ``HeadSet`` and fitted on validation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gallery_builder.evaluation.fusion_fit import (
    MAP_WEIGHT,
    NEIGHBOUR_ALPHAS,
    NEIGHBOUR_KS,
    ValidationView,
    choose,
    fit_neighbours,
    graph_candidates,
    value,
)
from gallery_builder.evaluation.metrics import retrieval_metrics
from gallery_builder.training.fusion import graph_space, neighbour_average
from gallery_builder.training.heads import (
    QUERY_MEMBER,
    HeadSet,
    HeadSettings,
    load_heads,
    save_heads,
)

DIMS = {"g24": 24, "g40": 40}
QUERY_DIM = 16
QUERY_FP = "q0123456789abcde"
GALLERY_FPS = {"g24": "g24fingerprint00", "g40": "g40fingerprint00"}


def test_each_vector_gains_its_neighbours_weighted_by_similarity():
    v = torch.eye(3)
    graph = F.normalize(torch.tensor([[1.0, 0.0], [0.6, 0.8], [-1.0, 0.0]]), dim=-1)
    out = neighbour_average(v, graph, k=1, alpha=2.0)
    # item 0's nearest other item is 1 (cosine 0.6): v0 + 0.36 v1
    torch.testing.assert_close(out[0], F.normalize(torch.tensor([1.0, 0.36, 0.0]), dim=0))
    torch.testing.assert_close(out[1], F.normalize(torch.tensor([0.36, 1.0, 0.0]), dim=0))
    # item 2's nearest is item 1 at cosine -0.6: a negative similarity adds nothing
    torch.testing.assert_close(out[2], torch.tensor([0.0, 0.0, 1.0]))


def test_no_neighbours_or_one_item_leaves_vectors_normalised():
    v = torch.tensor([[3.0, 4.0], [1.0, 0.0]])
    torch.testing.assert_close(neighbour_average(v, v, 0, 1.0), F.normalize(v, dim=-1))
    torch.testing.assert_close(neighbour_average(v[:1], v[:1], 5, 1.0), F.normalize(v[:1], dim=-1))


def test_the_item_itself_counts_once_even_among_duplicates():
    """Three identical graph rows: each item takes the other two, never itself again."""
    v = torch.eye(3)
    graph = F.normalize(torch.ones(3, 2), dim=-1)
    out = neighbour_average(v, graph, k=2, alpha=1.0)
    torch.testing.assert_close(out, F.normalize(torch.ones(3, 3), dim=-1))


def test_blocks_give_the_exact_answer():
    gen = torch.Generator().manual_seed(0)
    v, graph = torch.randn(300, 6, generator=gen), F.normalize(torch.randn(300, 5, generator=gen))
    sims = graph @ graph.T
    sims.fill_diagonal_(-float("inf"))
    top, idx = sims.topk(4, dim=1)
    want = F.normalize(v + (top.clamp(min=0)[..., None] ** 3 * v[idx]).sum(1), dim=-1)
    torch.testing.assert_close(neighbour_average(v, graph, 4, 3.0), want)


def test_graph_space_inner_product_is_the_weighted_mean_cosine():
    gen = torch.Generator().manual_seed(1)
    raw = {"a": torch.randn(5, 4, generator=gen), "b": torch.randn(5, 7, generator=gen)}
    space = graph_space(raw, {"a": 1.0, "b": 3.0, "c": 0.0})
    cos = {n: F.normalize(x, dim=-1) @ F.normalize(x, dim=-1).T for n, x in raw.items()}
    torch.testing.assert_close(space @ space.T, (cos["a"] + 3 * cos["b"]) / 4)


def _classes(n_classes=12, per_class=10, noise=1.2, seed=0):
    """Own vectors far from their class centres, and a gallery-model view that sees classes."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(n_classes).repeat_interleave(per_class)
    centres = F.normalize(torch.randn(n_classes, 16, generator=gen), dim=-1)
    own = F.normalize(centres[labels] + noise * torch.randn(len(labels), 16, generator=gen) / 4)
    view = F.normalize(torch.randn(n_classes, 8, generator=gen), dim=-1)[labels]
    seen = F.normalize(view + 0.1 * torch.randn(len(labels), 8, generator=gen), dim=-1)
    queries = F.normalize(centres[labels] + noise * torch.randn(len(labels), 16, generator=gen) / 4)
    return own, {"g": seen}, queries, labels


def test_fit_averages_when_the_gallery_models_see_the_classes():
    own, raw, queries, labels = _classes()
    alone = retrieval_metrics(queries, labels, own, labels)
    found, m = fit_neighbours(own, ValidationView(raw), ["g"], queries, labels, labels)
    assert found is not None and found["graph"] == {"g": 1.0} and found["k"] >= 1
    assert m["recall_at_1"] >= alone["recall_at_1"]
    assert m["map_at_r"] > alone["map_at_r"] + 0.05
    averaged = neighbour_average(own, graph_space(raw, {"g": 1.0}), found["k"], found["alpha"])
    assert retrieval_metrics(queries, labels, averaged, labels) == m


def test_fit_finds_the_neighbours_without_a_member_that_sees_nothing():
    own, raw, queries, labels = _classes()
    blind = torch.randn(len(labels), 32, generator=torch.Generator().manual_seed(5))
    view = ValidationView({**raw, "blind": blind})
    found, _ = fit_neighbours(own, view, ["g", "blind"], queries, labels, labels)
    assert found["graph"] == {"g": 1.0}


def test_the_view_finds_each_graphs_neighbours_once_and_remembers_each_averaging():
    own, raw, queries, labels = _classes()
    view = ValidationView(raw)
    first = fit_neighbours(own, view, ["g"], queries, labels, labels)
    cached = dict(view._metrics)
    assert len(view._neighbours) == 1
    assert len(cached) == len(NEIGHBOUR_KS) * len(NEIGHBOUR_ALPHAS)
    assert fit_neighbours(own.clone(), view, ["g"], queries, labels, labels)[0] == first[0]
    assert view._metrics == cached  # nothing evaluated again for equal vectors
    fit_neighbours(own.flip(0), view, ["g"], queries, labels, labels)
    assert len(view._metrics) == 2 * len(cached)


def test_graph_candidates_are_all_models_and_each_leave_one_out():
    assert graph_candidates(["a"]) == [("a",)]
    assert graph_candidates(["a", "b", "c"]) == [
        ("a", "b", "c"),
        ("b", "c"),
        ("a", "c"),
        ("a", "b"),
    ]


def test_choose_puts_recall_at_1_first_and_lets_map_at_r_decide_near_ties():
    metrics = {
        "a": {"recall_at_1": 0.7, "map_at_r": 0.9},
        "b": {"recall_at_1": 0.8, "map_at_r": 0.5},
        "c": {"recall_at_1": 0.8, "map_at_r": 0.6},
    }
    assert choose(metrics) == "c"  # 0.1 Recall@1 outweighs 0.4 MAP@R
    metrics["d"] = dict(metrics["c"])
    assert choose(metrics) == "c"  # equal: the first listed
    # a lead of 0.0004 Recall@1 (2 of 5,000 queries) does not outweigh 0.09 MAP@R
    metrics["e"] = {"recall_at_1": 0.8004, "map_at_r": 0.51}
    metrics["f"] = {"recall_at_1": 0.8000, "map_at_r": 0.60 + 0.09}
    assert choose(metrics) == "f"
    assert value(metrics["f"]) == pytest.approx(0.8 + MAP_WEIGHT * 0.69)


# ------------------------------------------------------------------------------- HeadSet
def _heads() -> HeadSet:
    torch.manual_seed(0)
    return HeadSet("unified", QUERY_DIM, DIMS, QUERY_DIM, 4, layers=0, identity=True).eval()


def _raw(n=40, seed=2):
    gen = torch.Generator().manual_seed(seed)
    out = {name: torch.randn(n, d, generator=gen) for name, d in DIMS.items()}
    return {**out, QUERY_MEMBER: torch.randn(n, QUERY_DIM, generator=gen)}


def test_gallery_vectors_average_the_fused_vectors_over_the_graph():
    heads = _heads()
    raw = _raw()
    own = {n: float(n == QUERY_MEMBER) for n in heads.members}
    heads.set_weights(own)
    nb = {"k": 3, "alpha": 3.0, "graph": {"g24": 1.0, "g40": 0.5}}
    heads.set_neighbours(nb)
    assert heads.inputs == ["g24", "g40", QUERY_MEMBER]
    vectors, unc = heads.gallery_vectors(raw)
    base = heads.encode_gallery(raw)[0]
    torch.testing.assert_close(
        vectors, neighbour_average(base, graph_space(raw, nb["graph"]), 3, 3.0)
    )
    # the spread of the members that shape the vectors: not 0 although one member is fused
    shaping = {"g24": 1.0, "g40": 0.5, QUERY_MEMBER: 1.0}
    torch.testing.assert_close(unc, heads.encode_gallery(raw, list(shaping), shaping)[1])
    assert bool((unc > 0).all())


def test_neighbours_survive_a_save_and_load(tmp_path):
    heads = _heads()
    heads.set_neighbours({"k": 2, "alpha": 10, "graph": {"g24": 1}})
    config = save_heads(tmp_path / "h", heads, QUERY_FP, GALLERY_FPS, HeadSettings(), {})
    assert config["identity"]["neighbours"] == {"k": 2, "alpha": 10.0, "graph": {"g24": 1.0}}
    loaded, _ = load_heads(tmp_path / "h")
    raw = _raw()
    for got, want in zip(loaded.gallery_vectors(raw), heads.gallery_vectors(raw), strict=True):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize(
    ("neighbours", "message"),
    [
        ({"k": 0, "alpha": 1, "graph": {"g24": 1}}, "k must be >= 1"),
        ({"k": 2, "alpha": -1, "graph": {"g24": 1}}, "alpha >= 0"),
        ({"k": 2, "alpha": 1, "graph": {"resnet": 1}}, "graph weights over"),
        ({"k": 2, "alpha": 1, "graph": {QUERY_MEMBER: 1}}, "graph weights over"),
        ({"k": 2, "alpha": 1, "graph": {"g24": 0}}, "positive sum"),
        ({"k": 2, "graph": {"g24": 1}}, "need k, alpha and graph"),
    ],
)
def test_bad_neighbours_are_refused(neighbours, message):
    with pytest.raises(ValueError, match=message):
        _heads().set_neighbours(neighbours)
