"""Tests for gallery_builder.training.heads: training the transformation heads of both modes, the
compatible query-model update, heads checkpoints and the compatibility check.

Synthetic paired embeddings share a latent x ~ N(0, I_8): the query model is
normalize(A x), gallery model i is normalize(B_i x + small noise), labels are argmax x[:4].
"""

from __future__ import annotations

import copy
import json
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from gallery_builder.models.checkpoint import CONFIG_FILE, CheckpointError
from gallery_builder.training.heads import (
    QUERY_MEMBER,
    Head,
    HeadSet,
    HeadSettings,
    check_compatible,
    load_heads,
    save_heads,
    train_heads,
    train_query_head,
)

N, TRAIN = 3000, 2500
DIMS = {"g24": 24, "g40": 40}
QUERY_DIM, NEW_QUERY_DIM, UNIFIED_DIM = 16, 20, 32
SETTINGS = HeadSettings(epochs=10, batch_size=128, hidden=64, seed=0)
QUERY_FP = "q0123456789abcde"
GALLERY_FPS = {"g24": "g24fingerprint00", "g40": "g40fingerprint00"}


@pytest.fixture(scope="module")
def data():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(N, 8, generator=gen)
    labels = x[:, :4].argmax(dim=1)
    a = torch.randn(QUERY_DIM, 8, generator=gen)
    a_new = torch.randn(NEW_QUERY_DIM, 8, generator=gen)
    raw = {}
    for name, d in DIMS.items():
        b = torch.randn(d, 8, generator=gen)
        raw[name] = F.normalize(x @ b.T + 0.05 * torch.randn(N, d, generator=gen), dim=-1)
    return {
        "labels": labels,
        "query": F.normalize(x @ a.T, dim=-1),
        "new_query": F.normalize(x @ a_new.T, dim=-1),
        "raw": raw,
    }


def train_part(data):
    return {k: v[:TRAIN] for k, v in data["raw"].items()}


def held_out(data, key):
    if key == "raw":
        return {k: v[TRAIN:] for k, v in data["raw"].items()}
    return data[key][TRAIN:]


def fresh(mode: str, dim: int, query_dim: int = QUERY_DIM) -> HeadSet:
    torch.manual_seed(SETTINGS.seed)
    return HeadSet(mode, dim, DIMS, query_dim, 4, SETTINGS.hidden, SETTINGS.layers).eval()


@torch.no_grad()
def to_query_distance(heads: HeadSet, data) -> float:
    """Mean squared distance of T_i(G_i(x)) to Q(x) on held-out data, averaged over models."""
    raw, q = held_out(data, "raw"), held_out(data, "query")
    heads.eval()
    return sum(
        (heads.transform_gallery(n, raw[n]) - q).pow(2).sum(1).mean().item() for n in DIMS
    ) / len(DIMS)


@torch.no_grad()
def shared_distance(heads: HeadSet, data, query_key: str = "query") -> float:
    """Mean squared distance of T_i(G_i(x)) to T_q(Q(x)) on held-out data."""
    raw, q = held_out(data, "raw"), held_out(data, query_key)
    heads.eval()
    tq = heads.transform_query(q)
    return sum(
        (heads.transform_gallery(n, raw[n]) - tq).pow(2).sum(1).mean().item() for n in DIMS
    ) / len(DIMS)


@pytest.fixture(scope="module")
def to_query_heads(data):
    return train_heads(
        "to-query", train_part(data), data["query"][:TRAIN], data["labels"][:TRAIN], SETTINGS
    )


@pytest.fixture(scope="module")
def unified_heads(data):
    return train_heads(
        "unified",
        train_part(data),
        data["query"][:TRAIN],
        data["labels"][:TRAIN],
        SETTINGS,
        dim=UNIFIED_DIM,
    )


@pytest.fixture(scope="module")
def updated_heads(data, unified_heads):
    before = unified_heads.encode_query(held_out(data, "query"))
    new = train_query_head(
        unified_heads, train_part(data), data["new_query"][:TRAIN], data["labels"][:TRAIN], SETTINGS
    )
    after = unified_heads.encode_query(held_out(data, "query"))
    return new, before, after


# ----------------------------------------------------------------------------- Head / HeadSet


def test_head_outputs_are_unit_vectors():
    torch.manual_seed(0)
    head = Head(7, 5, hidden=8, layers=1).eval()
    out = head(torch.randn(4, 7))
    assert out.shape == (4, 5)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(4))


