"""Tests for gallery_builder.models (registry, architectures, complexity), model checkpoints
(gallery_builder.models.saving + gallery_builder.models.checkpoint) and the training of models
(gallery_builder.training.fit: the one fit loop)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from gallery_builder.evaluation.experiment import PRESETS
from gallery_builder.models import (
    EmbeddingNet,
    create_model,
    import_external,
    import_torchscript,
    list_models,
    load_model,
    mflops,
    model_role,
    recommended_lr,
    register_model,
    registered_identity,
    save_model,
)
from gallery_builder.models.checkpoint import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    CheckpointError,
    fingerprint,
)
from gallery_builder.training.fit import TrainSettings, fit, train_distilled, train_metric
from gallery_builder.training.heads import HeadSettings
from query_sdk.errors import DataError
from query_sdk.spec import InputSpec

try:  # tests/ as a package or as a plain folder on sys.path
    from . import external_net
except ImportError:
    import external_net

ENTRY_POINT = f"{external_net.__name__}:tiny_net"
SMALL_SPEC = InputSpec(8, 8, 1, mean=(0.3,), std=(0.4,))


def uint8_images(n: int, spec: InputSpec, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, *spec.shape), generator=gen, dtype=torch.uint8)


def preset_models(preset: str):
    cfg = PRESETS[preset]()
    return cfg, [*cfg.gallery_models, cfg.query_model]


# ----------------------------------------------------------------------------- registry


def test_registry_roles():
    gallery = list_models(role="gallery")
    query = list_models(role="query")
    assert len(gallery) >= 3
    assert len(query) >= 1
    assert not set(gallery) & set(query)
    assert sorted(gallery + query) == list_models()
    assert all(model_role(n) == "gallery" for n in gallery)
    assert all(model_role(n) == "query" for n in query)


def test_registry_errors():
    with pytest.raises(ValueError, match="unknown architecture 'nope'; known: "):
        create_model("nope", SMALL_SPEC)
    with pytest.raises(ValueError, match="unknown architecture"):
        model_role("nope")
    with pytest.raises(ValueError, match="already registered"):
        register_model(list_models()[0], role="gallery")(lambda *a, **k: None)
    with pytest.raises(ValueError, match="role must be"):
        register_model("never-registered", role="both")


def test_list_models_pattern():
    names = list_models()
    assert list_models("*") == names
    assert list_models("zzz*") == []
    first = names[0]
    assert first in list_models(first[:2] + "*")


# ----------------------------------------------------------------------------- architectures


def test_query_model_is_ten_times_lighter_than_every_gallery_model():
    cfg, _ = preset_models("default")
    q = cfg.query_model
    query_flops = mflops(
        create_model(q.architecture, cfg.spec, q.embedding_dim, **q.kwargs), cfg.spec
    )
    gallery_flops = [
        mflops(create_model(g.architecture, cfg.spec, g.embedding_dim, **g.kwargs), cfg.spec)
        for g in cfg.gallery_models
    ]
    assert query_flops > 0
    assert query_flops <= min(gallery_flops) / 10, (query_flops, gallery_flops)


def test_mflops_of_a_single_linear_layer():
    # 2x2 grey image, no backbone layers, a 4 -> 3 projection: 2 * 4 * 3 = 24 FLOPs
    spec = InputSpec(2, 2, 1)
    model = EmbeddingNet(torch.nn.Flatten(), 4, 3, spec)
    assert mflops(model, spec) == pytest.approx(24e-6)


@pytest.mark.parametrize("preset", ["default", "digits"])
def test_every_preset_model_gives_normalised_embeddings(preset):
    cfg, models = preset_models(preset)
    images = uint8_images(3, cfg.spec)
    for ms in models:
        torch.manual_seed(0)
        model = create_model(ms.architecture, cfg.spec, ms.embedding_dim, **ms.kwargs).eval()
        assert model.embedding_dim == ms.embedding_dim
        with torch.no_grad():
            out = model(images)
            as_float = model(images.float())
        assert out.shape == (3, ms.embedding_dim), ms.name
        assert out.dtype == torch.float32
        torch.testing.assert_close(out.norm(dim=-1), torch.ones(3), atol=1e-5, rtol=0)
        # float input in 0..255 is the same image
        torch.testing.assert_close(as_float, out)
        # in train mode (batch statistics; a fresh net in eval mode can be nearly constant)
        # black, white and half-white images get different embeddings
        h = cfg.spec.height
        plain = torch.zeros(3, *cfg.spec.shape, dtype=torch.uint8)
        plain[1], plain[2, : h // 2] = 255, 255
        with torch.no_grad():
            train_out = model.train()(plain)
        sims = train_out @ train_out.T
        assert (sims[~torch.eye(3, dtype=torch.bool)] < 0.999).all(), (ms.name, sims)


def test_preprocess_values():
    spec = InputSpec(1, 2, 3, mean=(0.5, 0.25, 0.0), std=(0.5, 0.25, 1.0))
    model = EmbeddingNet(torch.nn.Flatten(), 6, None, spec)
    images = torch.tensor([[[[255, 0, 51], [0, 255, 255]]]], dtype=torch.uint8)  # (1, 1, 2, 3)
    x = model.preprocess(images)
    assert x.shape == (1, 3, 1, 2)
    # channel 0: (1 - .5)/.5 = 1, (0 - .5)/.5 = -1; channel 1: (0 - .25)/.25 = -1,
    # (1 - .25)/.25 = 3; channel 2: 51/255 = 0.2, 1.0
    expected = torch.tensor([[[[1.0, -1.0]], [[-1.0, 3.0]], [[0.2, 1.0]]]])
    torch.testing.assert_close(x, expected)


def test_vit_patch_must_divide_the_input():
    with pytest.raises(ValueError, match="input 28x28 is not divisible by patch size 5"):
        create_model("vit", InputSpec(28, 28, 1), 32, patch=5, dim=16, depth=1, heads=2)
    with pytest.raises(ValueError, match="input 8x12 is not divisible by patch size 8"):
        create_model("vit", InputSpec(8, 12, 1), 32, patch=8, dim=16, depth=1, heads=2)


@pytest.mark.parametrize(
    "spec, patch, convs", [((32, 32, 3), None, 3), ((28, 28, 1), 14, 1), ((28, 28, 1), 7, 0)]
)
def test_vit_conv_stem_reaches_the_patch_grid(spec, patch, convs):
    """One stride-2 3x3 convolution per factor 2 of the patch, then a projection over the
    rest: the stem's output is the patch grid, with the encoder's width."""
    spec = InputSpec(*spec)
    model = create_model("vit", spec, 32, patch=patch, dim=16, depth=1, heads=2, conv_stem=True)
    stem = model.backbone.patchify
    assert sum(isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3) for m in stem) == convs
    x = model.preprocess(torch.zeros(2, *spec.shape, dtype=torch.uint8))
    p = patch or 8  # auto_patch: a 4x4 grid of 32x32
    assert stem(x).shape == (2, 16, spec.height // p, spec.width // p)
    assert model.eval()(torch.zeros(2, *spec.shape, dtype=torch.uint8)).shape == (2, 32)


def test_rgb_spec_works():
    spec = InputSpec(8, 8, 3)
    model = create_model("resnet", spec, 10, width=4).eval()
    with torch.no_grad():
        out = model(uint8_images(2, spec))
    assert out.shape == (2, 10)


# ----------------------------------------------------------------------------- checkpoints


def small_model(seed: int = 0, width: int = 4) -> tuple[EmbeddingNet, dict]:
    """A small resnet whose BatchNorm statistics are no longer the defaults."""
    torch.manual_seed(seed)
    model = create_model("resnet", SMALL_SPEC, 16, width=width)
    model.train()
    with torch.no_grad():
        model(uint8_images(8, SMALL_SPEC, seed=seed + 100))
    identity = registered_identity("resnet", SMALL_SPEC, 16, width=width)
    return model.eval(), identity


def test_save_load_round_trip(tmp_path):
    model, identity = small_model()
    config = save_model(tmp_path / "m", model, identity, "gallery", {"data": "unit-test"})
    assert (tmp_path / "m" / CONFIG_FILE).is_file()
    assert (tmp_path / "m" / WEIGHTS_FILE).is_file()
    loaded, loaded_config = load_model(tmp_path / "m")
    assert not loaded.training
    assert loaded_config == config
    assert loaded_config["fingerprint"] == config["fingerprint"]
    assert len(config["fingerprint"]) == 16
    assert fingerprint(loaded.state_dict(), identity) == config["fingerprint"]
    assert loaded.input_spec == SMALL_SPEC
    assert config["embedding_dim"] == 16 and config["role"] == "gallery"
    images = uint8_images(5, SMALL_SPEC, seed=1)
    with torch.no_grad():
        assert torch.equal(loaded(images), model(images))
    # saving the same model again gives the same fingerprint; another model does not
    again = save_model(tmp_path / "m2", model, identity, "gallery", {"data": "unit-test"})
    assert again["fingerprint"] == config["fingerprint"]
    other = save_model(tmp_path / "m3", small_model(seed=1)[0], identity, "gallery", {})
    assert other["fingerprint"] != config["fingerprint"]


def edit_config(folder: Path, change) -> None:
    file = folder / CONFIG_FILE
    config = json.loads(file.read_text())
    change(config)
    file.write_text(json.dumps(config))


def test_edited_identity_is_caught(tmp_path):
    model, identity = small_model()
    save_model(tmp_path / "m", model, identity, "gallery", {})
    edit_config(tmp_path / "m", lambda c: c["identity"]["kwargs"].update(width=8))
    with pytest.raises(CheckpointError, match="does not match"):
        load_model(tmp_path / "m")


def test_edited_identity_with_a_matching_fingerprint_is_still_caught(tmp_path):
    """Someone edits the width and 'fixes' the fingerprint: the weights file gives it away."""
    model, identity = small_model()
    save_model(tmp_path / "m", model, identity, "gallery", {})

    def change(c):
        c["identity"]["kwargs"]["width"] = 8
        c["fingerprint"] = fingerprint(model.state_dict(), c["identity"])

    edit_config(tmp_path / "m", change)
    with pytest.raises(CheckpointError, match="was edited after") as err:
        load_model(tmp_path / "m")
    assert WEIGHTS_FILE in str(err.value) and CONFIG_FILE in str(err.value)


def test_replaced_weights_are_caught(tmp_path):
    model, identity = small_model(seed=0)
    other, _ = small_model(seed=1)
    save_model(tmp_path / "a", model, identity, "gallery", {})
    save_model(tmp_path / "b", other, identity, "gallery", {})
    (tmp_path / "a" / WEIGHTS_FILE).write_bytes((tmp_path / "b" / WEIGHTS_FILE).read_bytes())
    with pytest.raises(CheckpointError) as err:
        load_model(tmp_path / "a")
    message = str(err.value)
    assert str(tmp_path / "a" / WEIGHTS_FILE) in message
    assert str(tmp_path / "a" / CONFIG_FILE) in message


def test_missing_folder_and_missing_weights(tmp_path):
    with pytest.raises(CheckpointError, match="not a checkpoint folder"):
        load_model(tmp_path / "does-not-exist")
    model, identity = small_model()
    save_model(tmp_path / "m", model, identity, "gallery", {})
    (tmp_path / "m" / WEIGHTS_FILE).unlink()
    with pytest.raises(CheckpointError, match=f"missing {WEIGHTS_FILE}"):
        load_model(tmp_path / "m")


def test_wrong_kind_and_bad_json(tmp_path):
    model, identity = small_model()
    save_model(tmp_path / "m", model, identity, "gallery", {})
    edit_config(tmp_path / "m", lambda c: c.update(kind="heads"))
    with pytest.raises(CheckpointError, match="expected a model checkpoint, found 'heads'"):
        load_model(tmp_path / "m")
    (tmp_path / "m" / CONFIG_FILE).write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_model(tmp_path / "m")


@pytest.mark.parametrize("damage", ["half", "header", "empty", "junk"])
def test_corrupt_weights_file_raises_checkpoint_error(tmp_path, damage):
    model, identity = small_model()
    save_model(tmp_path / "m", model, identity, "gallery", {})
    file = tmp_path / "m" / WEIGHTS_FILE
    data = file.read_bytes()
    file.write_bytes(
        {
            "half": data[: len(data) // 2],
            "header": data[:6],
            "empty": b"",
            "junk": b"\x00\xff" * 100,
        }[damage]
    )
    with pytest.raises(CheckpointError, match=WEIGHTS_FILE):
        load_model(tmp_path / "m")


# ----------------------------------------------------------------------------- user backbones


def reference_features(net: torch.nn.Module, images: torch.Tensor, spec: InputSpec):
    """What EmbeddingNet should compute around a backbone, written out by hand."""
    x = images.permute(0, 3, 1, 2).float() / 255.0
    x = (x - spec.mean[0]) / spec.std[0]
    with torch.no_grad():
        return F.normalize(net(x), dim=-1)


@pytest.fixture
def user_net(tmp_path):
    torch.manual_seed(3)
    net = external_net.tiny_net(width=4).eval()
    weights = tmp_path / "user.safetensors"
    save_file(net.state_dict(), str(weights))
    return net, weights


def test_import_external_round_trip(tmp_path, user_net):
    net, weights = user_net
    config = import_external(
        tmp_path / "ext",
        ENTRY_POINT,
        weights,
        SMALL_SPEC,
        external_net.FEATURES,
        kwargs={"width": 4},
    )
    assert config["identity"]["architecture"] == "external"
    assert config["embedding_dim"] == external_net.FEATURES
    model, loaded_config = load_model(tmp_path / "ext", trust=[ENTRY_POINT])
    assert loaded_config["fingerprint"] == config["fingerprint"]
    images = uint8_images(6, SMALL_SPEC, seed=2)
    with torch.no_grad():
        out = model(images)
    assert out.shape == (6, external_net.FEATURES)
    torch.testing.assert_close(out, reference_features(net, images, SMALL_SPEC))


def test_import_external_wrong_feature_dim(tmp_path, user_net):
    _, weights = user_net
    with pytest.raises(CheckpointError, match=r"returns shape \(16,\) per image, expected \(8,\)"):
        import_external(tmp_path / "ext", ENTRY_POINT, weights, SMALL_SPEC, 8, kwargs={"width": 4})
    assert not (tmp_path / "ext" / CONFIG_FILE).exists()


def test_import_external_weights_not_matching_the_factory(tmp_path, user_net):
    _, weights = user_net
    with pytest.raises(CheckpointError, match="shape mismatches"):
        import_external(
            tmp_path / "ext",
            ENTRY_POINT,
            weights,
            SMALL_SPEC,
            external_net.FEATURES,
            kwargs={"width": 8},
        )


def test_import_external_bad_inputs(tmp_path, user_net):
    _, weights = user_net
    with pytest.raises(CheckpointError, match="entry point must look like"):
        import_external(tmp_path / "e1", "external_net.tiny_net", weights, SMALL_SPEC, 16)
    with pytest.raises(CheckpointError, match="cannot import"):
        import_external(
            tmp_path / "e2", f"{external_net.__name__}:nothing_here", weights, SMALL_SPEC, 16
        )
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="unreadable safetensors file"):
        import_external(tmp_path / "e3", ENTRY_POINT, junk, SMALL_SPEC, 16)


def traced(net: torch.nn.Module, path: Path) -> Path:
    module = torch.jit.trace(net, torch.randn(3, 1, 8, 8))
    module.save(str(path))
    return path


def test_import_torchscript_round_trip(tmp_path, user_net):
    net, _ = user_net
    ts = traced(net, tmp_path / "user.ts")
    config = import_torchscript(tmp_path / "ts", ts, SMALL_SPEC, external_net.FEATURES)
    assert config["identity"]["architecture"] == "torchscript"
    model, loaded_config = load_model(tmp_path / "ts", trust=[tmp_path / "ts"])
    assert loaded_config["fingerprint"] == config["fingerprint"]
    images = uint8_images(5, SMALL_SPEC, seed=4)
    with torch.no_grad():
        out = model(images)
    assert out.shape == (5, external_net.FEATURES)
    torch.testing.assert_close(out, reference_features(net, images, SMALL_SPEC))


def test_import_torchscript_replaced_file_is_caught(tmp_path, user_net):
    net, _ = user_net
    import_torchscript(tmp_path / "ts", traced(net, tmp_path / "user.ts"), SMALL_SPEC, 16)
    torch.manual_seed(99)
    traced(external_net.tiny_net(width=4).eval(), tmp_path / "ts" / "model.ts")
    with pytest.raises(CheckpointError, match="sha256 differs"):
        load_model(tmp_path / "ts")


def test_import_torchscript_wrong_feature_dim(tmp_path, user_net):
    net, _ = user_net
    ts = traced(net, tmp_path / "user.ts")
    with pytest.raises(CheckpointError, match=r"returns shape \(16,\) per image, expected \(12,\)"):
        import_torchscript(tmp_path / "ts", ts, SMALL_SPEC, 12)
    assert not (tmp_path / "ts").exists()  # no half-made checkpoint folder is left


# ----------------------------------------------------------------------------- the fit loop


def test_fit_steps_once_per_batch_and_skips_a_last_batch_of_one():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(33, 3, generator=gen)  # 33 = 16 + 16 + 1
    y = x @ torch.tensor([1.0, -2.0, 0.5])
    model = torch.nn.Linear(3, 1, bias=False)
    torch.nn.init.zeros_(model.weight)
    batches, in_train_mode = [], []

    def loss_fn(idx, _gen):
        batches.append(idx.tolist())
        in_train_mode.append(model.training)
        return (model(x[idx])[:, 0] - y[idx]).pow(2).mean()

    s = TrainSettings(epochs=20, batch_size=16, lr=0.3, weight_decay=0.0)
    fit(model.parameters(), len(x), s, loss_fn, "regression", [model])
    assert [len(b) for b in batches] == [16, 16] * 20  # the batch of one is skipped
    epochs = [batches[i] + batches[i + 1] for i in range(0, 40, 2)]
    assert all(len(set(e)) == 32 for e in epochs)  # each epoch a shuffle without repeats
    assert len({tuple(e) for e in epochs}) == 20  # and a new one every epoch
    assert all(in_train_mode) and not model.training
    with torch.no_grad():
        assert (model(x)[:, 0] - y).pow(2).mean() < 0.01 * y.pow(2).mean()


@pytest.mark.parametrize("settings", [TrainSettings, HeadSettings])
@pytest.mark.parametrize("epochs", range(1, 7))
def test_fit_trains_on_the_smallest_budgets(settings, epochs):
    # one batch an epoch: 1 to 12 scheduler steps (heads: 10 once divided by zero in warm-up)
    x = torch.randn(16, 3, generator=torch.Generator().manual_seed(0))
    model = torch.nn.Linear(3, 1)
    before = model.weight.detach().clone()
    steps = []

    def loss_fn(idx, _gen):
        steps.append(len(idx))
        return model(x[idx]).pow(2).mean()

    s = settings(epochs=epochs, batch_size=16, lr=3e-3, weight_decay=0.0)
    fit(model.parameters(), len(x), s, loss_fn, "tiny", [model])
    assert steps == [16] * epochs
    assert not torch.equal(model.weight, before)


def test_fit_seed_repeats_a_training_run_exactly():
    """Dropout and mirroring draw random numbers: the seed governs them, whatever the global
    random state was before training."""
    images = uint8_images(48, SMALL_SPEC, seed=3)
    torch.manual_seed(4)
    teacher = create_model("mobilenet", SMALL_SPEC, 8, width=4).eval()
    s = TrainSettings(epochs=2, batch_size=16, lr=3e-3)

    def trained(seed: int, disturb: int = 0) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)  # the same initial weights every time
        model = create_model("widecnn", SMALL_SPEC, 8, width=4)
        torch.rand(disturb)
        train_distilled(model, images, teacher, replace(s, seed=seed), classes=1)
        return model.state_dict()

    first, again, other = trained(0), trained(0, disturb=7), trained(1)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)


@pytest.mark.parametrize(
    ("steps_per_class", "min_epochs", "steps"),
    [(3, 0, 24), (0, 3, 12), (1, 3, 12), (3, 3, 24)],
)
def test_metric_training_takes_at_least_its_per_class_and_per_image_floors(
    steps_per_class, min_epochs, steps
):
    """Eight classes at 3 steps each: 24 steps where ``steps`` alone asks for 4; 3 passes over
    64 images in batches of 16: 12. The model's batch norm counts the batches it saw."""
    images = uint8_images(64, SMALL_SPEC, seed=5)
    labels = torch.arange(64) % 8
    model = create_model("widecnn", SMALL_SPEC, 8, width=4)
    s = TrainSettings(
        steps=4, steps_per_class=steps_per_class, min_epochs=min_epochs, batch_size=16
    ).for_architecture("widecnn")
    train_metric(model, images, labels, s, progress=False)
    counts = {int(v) for k, v in model.state_dict().items() if k.endswith("num_batches_tracked")}
    assert counts == {steps}


