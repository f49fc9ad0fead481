"""Checkpoints cannot run code unless trusted by name, a config edited after saving is refused,
and a hostile config.json gives one line (issue 12: "What to build" 2, "Why" 2 and 7)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from gallery_builder.cli import options
from gallery_builder.cli.build import main as build_cli
from gallery_builder.cli.main import main as cmce_cli
from gallery_builder.models import (
    create_model,
    import_external,
    import_torchscript,
    load_model,
    registered_identity,
    save_model,
)
from gallery_builder.models.checkpoint import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    fingerprint,
    read_weights,
    save_checkpoint,
)
from gallery_builder.models.saving import TRUST_FLAG
from gallery_builder.training.heads import load_heads
from query_sdk.errors import CheckpointError, TrustError
from query_sdk.gallery_format import verify_gallery
from query_sdk.spec import InputSpec

try:  # tests/ as a package or as a plain folder on sys.path
    from . import external_net
except ImportError:
    import external_net

ENTRY_POINT = f"{external_net.__name__}:tiny_net"
SPEC = InputSpec(8, 8, 1, mean=(0.3,), std=(0.4,))  # the digits' spec
CHECKPOINT_EXIT = CheckpointError.exit_code


def invoke(cli, *args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def external_folder(root: Path, name: str = "ext") -> Path:
    """A real imported model: tests/external_net.py's factory with its own weights."""
    torch.manual_seed(3)
    weights = root / f"{name}.safetensors"
    save_file(external_net.tiny_net(width=4).state_dict(), str(weights))
    import_external(root / name, ENTRY_POINT, weights, SPEC, external_net.FEATURES, {"width": 4})
    return root / name


def shell_identity(marker: Path) -> dict:
    return {
        "architecture": "external",
        "entry_point": "subprocess:run",
        "kwargs": {"args": f"touch {marker}", "shell": True},
        "feature_dim": external_net.FEATURES,
        "embedding_dim": None,
        "input_spec": SPEC.to_dict(),
    }


def forged_folder(root: Path, marker: Path) -> Path:
    """What an attacker sends: a consistent folder (hashes recomputed, nothing is secret) whose
    config imports subprocess.run with a shell command."""
    ext = external_folder(root, "genuine")
    config = json.loads((ext / CONFIG_FILE).read_text())
    state = read_weights(ext, config)
    config = {**config, "identity": shell_identity(marker)}
    del config["fingerprint"]
    save_checkpoint(root / "evil", state, config)
    return root / "evil"


def edit_config(folder: Path, change, refingerprint: bool = True) -> None:
    """Edit config.json by hand, recomputing the fingerprint the way the old code checked it."""
    file = folder / CONFIG_FILE
    config = json.loads(file.read_text())
    change(config)
    if refingerprint:
        config["fingerprint"] = fingerprint(read_weights_unchecked(folder), config["identity"])
    file.write_text(json.dumps(config))


