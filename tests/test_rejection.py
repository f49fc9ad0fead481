"""Tests for gallery_builder.evaluation.rejection: risk-coverage curves and their area."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gallery_builder.evaluation.rejection import (
    GALLERY_COVERAGE,
    QUERY_COVERAGE,
    aurc,
    kept_order,
    n_kept,
    rank_average,
    selective_scores,
)
from gallery_builder.evaluation.run import _rejection


def test_coverage_grids():
    assert GALLERY_COVERAGE[0] == 1.0
    assert GALLERY_COVERAGE[-1] == 0.5
    assert len(GALLERY_COVERAGE) == 11
    assert GALLERY_COVERAGE[1] == 0.95
    assert (np.diff(GALLERY_COVERAGE) < 0).all()
    assert QUERY_COVERAGE[0] == 1.0
    assert QUERY_COVERAGE[-1] == 0.1


def test_kept_order_most_trusted_first_and_stable_for_ties():
    confidence = np.array([0.5, 0.9, 0.5, 0.9, 0.1])
    assert kept_order(confidence).tolist() == [1, 3, 0, 2, 4]
    # integer and list inputs too
    assert kept_order([3, 1, 3, 2]).tolist() == [0, 2, 3, 1]


def test_n_kept():
    assert n_kept(10, 1.0) == 10
    assert n_kept(10, 0.3) == 3  # 0.3 * 10 = 3.0000000000000004 must not become 4
    assert n_kept(10, 0.25) == 3  # 2.5 rounds up
    assert n_kept(4, 0.05) == 1  # 0.2 -> at least one item
    assert n_kept(4, 0.0) == 1


def test_selective_scores_hand_case():
    confidence = np.array([0.9, 0.1, 0.5, 0.7, 0.3])
    correct = np.array([1, 0, 0, 1, 1])
    # most trusted first: items 0 (.9), 3 (.7), 2 (.5), 4 (.3), 1 (.1) -> correct 1 1 0 1 0
    # coverage 1.0 keeps 5: 3/5;  0.8 keeps 4: 3/4;  0.6 keeps 3: 2/3;  0.4 keeps 2: 2/2;
    # 0.1 keeps ceil(0.5) = 1: 1/1
    scores = selective_scores(confidence, correct, [1.0, 0.8, 0.6, 0.4, 0.1])
    assert scores == pytest.approx([3 / 5, 3 / 4, 2 / 3, 1.0, 1.0])
    assert all(isinstance(s, float) for s in scores)


def test_selective_scores_ties_keep_original_order():
    confidence = np.array([1.0, 1.0, 1.0, 1.0])
    correct = np.array([0, 1, 1, 1])
    # stable order 0 1 2 3 -> coverage 0.25 keeps item 0 only (wrong), 0.5 keeps 0 and 1
    assert selective_scores(confidence, correct, [0.25, 0.5, 1.0]) == pytest.approx(
        [0.0, 0.5, 0.75]
    )


def test_aurc_constant_curve_equals_the_error():
    assert aurc(GALLERY_COVERAGE, [0.8] * len(GALLERY_COVERAGE)) == pytest.approx(0.2)
    assert aurc(QUERY_COVERAGE, [1.0] * len(QUERY_COVERAGE)) == pytest.approx(0.0)


def test_aurc_linear_curve():
    # error falls linearly from 0.4 at full coverage to 0 at half coverage: mean error 0.2
    assert aurc([1.0, 0.5], [0.6, 1.0]) == pytest.approx(0.2)
    assert aurc([1.0, 0.75, 0.5], [0.6, 0.8, 1.0]) == pytest.approx(0.2)
    # ascending coverage gives the same area
    assert aurc([0.5, 0.75, 1.0], [1.0, 0.8, 0.6]) == pytest.approx(0.2)


def test_aurc_uneven_grid_is_trapezoid_not_plain_mean():
    # errors 0.3, 0.1, 0.1 at coverage 1.0, 0.9, 0.5:
    # (0.3 + 0.1) / 2 * 0.1 + (0.1 + 0.1) / 2 * 0.4 = 0.02 + 0.04 = 0.06; / span 0.5 = 0.12
    # (the plain mean of the errors would be 0.1667)
    assert aurc([1.0, 0.9, 0.5], [0.7, 0.9, 0.9]) == pytest.approx(0.12)


def test_aurc_single_point():
    assert aurc([1.0], [0.75]) == pytest.approx(0.25)


def test_aurc_of_selective_scores_rewards_good_confidence():
    correct = np.array([1, 1, 1, 1, 0, 0, 1, 1, 0, 1])
    good = np.where(correct == 1, 1.0, 0.0) + np.linspace(0, 0.1, 10)
    bad = -good
    a_good = aurc(GALLERY_COVERAGE, selective_scores(good, correct, GALLERY_COVERAGE))
    a_bad = aurc(GALLERY_COVERAGE, selective_scores(bad, correct, GALLERY_COVERAGE))
    assert a_good < 0.3 < a_bad


def test_rank_average_hand_case():
    a = np.array([0.1, 0.5, 0.3, 0.9])  # ranks 0 2 1 3
    b = np.array([4.0, 3.0, 2.0, 1.0])  # ranks 3 2 1 0
    # mean ranks 1.5 2 1 1.5, divided by n - 1 = 3
    expected = [0.5, 2 / 3, 1 / 3, 0.5]
    np.testing.assert_allclose(rank_average(a, b), expected)
    # scale-free: rescaling or shifting one input changes nothing
    np.testing.assert_allclose(rank_average(1000 * a - 7, b), expected)


def test_rank_average_single_input_spans_zero_to_one():
    np.testing.assert_allclose(rank_average(np.array([5.0, -1.0, 2.0])), [1.0, 0.0, 0.5])
    np.testing.assert_allclose(rank_average(np.array([3.0])), [0.0])


def test_rank_average_ties_share_the_lower_rank():
    # [1, 1, 2]: documented ranks 0 0 2 -> / 2 = 0 0 1; implementation gives 0 0.5 1
    np.testing.assert_allclose(rank_average(np.array([1.0, 1.0, 2.0])), [0.0, 0.0, 1.0])


def test_gallery_drop_counts_the_top_hits_it_removes():
    # 4 gallery images on the axes, 2 classes; the two most uncertain (dropped at 50 %) are
    # image 1 (the top hit of a query of its class) and image 3 (the top hit of one query of
    # its class and of one of the other)
    gv = torch.eye(4)
    gl = torch.tensor([0, 0, 1, 1])
    unc = torch.tensor([0.1, 0.9, 0.2, 0.8])
    qv = torch.tensor([[0.1, 1.0, 0, 0], [0, 0, 0.1, 1.0], [0, 0, 0, 1.0], [1.0, 0, 0, 0]])
    ql = torch.tensor([0, 1, 0, 0])
    drop = _rejection(gv, unc, qv, gl, ql)["gallery_drop"]
    assert drop["dropped_right_hits"] == 2  # queries 0 and 1 lose their right answer
    assert drop["dropped_wrong_hits"] == 1  # query 2 loses its wrong one
    assert drop["images_per_class"] == 2.0
    assert drop["score"][0] == pytest.approx(3 / 4)
