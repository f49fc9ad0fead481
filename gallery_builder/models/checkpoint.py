"""Checkpoint folders: ``config.json`` (sorted, indented) + ``weights.safetensors``. No pickle.

The fingerprint names a checkpoint: 16 hex digits of sha256 over the canonical identity block
(how to rebuild the module) and every tensor. Galleries and bundles record it.

What the weights file certifies. At save time the safetensors header records the fingerprint
and ``config_sha256``, the sha256 of the canonical ``config.json``. On load both are recomputed
from the files and a mismatch is a :class:`CheckpointError` naming the folder. So a config
edited after saving (an architecture, an ``embedding_dim``, an entry point), or a config paired
with another model's weights, is refused even when its ``fingerprint`` was recomputed by hand.
Checkpoints written before ``config_sha256`` existed still load: their header's fingerprint
covers the identity block, so an edited identity is refused; edits elsewhere in such a config
are not detected until the folder is saved again (``load_model`` then ``save_model``).

What it cannot do: these are plain hashes, not signatures. Anyone who can write the folder can
rewrite both files consistently, so a fingerprint proves that a folder is the one you expect
only when you compare it with one you got over a channel you trust. Code execution is guarded
separately: a config that would import or run code is built only when the caller names it as
trusted (see ``gallery_builder.models.saving``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from query_sdk.errors import CheckpointError
from query_sdk.fileio import atomic_path, read_json, write_json_atomic

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "weights.safetensors"
MAX_CONFIG_BYTES = 8 << 20

__all__ = [
    "CONFIG_FILE",
    "WEIGHTS_FILE",
    "CheckpointError",
    "fingerprint",
    "config_sha256",
    "save_checkpoint",
    "read_config",
    "read_weights",
    "load_state_strict",
    "build_checked",
    "require_keys",
]

_INT = (int,)
_OPT_INT = (int, type(None))
# what each kind of config must hold, checked on read so that code using a config never meets
# a KeyError: key -> allowed types; a nested dict is the spec of a nested object
_COMMON = {"identity": (dict,), "fingerprint": (str,)}
_REQUIRED: dict[str, dict] = {
    "model": {
        "role": (str,),
        "embedding_dim": _INT,
        "input_spec": (dict,),
        "identity": {"architecture": (str,), "input_spec": (dict,)},
    },
    "heads": {
        "space_id": (str,),
        "query_fingerprint": (str,),
        "gallery_models": (list,),
        "training": (dict,),
        "identity": {
            "mode": (str,),
            "dim": _INT,
            "query_dim": _INT,
            "gallery_dims": (dict,),
            "num_classes": _OPT_INT,
            "hidden": _INT,
            "layers": _INT,
        },
    },
}
_HEADS_ENTRY = {"name": (str,), "fingerprint": (str,), "head_fingerprint": (str,)}


def _canonical(obj: dict) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def fingerprint(state: dict[str, torch.Tensor], identity: dict) -> str:
    """16 hex digits of sha256 over the architecture identity and every tensor, in key order."""
    h = hashlib.sha256(json.dumps(identity, sort_keys=True).encode())
    for key in sorted(state):
        t = state[key].detach().cpu().contiguous()
        h.update(f"{key}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def config_sha256(config: dict) -> str:
    """sha256 of a config's canonical JSON (sorted keys, no whitespace), as its weights certify."""
    return hashlib.sha256(_canonical(config)).hexdigest()


