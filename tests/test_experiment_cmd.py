"""`cmce experiment`: config files (TOML and JSON, every bad key or value one clear line),
presets as config files, explicit folders, and a tiny open-set run on glyphs rendered from
matplotlib's fonts, checked on its report.json."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import matplotlib
import pytest
from click.testing import CliRunner
from safetensors.torch import save_file

from gallery_builder.cli.main import main
from gallery_builder.data.glyphs import render_glyphs
from gallery_builder.data.splits import PARTS
from gallery_builder.evaluation.config import ConfigError
from gallery_builder.evaluation.experiment import (
    ExperimentConfig,
    check_lineup,
    get_model,
    load_config,
    load_splits,
    preset_names,
    with_input_spec,
)
from gallery_builder.models import import_external, list_models
from query_sdk.errors import TrustError
from query_sdk.spec import InputSpec

TINY = """
head_seeds = [0]
heads_views = 1
unified_dim = 16
diversity_models = []
diversity = { architectures = ["resnet", "widecnn"] }
heads = { epochs = 1, hidden = 32, batch_size = 64 }
split = { seed = 1 }

[[gallery_models]]
name = "resnet"
architecture = "resnet"
embedding_dim = 16
kwargs = { width = 4 }
train = { epochs = 1, batch_size = 32, seed = 11 }

[[gallery_models]]
name = "widecnn"
architecture = "widecnn"
embedding_dim = 16
kwargs = { width = 4 }
train = { epochs = 1, batch_size = 32, seed = 12 }

[query_model]
name = "query"
architecture = "mobilenet"
embedding_dim = 8
kwargs = { width = 4, stages = [[2, 1], [4, 2]] }
train = { epochs = 1, batch_size = 32, seed = 21 }

