"""Tests for gallery_builder.evaluation.metrics: exact search, Recall@K and MAP@R."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from gallery_builder.evaluation.metrics import (
    gallery_ceiling,
    per_query_metrics,
    recall_at_1,
    retrieval_metrics,
    search,
)


def unit(degrees: float) -> list[float]:
    r = math.radians(degrees)
    return [math.cos(r), math.sin(r)]


# Gallery: five 2-D unit vectors.      index  angle  label
GALLERY = torch.tensor([unit(a) for a in (0, 30, 90, 150, 270)])  # 0/1: 0, 2/3: 1, 4: 2
GALLERY_LABELS = torch.tensor([0, 0, 1, 1, 2])
# Queries:                            angle  label
QUERY = torch.tensor([unit(a) for a in (10, 80, 200)])
QUERY_LABELS = torch.tensor([0, 0, 2])
# Cosines (cos of the angle between them) and resulting rankings:
# q0 @ 10 deg: g0 .985, g1 .940, g2 .174, g4 -.174, g3 -.766 -> order 0 1 2 4 3, labels 0 0 1 2 1
# q1 @ 80 deg: g2 .985, g1 .643, g3 .342, g0 .174, g4 -.985 -> order 2 1 3 0 4, labels 1 0 1 0 2
# q2 @200 deg: g3 .643, g4 .342, g2 -.342, g0 -.940, g1 -.985 -> order 3 4 2 0 1, labels 1 2 1 0 0
EXPECTED_ORDER = [[0, 1, 2, 4, 3], [2, 1, 3, 0, 4], [3, 4, 2, 0, 1]]
# Recall@1: q0 hit, q1 miss, q2 miss                                  -> 1/3
# Recall@5: every query has a relevant item in its top 5               -> 1
# MAP@R: q0 R=2, relevant at ranks 1 and 2: (1/1 + 2/2) / 2 = 1
#        q1 R=2, top 2 = [1, 0]: relevant at rank 2 only: (1/2) / 2 = 0.25
#        q2 R=1, top 1 = [1]: not relevant: 0                 -> (1 + 0.25 + 0) / 3 = 0.41667


def test_search_returns_top_k_in_order():
    scores, idx = search(QUERY, GALLERY, 3)
    assert idx.tolist() == [row[:3] for row in EXPECTED_ORDER]
    assert scores.shape == (3, 3)
    expected_q1 = [math.cos(math.radians(d)) for d in (10, 50, 70)]
    assert scores[1].tolist() == pytest.approx(expected_q1, abs=1e-6)
    assert (scores[:, :-1] >= scores[:, 1:]).all()


def test_search_clamps_k_and_chunks_agree():
    scores, idx = search(QUERY, GALLERY, 50)
    assert idx.tolist() == EXPECTED_ORDER
    scores2, idx2 = search(QUERY, GALLERY, 50, chunk=2)
    assert torch.equal(idx, idx2)
    assert torch.allclose(scores, scores2)


def test_retrieval_metrics_hand_case():
    m = retrieval_metrics(QUERY, QUERY_LABELS, GALLERY, GALLERY_LABELS)
    assert m["recall_at_1"] == pytest.approx(1 / 3)
    assert m["recall_at_5"] == pytest.approx(1.0)
    assert m["map_at_r"] == pytest.approx(1.25 / 3)


def test_per_query_metrics_hand_case():
    m = per_query_metrics(lambda a, b: QUERY[a:b] @ GALLERY.T, 3, QUERY_LABELS, GALLERY_LABELS, 2)
    assert m["recall_at_1"].tolist() == [1, 0, 0]
    assert m["recall_at_5"].tolist() == [1, 1, 1]
    assert m["map_at_r"].tolist() == pytest.approx([1, 0.25, 0])


def test_retrieval_metrics_do_not_depend_on_chunk():
    a = retrieval_metrics(QUERY, QUERY_LABELS, GALLERY, GALLERY_LABELS, chunk=1)
    b = retrieval_metrics(QUERY, QUERY_LABELS, GALLERY, GALLERY_LABELS)
    assert a == pytest.approx(b)


def test_recall_at_5_misses_a_match_at_rank_6():
    # gallery: five label-1 items at 0..40 degrees, one label-0 item at 180 degrees.
    gallery = torch.tensor([unit(a) for a in (0, 10, 20, 30, 40, 180)])
    gallery_labels = torch.tensor([1, 1, 1, 1, 1, 0])
    query = torch.tensor([unit(5), unit(5)])
    # query 0 (label 0): its only match is at rank 6 -> R@1 0, R@5 0, AP 0
    # query 1 (label 1): R = 5 and the top 5 are all label 1 -> R@1 1, R@5 1, AP 1
    m = retrieval_metrics(query, torch.tensor([0, 1]), gallery, gallery_labels)
    assert m == pytest.approx({"recall_at_1": 0.5, "recall_at_5": 0.5, "map_at_r": 0.5})


def test_map_at_r_counts_only_the_top_r():
    # One query (label 0) at 0 degrees; R = 2 matches at ranks 1 and 3 (rank 3 is beyond R).
    gallery = torch.tensor([unit(a) for a in (0, 20, 40, 60)])
    gallery_labels = torch.tensor([0, 1, 0, 1])
    m = retrieval_metrics(torch.tensor([unit(0)]), torch.tensor([0]), gallery, gallery_labels)
    # AP@R = (precision@1 * 1 + precision@2 * 0) / R = (1 + 0) / 2 = 0.5
    assert m["map_at_r"] == pytest.approx(0.5)
    assert m["recall_at_1"] == 1.0 and m["recall_at_5"] == 1.0


def test_recall_at_1_function_matches_hand_case():
    assert recall_at_1(QUERY, QUERY_LABELS, GALLERY, GALLERY_LABELS) == pytest.approx(1 / 3)


@pytest.mark.parametrize("seed", [0, 1])
def test_against_pytorch_metric_learning(seed):
    from pytorch_metric_learning.distances import CosineSimilarity
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
    from pytorch_metric_learning.utils.inference import CustomKNN

    gen = torch.Generator().manual_seed(seed)
    classes, dim = 5, 6
    centres = torch.randn(classes, dim, generator=gen)
    gallery_labels = torch.cat(
        [torch.arange(classes), torch.randint(0, classes, (85,), generator=gen)]
    )
    query_labels = torch.randint(0, classes, (60,), generator=gen)
    gallery = F.normalize(
        centres[gallery_labels] + 1.2 * torch.randn(90, dim, generator=gen), dim=-1
    )
    query = F.normalize(centres[query_labels] + 1.2 * torch.randn(60, dim, generator=gen), dim=-1)

    ours = retrieval_metrics(query, query_labels, gallery, gallery_labels)
    calc = AccuracyCalculator(
        include=("precision_at_1", "mean_average_precision_at_r"),
        knn_func=CustomKNN(CosineSimilarity()),
        device=torch.device("cpu"),
    )
    theirs = calc.get_accuracy(
        query, query_labels, gallery, gallery_labels, ref_includes_query=False
    )
    # a non-trivial case: neither perfect nor hopeless
    assert 0.2 < ours["recall_at_1"] < 0.95
    assert ours["recall_at_1"] == pytest.approx(theirs["precision_at_1"], abs=1e-9)
    assert ours["map_at_r"] == pytest.approx(theirs["mean_average_precision_at_r"], abs=1e-5)


def test_gallery_ceiling_moves_the_gallery_towards_its_class_means():
    raw = retrieval_metrics(QUERY, QUERY_LABELS, GALLERY, GALLERY_LABELS)
    ceiling = gallery_ceiling(QUERY, QUERY_LABELS, GALLERY, GALLERY_LABELS)
    # q2 (200 deg) is nearest to g3 (150 deg, class 1); pulled towards class 1's mean (120 deg),
    # g3 falls behind g4 (270 deg, class 2): a hit. q1 (80 deg) stays nearer class 1 (120 deg)
    # than class 0 (15 deg) however far the gallery moves.
    assert raw["recall_at_1"] == pytest.approx(1 / 3)
    assert ceiling["recall_at_1"] == pytest.approx(2 / 3)
    assert ceiling["recall_at_1_pull"] != 0.0
    assert ceiling["map_at_r"] >= raw["map_at_r"]


def test_gallery_ceiling_of_one_image_per_class_is_the_gallery_itself():
    gallery, labels = GALLERY[[0, 2, 4]], torch.tensor([0, 1, 2])
    raw = retrieval_metrics(QUERY, QUERY_LABELS, gallery, labels)
    ceiling = gallery_ceiling(QUERY, QUERY_LABELS, gallery, labels)
    for key in ("recall_at_1", "map_at_r"):
        assert ceiling[key] == pytest.approx(raw[key])
        assert ceiling[f"{key}_pull"] == 0.0  # no pull does better, so the first stands