def test_a_linear_query_head_as_wide_as_the_space_starts_as_the_query_model():
    """Its identity member then starts as the query model alone; other query heads (hidden
    layers, another width) and the gallery heads start at random."""
    torch.manual_seed(0)
    x = torch.randn(6, 16)
    linear = HeadSet("unified", 16, DIMS, 16, 4, layers=0, identity=True).eval()
    torch.testing.assert_close(linear.transform_query(x), F.normalize(x, dim=-1))
    torch.testing.assert_close(linear.transform_gallery(QUERY_MEMBER, x), F.normalize(x, dim=-1))
    mlp = HeadSet("unified", 16, DIMS, 16, 4, layers=1).eval()
    assert not torch.allclose(mlp.transform_query(x), F.normalize(x, dim=-1), atol=0.1)


def test_headset_argument_errors():
    with pytest.raises(ValueError, match="mode must be one of"):
        HeadSet("sideways", 16, DIMS, 16, 4)
    with pytest.raises(ValueError, match="dim 32 != 16"):
        HeadSet("to-query", 32, DIMS, 16, 4)


def test_train_heads_rejects_unpaired_embeddings(data):
    raw = {"g24": data["raw"]["g24"][:100], "g40": data["raw"]["g40"][:99]}
    with pytest.raises(ValueError, match="g40: 99 gallery embeddings for 100 query"):
        train_heads("to-query", raw, data["query"][:100], data["labels"][:100], SETTINGS)


@pytest.mark.parametrize("mode", ["to-query", "unified"])
def test_heads_train_one_step_per_batch_and_repeat_with_their_seed(data, mode):
    n, s = 2 * 128 + 1, replace(SETTINGS, epochs=3)  # two batches and a skipped batch of one

    def trained(seed: int) -> dict[str, torch.Tensor]:
        raw = {k: v[:n] for k, v in data["raw"].items()}
        args = (raw, data["query"][:n], data["labels"][:n], replace(s, seed=seed))
        dim = UNIFIED_DIM if mode == "unified" else None
        return train_heads(mode, *args, dim=dim).state_dict()

    first, again, other = trained(0), trained(0), trained(1)
    steps = {k: int(v) for k, v in first.items() if k.endswith("num_batches_tracked")}
    assert len(steps) == 2 * len(DIMS) + 2 * (mode == "unified")  # every head's BatchNorms
    assert set(steps.values()) == {3 * 2}  # each head trained for epochs x batches steps
    assert all(torch.equal(v, again[k]) for k, v in first.items())
    assert not all(torch.equal(v, other[k]) for k, v in first.items())


# ----------------------------------------------------------------------------- to-query


def test_to_query_heads_fit_held_out_query_embeddings(data, to_query_heads):
    assert to_query_heads.mode == "to-query"
    assert to_query_heads.query is None and to_query_heads.classifier is None
    init = to_query_distance(fresh("to-query", QUERY_DIM), data)
    trained = to_query_distance(to_query_heads, data)
    assert init > 1.0  # random heads: unrelated unit vectors, squared distance ~2
    assert trained < 0.25 * init, (init, trained)


def test_to_query_space_is_the_query_model(data, to_query_heads):
    assert to_query_heads.space_id(QUERY_FP) == QUERY_FP
    # the query side is only normalised
    q = torch.tensor([[3.0] + [0.0] * (QUERY_DIM - 1)])
    torch.testing.assert_close(to_query_heads.encode_query(q), F.normalize(q, dim=-1))


def test_encode_gallery_fuses_the_transformed_embeddings(data, to_query_heads):
    raw = held_out(data, "raw")
    vector, uncertainty = to_query_heads.encode_gallery(raw)
    with torch.no_grad():
        t = [to_query_heads.transform_gallery(n, raw[n]) for n in DIMS]
    torch.testing.assert_close(vector, F.normalize(t[0] + t[1], dim=-1))
    torch.testing.assert_close(uncertainty, (1 - (t[0] * t[1]).sum(1)).clamp(0, 2))
    # heads that agree with the query model agree with each other: low mean uncertainty
    assert uncertainty.mean().item() < 0.1
    # one model only: zero uncertainty
    _, single = to_query_heads.encode_gallery(raw, names=["g24"])
    assert torch.equal(single, torch.zeros(N - TRAIN))


def test_train_query_head_needs_unified_heads(data, to_query_heads):
    with pytest.raises(ValueError, match="needs unified heads"):
        train_query_head(
            to_query_heads,
            train_part(data),
            data["new_query"][:TRAIN],
            data["labels"][:TRAIN],
            SETTINGS,
        )


# ----------------------------------------------------------------------------- unified


def test_unified_heads_join_both_sides_on_held_out_data(data, unified_heads):
    assert unified_heads.mode == "unified" and unified_heads.dim == UNIFIED_DIM
    init = shared_distance(fresh("unified", UNIFIED_DIM), data)
    trained = shared_distance(unified_heads, data)
    assert trained < 0.25 * init, (init, trained)
    assert unified_heads.encode_query(held_out(data, "query")).shape == (N - TRAIN, UNIFIED_DIM)