[old_query_model]
name = "query-old"
architecture = "mobilenet"
embedding_dim = 8
kwargs = { width = 4, stages = [[2, 1], [4, 2]] }
train = { epochs = 1, batch_size = 32, seed = 22 }
"""


def config_error(tmp_path: Path, text: str, suffix: str = ".toml") -> str:
    path = tmp_path / f"c{suffix}"
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(config=path)
    message = str(e.value)
    assert message.startswith(f"{path}: ") and "\n" not in message
    return message


# ---------------------------------------------------------------------------- config files


def test_unknown_key_lists_the_known_ones_with_a_suggestion(tmp_path):
    msg = config_error(tmp_path, "head_seed = [1]\n")
    assert "head_seed: unknown key; did you mean 'head_seeds'?" in msg
    assert "Known keys: dataset, spec, gallery_models, query_model" in msg
    assert msg.endswith("query_limit, workers")  # not the command line's (data, trust)
    msg = config_error(
        tmp_path, '[[gallery_models]]\narchitecture = "resnet"\n' * 2 + "train = { epoch = 3 }\n"
    )
    assert "gallery_models[1].train.epoch: unknown key; did you mean 'epochs'?" in msg
    assert "steps" in msg and "augment" in msg
    msg = config_error(tmp_path, "[query_model.train.augment]\nfilp = true\n")
    assert "query_model.train.augment.filp: unknown key; did you mean 'flip'?" in msg


@pytest.mark.parametrize(
    ("text", "expect"),
    [
        ('head_seeds = "0"', "head_seeds: expected a list, got '0' (str)"),
        ("heads_views = 1.5", "heads_views: expected an integer, got 1.5 (float)"),
        ("[heads]\nepochs = true", "heads.epochs: expected an integer, got true (true/false)"),
        ("[query_model.train]\nepochs = -2", "query_model.train.epochs: epochs must be at least 1"),
        ("[query_model.train]\nlr = 0", "query_model.train.lr: learning rate must be positive"),
        ("[split]\nval_share = 1.5", "split.val_share: val_share must be between 0 and 1"),
        ("[split]\nquery_share = 0", "split.query_share: query_share must be between 0 and 1"),
        ("[split]\ndistractors = -5", "split.distractors: distractors must be at least 0"),
        ('[split]\ndistractors = "many"', "split.distractors: expected an integer"),
        (
            "[query_model.train.augment]\nrotate = 200.0",
            "query_model.train.augment.rotate: augment.rotate must be in [0, 180 degrees)",
        ),
        ("spec = { height = 28, width = 28 }", "spec: missing key(s): channels"),
        ('data = "/tmp"', "data: set on the command line (--data), not in a file"),
        ('trust = ["evil:net"]', "trust: set on the command line (--trust-code), not in a file"),
    ],
)
def test_bad_values_name_the_key_path(tmp_path, text, expect):
    assert expect in config_error(tmp_path, text + "\n")


def test_unknown_architecture_lists_the_registered_ones(tmp_path):
    text = (
        '[[gallery_models]]\narchitecture = "resnet"\n[[gallery_models]]\narchitecture = "resnat"\n'
    )
    msg = config_error(tmp_path, text)
    assert "gallery_models[1].architecture: unknown architecture 'resnat'; known: " in msg
    assert all(name in msg for name in list_models())


def test_json_config_same_reader(tmp_path):
    doc = {
        "query_model": {"train": {"steps": 300, "augment": {"flip": True}}},
        "split": {"seed": 4},
    }
    path = tmp_path / "c.json"
    path.write_text(json.dumps(doc))
    cfg = load_config(config=path)
    assert cfg.query_model.train.steps == 300 and cfg.query_model.train.augment.flip
    assert cfg.query_model.architecture == "mobilenet"  # the rest stays the defaults'
    assert cfg.split.seed == 4 and cfg.split.search_share == 0.5
    msg = config_error(
        tmp_path, json.dumps({"gallery_models": [{"architecture": "vit", "subset": 2}]}), ".json"
    )
    assert "gallery_models[0].subset: subset must be in (0, 1], got 2.0" in msg
    assert "not valid JSON" in config_error(tmp_path, "{", ".json")
    assert "not valid TOML" in config_error(tmp_path, "a = ")
    assert "must end in .toml or .json" in config_error(tmp_path, "a = 1", ".yaml")
    assert "must be a table" in config_error(tmp_path, "[1]", ".json")


def test_optional_unset_and_list_elements_start_from_the_base_by_name(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text(
        'diversity = {}\n[[gallery_models]]\nname = "vit"\n'
        'train = { epochs = "none", steps = 50 }\n'
    )
    cfg = load_config("digits", path)
    (vit,) = cfg.gallery_models
    assert vit.architecture == "vit" and vit.kwargs["patch"] == 2  # from the digits preset
    assert vit.train.epochs is None and vit.train.steps == 50 and vit.train.batch_size == 64
    assert cfg.spec.shape == (8, 8, 1) and cfg.dataset == "digits"


def test_learning_rates_follow_the_architecture_unless_a_file_sets_them(tmp_path):
    """Open-set defaults: CNNs at 1e-2, the ViT at 3e-3, a new entry too; Fashion-MNIST keeps
    the 3e-3 of its published figures."""
    cfg = load_config("glyphs")
    lrs = {m.name: m.train.lr for m in (*cfg.gallery_models, cfg.query_model)}
    assert lrs == {"resnet": 1e-2, "widecnn": 1e-2, "vit": 3e-3, "query": 1e-2}
    assert {m.train.lr for m in (*cfg.diversity_models, cfg.old_query_model)} == {1e-2}
    path = tmp_path / "c.toml"
    path.write_text(
        'diversity = {}\n[[gallery_models]]\nname = "big"\narchitecture = "vit"\n'
        '[[gallery_models]]\nname = "resnet"\ntrain = { lr = 0.05 }\n'
    )
    big, resnet = load_config(config=path).gallery_models
    assert big.train.lr == 3e-3 and resnet.train.lr == 0.05
    fashion = load_config("default")
    assert {m.train.lr for m in (*fashion.gallery_models, fashion.query_model)} == {3e-3}


def test_presets_are_config_files():
    assert {"default", "quick", "digits", "glyphs", "han"} <= set(preset_names())
    fashion, quick = load_config("default"), load_config("quick")
    assert fashion.dataset == quick.dataset == "fashion-mnist" and fashion.split.val_share == 0.1
    assert all(m.train.augment.flip for m in (*fashion.gallery_models, fashion.query_model))
    assert quick.train_limit == 5000 and quick.gallery_models[0].train.epochs == 1
    glyphs, digits = load_config("glyphs"), load_config("digits")
    assert glyphs.spec is None and not glyphs.query_model.train.augment.flip
    assert not any(m.train.augment.flip for m in digits.gallery_models)
    # the defaults (no preset, no file) are the recipe for unseen data: the spec from the images
    assert ExperimentConfig().spec is None and ExperimentConfig().dataset == "folder"
    with pytest.raises(ConfigError, match="unknown preset 'nope'; known: default, digits"):
        load_config("nope")


# ------------------------------------------------------------------------------------ CLI


@pytest.fixture(scope="module")
def glyph_root(tmp_path_factory) -> Path:
    """12 character classes in every usable font matplotlib ships (about 20 fonts), 16x16."""
    fonts = sorted((Path(matplotlib.get_data_path()) / "fonts" / "ttf").glob("*.ttf"))
    root = tmp_path_factory.mktemp("glyphs")
    render_glyphs(fonts, root, chars="ABCDEFGHKMNP", size=16, workers=1)
    return root


def test_tiny_open_set_run(glyph_root, tmp_path, monkeypatch):
    monkeypatch.setenv("TQDM_DISABLE", "1")
    config = tmp_path / "tiny.toml"
    config.write_text(TINY)
    out = tmp_path / "run"
    args = ["experiment", "--data", str(glyph_root), "--out", str(out), "--config", str(config)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    split, classes = report["split"], report["split"]["classes"]
    every = sorted(p.name for p in glyph_root.iterdir() if p.is_dir())
    assert sorted(classes["train"] + classes["val"] + classes["search"]) == every
    assert len(classes["search"]) == 6 and len(classes["val"]) == 2  # >= 6 training: 2
    assert report["open_set"] and split["seed"] == 1
    distractors = split["images"]["gallery"] - split["images"]["val_gallery"]
    assert split["val_distractors"]["images"] == distractors > 0
    protocol = report["protocol"]
    assert protocol.startswith("open set, split by class (seed 1)")
    for role in ("train", "val", "search"):
        assert f"{len(classes[role])} classes ({', '.join(classes[role][:5])}" in protocol
    assert report["sizes"] == split["images"]
    assert split["images"]["gallery"] + split["images"]["query"] == 6 * len(
        list((glyph_root / classes["search"][0]).glob("*.png"))
    )
    assert len(set(split["fingerprints"].values())) == len(PARTS)
    assert report["config"]["spec"]["height"] == 16 and report["config"]["spec"]["channels"] == 3
    assert {"sym:query", "kd:resnet", "unified:ensemble", "to-query:ensemble"} <= set(
        report["settings"]
    )
    for name, metrics in report["settings"].items():
        for key in ("recall_at_1", "recall_at_5", "map_at_r"):
            assert 0 <= metrics[key] <= 1, (name, key)
    # against N: the whole line-up's row is the mode's ensemble and plain mean themselves
    settings = report["settings"]
    for mode, curve in report["against_n"].items():
        assert [(r["n"], r["subsets"]) for r in curve["rows"]] == [(1, 2), (2, 1)]
        for key in ("recall_at_1", "map_at_r"):
            whole = curve["rows"][-1]
            assert whole[f"ensemble_{key}"] == pytest.approx(settings[f"{mode}:ensemble"][key])
            assert whole[f"mean_{key}"] == pytest.approx(settings[f"{mode}:mean"][key])
    assert "| setting | Recall@1 (%)" in result.output and "Protocol: open set" in result.output
    assert (out / "report.md").read_text().count(protocol) == 1
    # `cmce eval` reads the run's heads, which fuse the query model's own member too
    models, mode = out / "models", report["default_mode"]
    args = ["eval", "--query", models / "query", "--heads", out / "heads" / mode, "--json"]
    for g in ("resnet", "widecnn"):
        args += ["--gallery-model", models / g]
    args += ["--gallery-images", glyph_root, "--query-images", glyph_root]
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)["settings"]
    assert set(rows) == {"sym:query", *(f"{mode}:{m}" for m in ("resnet", "widecnn", "query"))} | {
        f"{mode}:ensemble"
    }
    assert rows["sym:query"]["recall_at_1"] > 0.9  # every query is in the gallery (8-d ties)
    assert all(0 < m["map_at_r"] <= 1 for m in rows.values())


def test_explicit_folders_that_leak_are_refused(glyph_root, tmp_path):
    train, gallery, query = (tmp_path / p for p in ("t", "g", "q"))
    for folder, names in ((train, "ABCD"), (gallery, "DEF"), (query, "DEF")):
        for char in names:
            shutil.copytree(next(glyph_root.glob(f"*_{char}")), folder / char)
    args = ["experiment", "--train", str(train), "--gallery", str(gallery), "--query", str(query)]
    result = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "out")])
    assert result.exit_code == 5
    assert "1 training class(es) are also gallery/query classes: D;" in result.output


def test_cli_usage_errors(tmp_path, glyph_root):
    run = CliRunner().invoke
    result = run(main, ["experiment", "--out", str(tmp_path)])
    assert (
        result.exit_code == 2 and "give --data ROOT, or --train/--gallery/--query" in result.output
    )
    result = run(main, ["experiment", "--train", str(glyph_root), "--out", str(tmp_path)])
    assert (
        result.exit_code == 5
        and "give all three of --train, --gallery and --query" in result.output
    )
    bad = tmp_path / "bad.toml"
    bad.write_text("[heads]\nepochs = 0\n")
    result = run(
        main,
        ["experiment", "--data", str(glyph_root), "--out", str(tmp_path), "--config", str(bad)],
    )
    assert result.exit_code == 5
    assert f"error: {bad}: heads.epochs: epochs must be at least 1" in result.output


def test_lineup_checked_against_the_input_spec_before_training():
    cfg = replace(load_config("digits"), spec=InputSpec(9, 9, 1))
    with pytest.raises(
        ConfigError, match=r"gallery_models\[2\] \(vit\): cannot build vit for 9x9x1"
    ):
        check_lineup(cfg)


def test_input_spec_option_sets_the_shape_mean_std_from_training(glyph_root):
    cfg = with_input_spec(load_config(data=glyph_root), (12, 12, 1))
    assert cfg.spec.shape == (12, 12, 1)
    train = load_splits(cfg).train.images / 255.0
    assert cfg.spec.mean[0] == pytest.approx(train.mean(), abs=2e-3)
    assert cfg.spec.std[0] == pytest.approx(train.std(), abs=2e-3)


def test_imported_checkpoint_as_a_gallery_model(tmp_path):
    try:  # tests/ as a package or as a plain folder on sys.path
        from . import external_net
    except ImportError:
        import external_net

    entry = f"{external_net.__name__}:tiny_net"
    weights = tmp_path / "w.safetensors"
    save_file(external_net.tiny_net(width=4).state_dict(), str(weights))
    folder = tmp_path / "mine"
    import_external(folder, entry, weights, InputSpec(8, 8, 1), external_net.FEATURES, {"width": 4})
    path = tmp_path / "c.toml"
    path.write_text(f'diversity = {{}}\n[[gallery_models]]\ncheckpoint = "{folder}"\n')
    cfg = load_config("digits", path)
    (ms,) = cfg.gallery_models
    assert ms.name == "mine" and ms.checkpoint == folder
    train = load_splits(cfg).train
    with pytest.raises(TrustError, match="--trust-code"):
        get_model(ms, cfg, train, tmp_path / "models", "gallery")
    model, config = get_model(
        ms, replace(cfg, trust=(entry,)), train, tmp_path / "models", "gallery"
    )
    assert model.embedding_dim == external_net.FEATURES and config["role"] == "gallery"
    assert not (tmp_path / "models").exists()  # used as it is, nothing trained
    wrong = replace(cfg, spec=InputSpec(16, 16, 1), trust=(entry,))
    with pytest.raises(ConfigError, match="takes 8x8x1 images, the experiment's are 16x16x1"):
        get_model(ms, wrong, train, tmp_path / "models", "gallery")