def test_negative_step_floors_are_refused():
    with pytest.raises(ValueError, match="steps_per_class must be at least 0, got -1"):
        TrainSettings(steps_per_class=-1)


def test_settings_and_data_the_fit_loop_cannot_train_with_are_refused():
    with pytest.raises(
        ValueError, match=r"epochs must be at least 1 \(or unset, to follow steps\), got 0"
    ):
        TrainSettings(epochs=0)
    with pytest.raises(ValueError, match="batch size must be at least 2 .*got 1"):
        HeadSettings(batch_size=1)  # every batch would be skipped: nothing would train
    with pytest.raises(ValueError, match="learning rate must be positive, got nan"):
        TrainSettings(lr=float("nan"))
    model = create_model("widecnn", SMALL_SPEC, 8, width=4)
    with pytest.raises(DataError, match="train: 1 training samples; training needs at least 2"):
        train_metric(model, uint8_images(1, SMALL_SPEC), torch.zeros(1), TrainSettings())
    with pytest.raises(ValueError, match="train: learning rate unset .*for_architecture"):
        train_metric(model, uint8_images(4, SMALL_SPEC), torch.zeros(4), TrainSettings())


def test_an_unset_learning_rate_is_the_architectures():
    """The CNNs train at 1e-2, the ViT at 3e-3 (it collapsed at 1e-2); a given rate stays."""
    assert recommended_lr("resnet") == recommended_lr("mobilenet") == 1e-2
    assert recommended_lr("vit") == 3e-3
    assert TrainSettings().for_architecture("vit").lr == 3e-3
    assert TrainSettings(lr=0.5).for_architecture("vit").lr == 0.5
    with pytest.raises(ValueError, match="unknown architecture 'nope'"):
        recommended_lr("nope")