def test_unified_space_id(unified_heads):
    space = unified_heads.space_id(QUERY_FP)
    assert space.startswith("unified-")
    assert len(space) == len("unified-") + 16
    # minted from the gallery side, not from the query model
    assert unified_heads.space_id("another-query-fp") == space
    assert fresh("unified", UNIFIED_DIM).space_id(QUERY_FP) != space


def test_unified_classifier_separates_labels(data, unified_heads):
    from gallery_builder.training.heads import _cosine_logits

    with torch.no_grad():
        tq = unified_heads.encode_query(held_out(data, "query"))
        pred = _cosine_logits(tq, unified_heads.classifier, 1.0).argmax(1)
    accuracy = (pred == held_out(data, "labels")).float().mean().item()
    assert accuracy > 0.8  # chance is 0.25


# ----------------------------------------------------------------------------- query update


def test_query_update_leaves_the_gallery_untouched(data, unified_heads, updated_heads):
    new, before, after = updated_heads
    raw = held_out(data, "raw")
    old_vec, old_unc = unified_heads.encode_gallery(raw)
    new_vec, new_unc = new.encode_gallery(raw)
    assert torch.equal(old_vec, new_vec)
    assert torch.equal(old_unc, new_unc)
    assert new.space_id(QUERY_FP) == unified_heads.space_id(QUERY_FP)
    assert torch.equal(new.classifier, unified_heads.classifier)
    # the old head set is not modified by the update
    assert torch.equal(before, after)
    assert new.query_dim == NEW_QUERY_DIM and unified_heads.query_dim == QUERY_DIM
    assert all(p.requires_grad for p in new.parameters())


def test_new_query_head_fits_the_new_query_model(data, unified_heads, updated_heads):
    new, _, _ = updated_heads
    start = copy.deepcopy(unified_heads)
    torch.manual_seed(SETTINGS.seed)
    start.query = Head(NEW_QUERY_DIM, UNIFIED_DIM, SETTINGS.hidden, SETTINGS.layers)
    init = shared_distance(start, data, "new_query")
    trained = shared_distance(new, data, "new_query")
    assert trained < 0.25 * init, (init, trained)