def read_weights_unchecked(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(folder / WEIGHTS_FILE)


# ----------------------------------------------------------------------------- code needs trust


def test_forged_subprocess_config_does_not_run(tmp_path):
    marker = tmp_path / "pwned"
    evil = forged_folder(tmp_path, marker)
    with pytest.raises(TrustError) as err:
        load_model(evil)
    message = str(err.value)
    assert not marker.exists()
    assert "\n" not in message
    assert str(evil / CONFIG_FILE) in message
    assert "import module 'subprocess' and call run(" in message
    assert f'args="touch {marker}"' in message and "shell=true" in message
    assert f"{TRUST_FLAG} subprocess:run" in message and f"{TRUST_FLAG} {evil}" in message
    # trusting another entry point or another folder does not trust this one
    with pytest.raises(TrustError):
        load_model(evil, trust=[ENTRY_POINT, tmp_path / "genuine"])
    assert not marker.exists()


def test_forged_config_does_not_run_through_build_gallery(tmp_path):
    """The probe's case: `cmce-build-gallery build --models DIR` on a folder someone sent."""
    marker = tmp_path / "pwned"
    evil = forged_folder(tmp_path, marker)
    r = invoke(
        build_cli,
        "build",
        "--models",
        evil,
        "--heads",
        tmp_path / "heads",
        "--images",
        "digits",
        "--out",
        tmp_path / "gallery",
    )
    assert r.exit_code == CHECKPOINT_EXIT, r.output
    assert not marker.exists()
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: ")
    assert "subprocess" in r.stderr and f"{TRUST_FLAG} subprocess:run" in r.stderr


def test_config_edited_to_run_a_command_is_refused_as_edited(tmp_path):
    """Editing a genuine folder's config (fingerprint recomputed as the old check wanted) is
    caught by the weights file before anything is imported."""
    marker = tmp_path / "pwned"
    ext = external_folder(tmp_path)
    edit_config(ext, lambda c: c.update(identity=shell_identity(marker)))
    with pytest.raises(CheckpointError, match="was edited after") as err:
        load_model(ext, trust=["subprocess:run"])
    assert not isinstance(err.value, TrustError)
    assert not marker.exists()


def test_trusted_external_model_loads_by_entry_point_or_folder(tmp_path):
    ext = external_folder(tmp_path)
    with pytest.raises(TrustError, match=f"{TRUST_FLAG} {ENTRY_POINT}"):
        load_model(ext)
    images = torch.randint(0, 256, (4, *SPEC.shape), dtype=torch.uint8)
    a, config = load_model(ext, trust=[ENTRY_POINT])
    b, _ = load_model(ext, trust=[str(ext)])
    with torch.no_grad():
        out = a(images)
        assert torch.equal(out, b(images))
    assert out.shape == (4, external_net.FEATURES)
    assert config["identity"]["entry_point"] == ENTRY_POINT


def test_torchscript_needs_its_folder_trusted(tmp_path):
    torch.manual_seed(3)
    net = external_net.tiny_net(width=4).eval()
    ts = tmp_path / "user.ts"
    torch.jit.trace(net, torch.randn(2, 1, 8, 8)).save(str(ts))
    import_torchscript(tmp_path / "ts", ts, SPEC, external_net.FEATURES)
    with pytest.raises(TrustError) as err:
        load_model(tmp_path / "ts", trust=[ENTRY_POINT])  # an entry point does not trust it
    assert "TorchScript" in str(err.value) and f"{TRUST_FLAG} {tmp_path / 'ts'}" in str(err.value)
    model, _ = load_model(tmp_path / "ts", trust=[tmp_path / "ts"])
    assert model(torch.zeros(1, *SPEC.shape, dtype=torch.uint8)).shape == (1, 16)


@pytest.mark.parametrize(
    "entry_point",
    ["os.system", "os:system;rm", "os:", ":system", "os:system.__call__", "a b:c", 7],
)
def test_entry_point_must_be_a_module_path_and_an_attribute(tmp_path, entry_point):
    ext = external_folder(tmp_path)
    config = json.loads((ext / CONFIG_FILE).read_text())
    config["identity"]["entry_point"] = entry_point
    del config["fingerprint"]
    save_checkpoint(ext, read_weights_unchecked(ext), config)  # consistent: only this is wrong
    with pytest.raises(CheckpointError, match="entry_point' must be str|entry point must look"):
        load_model(ext, trust=[ext])


def test_trust_flag_end_to_end(tmp_path):
    """`--trust-code` on `cmce train heads` and `cmce-build-gallery build/add`, both spellings."""
    ext = external_folder(tmp_path)
    query = create_model("resnet", SPEC, 16, width=4)
    save_model(
        tmp_path / "query", query, registered_identity("resnet", SPEC, 16, width=4), "query", {}
    )
    heads = [
        "train", "heads", "--query", tmp_path / "query", "--gallery-model", ext,
        "--data", "digits", "--out", tmp_path / "heads", "--dim", 16, "--epochs", 1,
    ]  # fmt: skip
    r = invoke(cmce_cli, *heads)
    assert r.exit_code == CHECKPOINT_EXIT and f"{TRUST_FLAG} {ENTRY_POINT}" in r.stderr
    assert not (tmp_path / "heads").exists()
    r = invoke(cmce_cli, *heads, TRUST_FLAG, ENTRY_POINT)
    assert r.exit_code == 0, r.output
    build = [
        "build", "--models", ext, "--models", tmp_path / "query", "--heads", tmp_path / "heads",
        "--images", "digits",
        "--out", tmp_path / "gallery", "--shard-size", 1000,
    ]  # fmt: skip
    r = invoke(build_cli, *build)
    assert r.exit_code == CHECKPOINT_EXIT and not (tmp_path / "gallery" / "manifest.json").exists()
    r = invoke(build_cli, *build, TRUST_FLAG, ext)
    assert r.exit_code == 0, r.output
    before = verify_gallery(tmp_path / "gallery").count
    r = invoke(build_cli, "add", "--gallery", tmp_path / "gallery", "--images", "digits")
    assert r.exit_code == CHECKPOINT_EXIT and TRUST_FLAG in r.stderr
    assert verify_gallery(tmp_path / "gallery").count == before


def test_cli_flag_spelling_is_the_one_in_the_errors():
    assert options.TRUST_FLAG == TRUST_FLAG


# ----------------------------------------------------------------------------- edited configs


def small_model(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    model = create_model("resnet", SPEC, 16, width=4)
    save_model(
        tmp_path / "m", model, registered_identity("resnet", SPEC, 16, width=4), "gallery", {}
    )
    return tmp_path / "m"


EDITS = {
    "architecture": lambda c: c["identity"].update(architecture="widecnn"),
    "identity embedding_dim": lambda c: c["identity"].update(embedding_dim=8),
    "embedding_dim": lambda c: c.update(embedding_dim=8),  # outside the identity block
    "role": lambda c: c.update(role="query"),
}


@pytest.mark.parametrize("edit", EDITS)
def test_edited_config_is_refused(tmp_path, edit):
    folder = small_model(tmp_path)
    edit_config(folder, EDITS[edit])
    with pytest.raises(CheckpointError, match="was edited after") as err:
        load_model(folder)
    assert str(folder / CONFIG_FILE) in str(err.value) and "save the model again" in str(err.value)


def test_checkpoint_written_before_config_sha256_still_loads(tmp_path):
    """The old writer put only the fingerprint in the weights header: such folders load, and
    an edited identity in them is still refused."""
    torch.manual_seed(0)
    model = create_model("resnet", SPEC, 16, width=4)
    identity = registered_identity("resnet", SPEC, 16, width=4)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    config = {
        "kind": "model",
        "identity": identity,
        "role": "gallery",
        "embedding_dim": 16,
        "input_spec": SPEC.to_dict(),
        "training": {},
        "fingerprint": fingerprint(state, identity),
    }
    old = tmp_path / "old"
    old.mkdir()
    save_file(state, str(old / WEIGHTS_FILE), metadata={"fingerprint": config["fingerprint"]})
    (old / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True))
    loaded, loaded_config = load_model(old)
    assert loaded_config["fingerprint"] == config["fingerprint"]
    edit_config(old, EDITS["architecture"])
    with pytest.raises(CheckpointError, match="was edited after"):
        load_model(old)


# ----------------------------------------------------------------------------- hostile configs

BAD_CONFIGS = {
    "deep JSON": ("[" * 100_000 + "]" * 100_000, "JSON nested deeper than"),
    "not an object": ("[1, 2]", "expected a JSON object, found list"),
    "no identity": (
        {"kind": "model", "fingerprint": "0" * 16, "role": "gallery"},
        "missing key 'identity'",
    ),
    "identity not an object": (
        {"kind": "model", "identity": "resnet", "fingerprint": "0" * 16},
        "key 'identity' must be dict, found str",
    ),
    "embedding_dim a string": (
        {"embedding_dim": "16"},
        "key 'embedding_dim' must be int, found str",
    ),
    "no architecture": ({"identity": {"input_spec": {}}}, "missing key 'identity.architecture'"),
    "not UTF-8": (b"\xff\xfe{", "not UTF-8"),
}


def write_bad_config(folder: Path, content) -> None:
    file = folder / CONFIG_FILE
    if isinstance(content, dict):  # a change to the genuine config
        config = json.loads(file.read_text())
        content = json.dumps({**config, **content} if "kind" not in content else content)
    file.write_bytes(content if isinstance(content, bytes) else content.encode())


@pytest.mark.parametrize("case", BAD_CONFIGS)
def test_hostile_model_config_is_one_line_through_the_cli(tmp_path, case):
    folder = small_model(tmp_path)
    content, expected = BAD_CONFIGS[case]
    write_bad_config(folder, content)
    r = invoke(
        build_cli, "build", "--models", folder, "--heads", tmp_path / "h", "--images", "digits",
        "--out", tmp_path / "g",
    )  # fmt: skip
    assert r.exit_code == CHECKPOINT_EXIT, r.output
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.output
    assert str(folder / CONFIG_FILE) in r.stderr and expected in r.stderr


@pytest.fixture(scope="module")
def heads_folder(tmp_path_factory):
    """A real heads folder (to-query heads for one small gallery model)."""
    root = tmp_path_factory.mktemp("heads")
    torch.manual_seed(0)
    for name, dim, role in (("g", 24, "gallery"), ("q", 16, "query")):
        model = create_model("resnet", SPEC, dim, width=4)
        save_model(root / name, model, registered_identity("resnet", SPEC, dim, width=4), role, {})
    r = invoke(
        cmce_cli, "train", "heads", "--mode", "to-query", "--query", root / "q",
        "--gallery-model", root / "g", "--data", "digits", "--out", root / "heads",
        "--epochs", 1,
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    return root


HEADS_EDITS = {
    "no identity": (lambda c: c.pop("identity"), "missing key 'identity'"),
    "dims not ints": (
        lambda c: c["identity"].update(dim="16"),
        "key 'identity.dim' must be int, found str",
    ),
    "gallery entry not an object": (
        lambda c: c.update(gallery_models=["g"]),
        "key 'gallery_models.0' must be an object",
    ),
    "no query fingerprint": (
        lambda c: c.pop("query_fingerprint"),
        "missing key 'query_fingerprint'",
    ),
}


@pytest.mark.parametrize("case", HEADS_EDITS)
def test_hostile_heads_config_is_one_line_through_the_cli(heads_folder, tmp_path, case):
    import shutil

    heads = tmp_path / "heads"
    shutil.copytree(heads_folder / "heads", heads)
    change, expected = HEADS_EDITS[case]
    edit_config(heads, change, refingerprint=False)
    r = invoke(
        cmce_cli, "train", "update", "--heads", heads, "--query", heads_folder / "q",
        "--data", "digits", "--out", tmp_path / "new",
    )  # fmt: skip
    assert r.exit_code == CHECKPOINT_EXIT, r.output
    assert r.stderr.count("\n") == 1 and str(heads / CONFIG_FILE) in r.stderr
    assert expected in r.stderr


# ----------------------------------------------------------------------------- sizes in configs

_PEAK = """
import re, sys
from pathlib import Path
from gallery_builder.models import load_model
from gallery_builder.training.heads import load_heads
from query_sdk.errors import CheckpointError
def high_water():  # VmHWM: this process's peak RSS (ru_maxrss would include the parent's)
    return int(re.search(r"VmHWM:\\s+(\\d+)", Path("/proc/self/status").read_text())[1])
before = high_water()
try:
    (load_heads if sys.argv[1] == "heads" else load_model)(Path(sys.argv[2]))
    print("loaded")
except CheckpointError as e:
    print("refused: shape mismatches" if "shape mismatches" in str(e) else repr(e))
print((high_water() - before) // 1024)
"""


def peak_mib_of_loading(kind: str, folder: Path) -> tuple[str, int]:
    out = subprocess.run(
        [sys.executable, "-c", _PEAK, kind, str(folder)],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parents[1],
    ).stdout.split("\n")
    return out[0], int(out[1])


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmHWM from /proc")
def test_sizes_in_a_forged_config_allocate_nothing_before_the_weights_check(heads_folder, tmp_path):
    """A consistent forgery whose config asks for 8000-wide MLP heads (256 MB of parameters)
    over the small real (linear) weights: refused by shape, on the meta device, before any
    allocation."""
    heads = tmp_path / "heads"
    config = json.loads((heads_folder / "heads" / CONFIG_FILE).read_text())
    state = read_weights(heads_folder / "heads", config)
    config["identity"].update(hidden=8000, layers=2)
    del config["fingerprint"]
    save_checkpoint(heads, state, config)
    with pytest.raises(CheckpointError, match="shape mismatches"):
        load_heads(heads)
    message, peak = peak_mib_of_loading("heads", heads)
    assert message == "refused: shape mismatches"
    assert peak < 64, f"loading took {peak} MiB above the imports"
