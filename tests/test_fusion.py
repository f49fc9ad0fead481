"""Tests for gallery_builder.training.fusion.fuse: the fused gallery vector and its uncertainty."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from gallery_builder.training.fusion import fuse

SQRT2 = math.sqrt(2.0)


def test_identical_embeddings_zero_uncertainty_and_same_vector():
    v = F.normalize(torch.tensor([[1.0, 2.0, -2.0], [0.0, 3.0, 4.0]]), dim=-1)  # (B=2, D=3)
    vector, unc = fuse(torch.stack([v, v, v]))
    assert vector.shape == (2, 3) and unc.shape == (2,)
    torch.testing.assert_close(vector, v)
    torch.testing.assert_close(unc, torch.zeros(2), atol=1e-6, rtol=0)


def test_two_orthogonal_embeddings():
    a = torch.tensor([[1.0, 0.0, 0.0]])
    b = torch.tensor([[0.0, 1.0, 0.0]])
    vector, unc = fuse(torch.stack([a, b]))
    # cosine 0 -> uncertainty 1 - 0 = 1; vector (a + b) / |a + b| = (a + b) / sqrt(2)
    torch.testing.assert_close(unc, torch.tensor([1.0]))
    torch.testing.assert_close(vector, (a + b) / SQRT2)


def test_opposite_pair_has_uncertainty_two():
    a = torch.tensor([[0.6, -0.8]])
    _, unc = fuse(torch.stack([a, -a]))
    # cosine -1 -> 1 - (-1) = 2
    torch.testing.assert_close(unc, torch.tensor([2.0]))


def test_three_vectors_known_pairwise_cosines():
    e1 = torch.tensor([1.0, 0.0, 0.0])
    e2 = torch.tensor([0.0, 1.0, 0.0])
    mid = torch.tensor([1.0, 1.0, 0.0]) / SQRT2
    # pairwise cosines: <e1, e2> = 0, <e1, mid> = <e2, mid> = 1/sqrt2
    # uncertainty = 1 - (0 + 2/sqrt2) / 3 = 1 - sqrt2/3 = 0.528595
    # sum = (1 + 1/sqrt2, 1 + 1/sqrt2, 0) -> vector (1/sqrt2, 1/sqrt2, 0)
    vector, unc = fuse(torch.stack([e1, e2, mid])[:, None, :])
    torch.testing.assert_close(unc, torch.tensor([1 - SQRT2 / 3]))
    torch.testing.assert_close(vector, torch.tensor([[1 / SQRT2, 1 / SQRT2, 0.0]]))


def test_matches_brute_force_pairwise_mean_on_random_inputs():
    gen = torch.Generator().manual_seed(0)
    t = torch.randn(4, 6, 5, generator=gen)  # N=4 models, B=6 images, D=5
    vector, unc = fuse(t)
    n = F.normalize(t, dim=-1)
    cosines = [(n[i] * n[j]).sum(-1) for i in range(4) for j in range(i + 1, 4)]
    expected = 1 - torch.stack(cosines).mean(0)
    torch.testing.assert_close(unc, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(vector, F.normalize(n.mean(0), dim=-1))
    assert ((unc >= 0) & (unc <= 2)).all()


def test_batch_items_are_fused_independently():
    a = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    b = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # image 0: agreement, image 1: orthogonal
    _, unc = fuse(torch.stack([a, b]))
    torch.testing.assert_close(unc, torch.tensor([0.0, 1.0]))


def test_single_model_gives_zero_uncertainty():
    t = torch.tensor([[[3.0, 4.0], [0.0, -2.0], [1.0, 1.0]]])  # N=1, B=3
    vector, unc = fuse(t)
    assert torch.equal(unc, torch.zeros(3))
    torch.testing.assert_close(
        vector, torch.tensor([[0.6, 0.8], [0.0, -1.0], [1 / SQRT2, 1 / SQRT2]])
    )


def test_inputs_are_normalised_first():
    gen = torch.Generator().manual_seed(1)
    t = F.normalize(torch.randn(3, 4, 8, generator=gen), dim=-1)
    scaled = t.clone()
    scaled[0] *= 25.0  # one model's embeddings much longer
    scaled[2] *= 0.01  # another much shorter
    v1, u1 = fuse(t)
    v2, u2 = fuse(scaled)
    torch.testing.assert_close(v1, v2, atol=1e-6, rtol=0)
    torch.testing.assert_close(u1, u2, atol=1e-6, rtol=0)


def test_unnormalised_orthogonal_pair_still_gives_one():
    a = torch.tensor([[5.0, 0.0]])
    b = torch.tensor([[0.0, 0.2]])
    vector, unc = fuse(torch.stack([a, b]))
    torch.testing.assert_close(unc, torch.tensor([1.0]))
    torch.testing.assert_close(vector, torch.tensor([[1 / SQRT2, 1 / SQRT2]]))


def test_half_precision_input_gives_float_output():
    t = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]], dtype=torch.float16)
    vector, unc = fuse(t)
    assert vector.dtype == torch.float32
    torch.testing.assert_close(unc, torch.tensor([1.0]))


@pytest.mark.parametrize("shape", [(5,), (2, 5), (2, 3, 4, 5)])
def test_wrong_ndim_rejected(shape):
    with pytest.raises(ValueError, match=r"expected \(models, batch, dim\)"):
        fuse(torch.zeros(shape))
