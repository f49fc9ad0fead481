"""The cmce CLI on scikit-learn's digits: train, heads, update, eval and its errors."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from gallery_builder.cli.main import EMBEDDINGS_FILE, main
from gallery_builder.data import datasets as data_module
from gallery_builder.training.heads import QUERY_MEMBER, UPDATE_L2_WEIGHT, load_heads
from query_sdk import errors

SMALL = ["--data", "digits", "--epochs", "2", "--batch-size", "64"]


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    for name, arch, dim in (("resnet", "resnet", 24), ("widecnn", "widecnn", 32)):
        r = invoke(
            "train",
            "gallery",
            "--arch",
            arch,
            "--embedding-dim",
            dim,
            "--kwargs",
            '{"width": 8}',
            "--out",
            root / name,
            "--seed",
            1,
            *SMALL,
        )
        assert r.exit_code == 0, r.output
    for name, seed in (("query", 2), ("query-new", 3)):
        r = invoke(
            "train",
            "query",
            "--embedding-dim",
            16,
            "--kwargs",
            '{"width": 4}',
            "--out",
            root / name,
            "--seed",
            seed,
            *SMALL,
        )
        assert r.exit_code == 0, r.output
    r = invoke(
        "train",
        "heads",
        "--query",
        root / "query",
        "--gallery-model",
        root / "resnet",
        "--gallery-model",
        root / "widecnn",
        "--data",
        "digits",
        "--dim",
        16,
        "--steps",
        300,
        "--out",
        root / "heads",
    )
    assert r.exit_code == 0, r.output
    return root


def test_train_writes_checkpoints(trained):
    config = json.loads((trained / "resnet" / "config.json").read_text())
    assert config["role"] == "gallery" and config["embedding_dim"] == 24
    assert config["training"]["data"] == "digits" and config["training"]["images"] == 1797
    assert len(config["fingerprint"]) == 16
    heads = json.loads((trained / "heads" / "config.json").read_text())
    assert heads["space_id"].startswith("unified-")
    # the experiment's open-set recipe: linear heads, the query model's own member fused too
    assert [g["name"] for g in heads["gallery_models"]] == ["resnet", "widecnn", "query"]
    assert heads["identity"]["identity"] and heads["identity"]["layers"] == 0
    assert heads["settings"]["l2_weight"] == 0.1 and heads["settings"]["steps"] == 300
    assert (trained / "heads" / "train-embeddings.safetensors").is_file()


def test_heads_without_the_identity_member_for_steps(trained, tmp_path):
    r = invoke(
        "train",
        "heads",
        "--query",
        trained / "query",
        "--gallery-model",
        trained / "resnet",
        "--data",
        "digits",
        "--no-identity",
        "--steps",
        7,
        "--out",
        tmp_path / "heads",
    )
    assert r.exit_code == 0, r.output
    heads = json.loads((tmp_path / "heads" / "config.json").read_text())
    assert [g["name"] for g in heads["gallery_models"]] == ["resnet"]
    assert heads["settings"]["steps"] == 7 and heads["settings"]["epochs"] is None


def test_update_keeps_the_space(trained):
    r = invoke(
        "train",
        "update",
        "--heads",
        trained / "heads",
        "--query",
        trained / "query-new",
        "--data",
        "digits",
        "--epochs",
        3,
        "--out",
        trained / "heads-new",
    )
    assert r.exit_code == 0, r.output
    old = json.loads((trained / "heads" / "config.json").read_text())
    new = json.loads((trained / "heads-new" / "config.json").read_text())
    assert new["space_id"] == old["space_id"]
    assert new["query_fingerprint"] != old["query_fingerprint"]
    assert "unchanged" in r.output
    # the new query head has the space's own shape (linear) and recipe (its l2 weight, ...)
    old_heads, new_heads = load_heads(trained / "heads")[0], load_heads(trained / "heads-new")[0]
    shapes = [[p.shape for p in h.query.parameters()] for h in (old_heads, new_heads)]
    assert shapes[0] == shapes[1] == [(16, 16), (16,)]
    assert {k: v for k, v in new["settings"].items() if k != "epochs"} == {
        k: v for k, v in old["settings"].items() if k != "epochs"
    }
    assert new["settings"]["epochs"] == 3 and new["identity"]["weights"] == old_heads.weights
    assert new["training"]["updated_from"] == old["space_id"]
    assert new["training"]["update_l2_weight"] == UPDATE_L2_WEIGHT
    # each folder stores its own query model's training embeddings: a next update fits to them
    stored = [load_file(trained / h / EMBEDDINGS_FILE) for h in ("heads", "heads-new")]
    assert all(QUERY_MEMBER in st and len(st[QUERY_MEMBER]) == 1797 for st in stored)
    assert not torch.equal(stored[0][QUERY_MEMBER], stored[1][QUERY_MEMBER])
    assert torch.equal(stored[0]["gallery.resnet"], stored[1]["gallery.resnet"])


def test_update_refuses_to_query_heads_with_the_identity_member(trained, tmp_path):
    common = ["--data", "digits", "--steps", 20]
    r = invoke(
        "train", "heads", "--mode", "to-query", "--query", trained / "query",
        "--gallery-model", trained / "resnet", "--out", tmp_path / "heads", *common,
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(
        main,
        [
            str(a)
            for a in (
                "train",
                "update",
                "--heads",
                tmp_path / "heads",
                "--query",
                trained / "query-new",
                "--out",
                tmp_path / "new",
                *common,
            )
        ],  # fmt: skip
    )
    assert r.exit_code == errors.CheckpointError.exit_code
    assert "update unified heads (the gallery stays)" in r.output
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize(
    ("stored", "message"),
    [
        (None, "has no train-embeddings.safetensors"),
        # the gallery fuses the query model's own member: a new head cannot be fitted to the
        # stored gallery vectors without the old query model's training embeddings
        ("without the query member", "lacks the query model's own training embeddings"),
    ],
)
def test_update_refuses_heads_without_what_it_fits_to(trained, tmp_path, stored, message):
    bare = tmp_path / "heads"
    bare.mkdir()
    for name in ("config.json", "weights.safetensors"):
        (bare / name).write_bytes((trained / "heads" / name).read_bytes())
    if stored:
        tensors = load_file(trained / "heads" / EMBEDDINGS_FILE)
        save_file({k: v for k, v in tensors.items() if k != QUERY_MEMBER}, bare / EMBEDDINGS_FILE)
    r = CliRunner().invoke(
        main,
        [
            "train",
            "update",
            "--heads",
            str(bare),
            "--query",
            str(trained / "query-new"),
            "--data",
            "digits",
            "--out",
            str(tmp_path / "out"),
        ],
    )
    assert r.exit_code == errors.CheckpointError.exit_code
    assert message in r.output
    assert not (tmp_path / "out").exists()


def test_update_refuses_other_training_data(trained, tmp_path):
    from PIL import Image

    digits = data_module.load_digits()
    for i in range(20):
        folder = tmp_path / "images" / str(digits.labels[i])
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(digits.images[i, :, :, 0]).save(folder / f"{i}.png")
    r = CliRunner().invoke(
        main,
        [
            "train",
            "update",
            "--heads",
            str(trained / "heads"),
            "--query",
            str(trained / "query-new"),
            "--data",
            str(tmp_path / "images"),
            "--out",
            str(tmp_path / "out"),
        ],
    )
    assert r.exit_code == errors.DataError.exit_code
    assert "has 20 images; the heads were trained on 1797" in r.output
    assert not (tmp_path / "out").exists()


def test_eval_json(trained):
    r = invoke(
        "eval",
        "--query",
        trained / "query",
        "--heads",
        trained / "heads",
        "--gallery-model",
        trained / "resnet",
        "--gallery-model",
        trained / "widecnn",
        "--gallery-images",
        "digits",
        "--query-images",
        "digits",
        "--json",
    )
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert set(out["settings"]) == {
        "sym:query",
        "unified:resnet",
        "unified:widecnn",
        "unified:query",  # the identity member alone: the query model through T_q on both sides
        "unified:ensemble",
    }
    # gallery == queries: each query finds itself (or an exact duplicate) first
    assert out["settings"]["sym:query"]["recall_at_1"] == pytest.approx(1.0)
    # models of two epochs: MAP@R well above chance (about 0.01 with ten classes), near the
    # query model's own
    ensemble = out["settings"]["unified:ensemble"]["map_at_r"]
    assert 0.03 < ensemble <= 1.0
    assert ensemble > 0.6 * out["settings"]["sym:query"]["map_at_r"]


def eval_with_resnet_only(trained, query: str):
    return CliRunner().invoke(
        main,
        [
            str(a)
            for a in (
                "eval",
                "--query",
                trained / query,
                "--heads",
                trained / "heads",
                "--gallery-model",
                trained / "resnet",
                "--gallery-images",
                "digits",
                "--query-images",
                "digits",
            )
        ],  # fmt: skip
    )


def test_eval_names_the_missing_member(trained):
    r = eval_with_resnet_only(trained, "query")
    assert r.exit_code == errors.CheckpointError.exit_code
    assert "give --gallery-model for ['widecnn']" in r.output


def test_eval_refuses_heads_of_another_query_model(trained):
    r = eval_with_resnet_only(trained, "query-new")
    assert r.exit_code == errors.CheckpointError.exit_code
    assert "error: heads belong to query model" in r.output
    new_fp = json.loads((trained / "query-new" / "config.json").read_text())["fingerprint"]
    assert new_fp in r.output


def test_missing_dataset_names_all_three_ways(tmp_path, monkeypatch):
    monkeypatch.setenv("CMCE_DATA", str(tmp_path / "none"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setattr(data_module, "SYSTEM_DATA_DIRS", (tmp_path / "system",))
    r = CliRunner().invoke(main, ["data", "where"])
    assert r.exit_code == errors.DataError.exit_code
    for way in (
        "cmce data fetch fashion-mnist",
        "apt-get download dataset-fashion-mnist",
        "torchvision",
    ):
        assert way in r.output


def test_folder_needs_an_input_spec(tmp_path):
    r = CliRunner().invoke(
        main, ["train", "gallery", "--data", str(tmp_path), "--out", str(tmp_path / "m")]
    )
    assert r.exit_code == 2 and "--input-spec" in r.output


def test_models_lists_the_families():
    r = invoke("models")
    lines = {line.split()[0]: line for line in r.output.splitlines()}
    for name in ("resnet", "widecnn", "vit", "mobilenet"):
        assert lines[name].endswith("at 28x28x1")
    assert lines["mobilenet_v3_small"].endswith("at 224x224x3")  # takes only RGB 224


@pytest.mark.parametrize("given,expected", [(None, "1"), ("0", "0")])
def test_the_clis_turn_on_huge_pages_for_torch_unless_told_not_to(given, expected):
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    if given is not None:
        env["THP_MEM_ALLOC_ENABLE"] = given
    code = "import os, gallery_builder.cli.main; print(os.environ['THP_MEM_ALLOC_ENABLE'])"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.strip() == expected, out.stderr