def save_checkpoint(path: Path, state: dict[str, torch.Tensor], config: dict) -> dict:
    """Write a checkpoint folder; adds ``fingerprint`` (from ``config["identity"]``), records
    it and the config's sha256 in the weights file, and returns the config as written."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    config = {**config, "fingerprint": fingerprint(state, config["identity"])}
    config = json.loads(_canonical(config))  # exactly what a reader gets back (tuples -> lists)
    metadata = {"fingerprint": config["fingerprint"], "config_sha256": config_sha256(config)}
    with atomic_path(path / WEIGHTS_FILE) as tmp:
        save_file(state, tmp, metadata=metadata)
    write_json_atomic(path / CONFIG_FILE, config)
    return config


def require_keys(obj: dict, spec: dict, file: Path | str, prefix: str = "") -> None:
    """CheckpointError naming ``file`` and the key unless ``obj`` has every key of ``spec``
    (key -> allowed types, or a nested spec) with a value of an allowed type."""
    for key, want in spec.items():
        name = f"{prefix}{key}"
        if key not in obj:
            raise CheckpointError(f"{file}: missing key {name!r}; re-save or re-import the model")
        value = obj[key]
        types = (dict,) if isinstance(want, dict) else want
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            allowed = " or ".join("null" if t is type(None) else t.__name__ for t in types)
            raise CheckpointError(
                f"{file}: key {name!r} must be {allowed}, found {type(value).__name__} "
                f"{json.dumps(value)[:40]}"
            )
        if isinstance(want, dict):
            require_keys(value, want, file, f"{name}.")


def read_config(path: Path, kind: str) -> dict:
    """Read ``config.json`` of a checkpoint folder of the given kind (model, heads, ...):
    bounded in size and depth, and with the keys that kind needs, of the right types."""
    path = Path(path)
    file = path / CONFIG_FILE
    if not file.exists():
        raise CheckpointError(f"{path}: not a checkpoint folder (no {CONFIG_FILE})")
    config = read_json(file, "checkpoint config", CheckpointError, MAX_CONFIG_BYTES)
    if not isinstance(config, dict):
        raise CheckpointError(f"{file}: expected a JSON object, found {type(config).__name__}")
    if config.get("kind") != kind:
        raise CheckpointError(f"{file}: expected a {kind} checkpoint, found {config.get('kind')!r}")
    require_keys(config, {**_COMMON, **_REQUIRED.get(kind, {})}, file)
    if kind == "heads":
        for i, entry in enumerate(config["gallery_models"]):
            if not isinstance(entry, dict):
                raise CheckpointError(f"{file}: key 'gallery_models.{i}' must be an object")
            require_keys(entry, _HEADS_ENTRY, file, f"gallery_models.{i}.")
    return config


def read_weights(path: Path, config: dict) -> dict[str, torch.Tensor]:
    """Load the weights and check that they certify this config (see the module docstring)."""
    path = Path(path)
    file = path / WEIGHTS_FILE
    if not file.is_file():
        raise CheckpointError(f"{path}: missing {WEIGHTS_FILE}")
    try:
        with safe_open(file, "pt") as f:
            metadata = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{file}: unreadable safetensors file ({e})") from e
    config_file = path / CONFIG_FILE
    if "fingerprint" not in metadata:
        raise CheckpointError(
            f"{file}: its header carries no fingerprint (not written by cmce?); build the "
            "module and save it with gallery_builder.models.save_model"
        )
    actual = fingerprint(state, config["identity"])
    if actual == config["fingerprint"] != metadata["fingerprint"]:
        raise CheckpointError(
            f"the identity in {config_file} was edited after {file} was saved (its fingerprint "
            f"{actual} was recomputed; the weights were saved as {metadata['fingerprint']}): "
            "restore the config, or save the model again"
        )
    if actual != config["fingerprint"] or actual != metadata["fingerprint"]:
        raise CheckpointError(
            f"{file} does not match {config_file}: weights and identity give fingerprint "
            f"{actual}, the config says {config['fingerprint']}, the weights were saved as "
            f"{metadata['fingerprint']} (was one of them replaced or edited?)"
        )
    certified = metadata.get("config_sha256")
    if certified is not None and certified != config_sha256(config):
        raise CheckpointError(
            f"{config_file} was edited after {file} was saved (the weights certify config "
            f"sha256 {certified[:16]}, the file has {config_sha256(config)[:16]}): restore the "
            "config, or save the model again"
        )
    return state


def _mismatches(module: torch.nn.Module, state: dict[str, torch.Tensor], where: Path) -> None:
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [
        f"{k}: weights {tuple(state[k].shape)} vs config {tuple(own[k].shape)}"
        for k in sorted(set(own) & set(state))
        if own[k].shape != state[k].shape
    ]
    if missing or unexpected or shapes:
        parts = [
            f"missing keys {missing[:5]}" if missing else "",
            f"unexpected keys {unexpected[:5]}" if unexpected else "",
            f"shape mismatches {shapes[:5]}" if shapes else "",
        ]
        raise CheckpointError(
            f"{where}: {WEIGHTS_FILE} does not match the architecture in {CONFIG_FILE}: "
            + "; ".join(p for p in parts if p)
        )


def load_state_strict(module: torch.nn.Module, state: dict[str, torch.Tensor], where: Path) -> None:
    """Load a state dict strictly; on mismatch list missing, unexpected and mis-shaped keys."""
    _mismatches(module, state, where)
    module.load_state_dict(state, strict=True)


def build_checked(
    build: Callable[[], torch.nn.Module], state: dict[str, torch.Tensor], where: Path
) -> torch.nn.Module:
    """``build()`` loaded strictly with ``state``, its shapes checked first on the meta device
    (no memory), so sizes in a config that do not fit the weights allocate nothing."""
    with torch.device("meta"):
        probe = build()
    _mismatches(probe, state, where)
    module = build()
    module.load_state_dict(state, strict=True)
    return module