@pytest.fixture(scope="module")
def half_blind():
    """Gallery models that see half of the latent, query models that see all of it, and linear
    unified heads (the query head starts as the identity) whose gallery vectors fuse the old
    query model's own member, weighted most: the stored vectors hold what only the query
    models see."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(N, 8, generator=gen)
    raw = {
        name: F.normalize(x[:, :4] @ torch.randn(d, 4, generator=gen).T, dim=-1)
        for name, d in DIMS.items()
    }
    old, new = (
        F.normalize(x @ torch.randn(d, 8, generator=gen).T, dim=-1)
        for d in (QUERY_DIM, NEW_QUERY_DIM)
    )
    labels = x[:, :4].argmax(dim=1)
    train = {k: v[:TRAIN] for k, v in raw.items()}
    linear = replace(SETTINGS, layers=0, l2_weight=0.1)  # the open-set recipe's heads
    heads = train_heads("unified", train, old[:TRAIN], labels[:TRAIN], linear, identity=True)
    heads.set_weights({**dict.fromkeys(DIMS, 1.0), QUERY_MEMBER: 2.0})
    with torch.no_grad():
        stored, _ = heads.encode_gallery({**raw, QUERY_MEMBER: old})
    return {
        "heads": heads,
        "train": train,
        "old": old[:TRAIN],
        "args": (new[:TRAIN], labels[:TRAIN], linear),
        "held_out": (new[TRAIN:], stored[TRAIN:]),
    }


def test_query_update_needs_the_fused_query_members_training_embeddings(half_blind):
    with pytest.raises(ValueError, match=r"fused members \['query'\]"):
        train_query_head(half_blind["heads"], half_blind["train"], *half_blind["args"])


def test_new_query_head_lands_on_the_stored_gallery_vectors(half_blind):
    """A new query head fitted to the stored (fused) vectors, the old query model's member
    among them, lands nearer them on held-out images than one fitted to the gallery heads'
    outputs alone, which lack what only the query models see."""
    heads, args = half_blind["heads"], half_blind["args"]
    fused = train_query_head(heads, {**half_blind["train"], QUERY_MEMBER: half_blind["old"]}, *args)
    heads_only = copy.deepcopy(heads)
    heads_only.set_weights({**dict.fromkeys(DIMS, 1.0), QUERY_MEMBER: 0.0})
    heads_only = train_query_head(heads_only, half_blind["train"], *args)
    q, stored = half_blind["held_out"]
    with torch.no_grad():
        near = (fused.encode_query(q) - stored).pow(2).sum(1).mean().item()
        far = (heads_only.encode_query(q) - stored).pow(2).sum(1).mean().item()
    assert near < 0.8 * far, (near, far)


# ----------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("which", ["to_query_heads", "unified_heads", "updated_heads"])
def test_save_load_round_trip(tmp_path, data, request, which):
    heads = request.getfixturevalue(which)
    if which == "updated_heads":
        heads = heads[0]
    config = save_heads(tmp_path / "h", heads, QUERY_FP, GALLERY_FPS, SETTINGS, {"data": "t"})
    loaded, loaded_config = load_heads(tmp_path / "h")
    assert loaded_config == config
    assert config["space_id"] == heads.space_id(QUERY_FP)
    assert loaded.space_id(QUERY_FP) == config["space_id"]
    assert [g["name"] for g in config["gallery_models"]] == list(DIMS)
    assert [g["fingerprint"] for g in config["gallery_models"]] == list(GALLERY_FPS.values())
    assert [g["head_fingerprint"] for g in config["gallery_models"]] == [
        heads.head_fingerprint(n) for n in DIMS
    ]
    raw = held_out(data, "raw")
    for got, want in zip(loaded.encode_gallery(raw), heads.encode_gallery(raw), strict=True):
        assert torch.equal(got, want)
    q = held_out(data, "new_query" if which == "updated_heads" else "query")
    assert torch.equal(loaded.encode_query(q), heads.encode_query(q))


def test_load_heads_rejects_a_model_checkpoint_and_bad_identity(tmp_path, to_query_heads):
    save_heads(tmp_path / "h", to_query_heads, QUERY_FP, GALLERY_FPS, SETTINGS, {})
    file = tmp_path / "h" / CONFIG_FILE
    config = json.loads(file.read_text())
    file.write_text(json.dumps({**config, "kind": "model"}))
    with pytest.raises(CheckpointError, match="expected a heads checkpoint"):
        load_heads(tmp_path / "h")
    config["identity"]["hidden"] = 32
    file.write_text(json.dumps(config))
    with pytest.raises(CheckpointError):
        load_heads(tmp_path / "h")


# ----------------------------------------------------------------------------- check_compatible


@pytest.fixture(scope="module")
def heads_config(tmp_path_factory, to_query_heads):
    folder = tmp_path_factory.mktemp("heads")
    return save_heads(folder, to_query_heads, QUERY_FP, GALLERY_FPS, SETTINGS, {})


def query_config(dim=QUERY_DIM, fp=QUERY_FP):
    return {"embedding_dim": dim, "fingerprint": fp}


def gallery_configs(**changes):
    configs = {n: {"embedding_dim": d, "fingerprint": GALLERY_FPS[n]} for n, d in DIMS.items()}
    for name, change in changes.items():
        configs[name] = {**configs.get(name, {"embedding_dim": 8, "fingerprint": "x"}), **change}
    return configs


def test_check_compatible_accepts_the_right_models(heads_config):
    assert check_compatible(heads_config, query_config(), gallery_configs()) is None
    # a subset of the gallery models is fine
    assert check_compatible(heads_config, query_config(), {"g40": gallery_configs()["g40"]}) is None


def test_check_compatible_wrong_query_fingerprint(heads_config):
    with pytest.raises(CheckpointError) as err:
        check_compatible(heads_config, query_config(fp="otherqueryfp0000"), gallery_configs())
    assert QUERY_FP in str(err.value) and "otherqueryfp0000" in str(err.value)


def test_check_compatible_wrong_query_dim(heads_config):
    with pytest.raises(CheckpointError) as err:
        check_compatible(heads_config, query_config(dim=64), gallery_configs())
    assert f"{QUERY_DIM}-dim" in str(err.value) and "gives 64" in str(err.value)


def test_check_compatible_gallery_dim_mismatch(heads_config):
    with pytest.raises(CheckpointError) as err:
        check_compatible(heads_config, query_config(), gallery_configs(g40={"embedding_dim": 41}))
    message = str(err.value)
    assert "'g40'" in message and "40-dim" in message and "gives 41" in message
    assert GALLERY_FPS["g40"] in message


def test_check_compatible_gallery_fingerprint_mismatch(heads_config):
    with pytest.raises(CheckpointError) as err:
        check_compatible(
            heads_config, query_config(), gallery_configs(g24={"fingerprint": "retrainedg24fp00"})
        )
    message = str(err.value)
    assert GALLERY_FPS["g24"] in message and "retrainedg24fp00" in message


def test_check_compatible_unknown_gallery_model(heads_config):
    with pytest.raises(CheckpointError) as err:
        check_compatible(heads_config, query_config(), gallery_configs(g99={}))
    message = str(err.value)
    assert "'g99'" in message and "['g24', 'g40']" in message


def test_colliding_gallery_names_are_rejected():
    with pytest.raises(ValueError):
        HeadSet("to-query", 4, {"a.b": 3, "a_b": 5}, 4, 2, hidden=8)
