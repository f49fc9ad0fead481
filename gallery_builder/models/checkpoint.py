"""Checkpoint folders: ``config.json`` (sorted, indented) + ``weights.safetensors``. No pickle.

The fingerprint is a hash of the weights and the architecture, so a config that does not match
its weights is caught on load, and galleries and bundles can name exactly what made them.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from query_sdk.errors import CheckpointError

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "weights.safetensors"

__all__ = [
    "CONFIG_FILE",
    "WEIGHTS_FILE",
    "CheckpointError",
    "fingerprint",
    "write_json",
    "save_checkpoint",
    "read_config",
    "read_weights",
    "load_state_strict",
]


def fingerprint(state: dict[str, torch.Tensor], identity: dict) -> str:
    """16 hex digits of sha256 over the architecture identity and every tensor, in key order."""
    h = hashlib.sha256(json.dumps(identity, sort_keys=True).encode())
    for key in sorted(state):
        t = state[key].detach().cpu().contiguous()
        h.update(f"{key}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def write_json(path: Path, obj: dict) -> None:
    """Write JSON atomically: a temporary file in the same folder, then a rename."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_checkpoint(path: Path, state: dict[str, torch.Tensor], config: dict) -> dict:
    """Write a checkpoint folder; adds ``fingerprint`` (from ``config["identity"]``) and returns
    the config as written."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    config = {**config, "fingerprint": fingerprint(state, config["identity"])}
    fd, tmp = tempfile.mkstemp(dir=path, prefix=".weights.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(state, tmp, metadata={"fingerprint": config["fingerprint"]})
        os.replace(tmp, path / WEIGHTS_FILE)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    write_json(path / CONFIG_FILE, config)
    return config


def read_config(path: Path, kind: str) -> dict:
    """Read ``config.json`` of a checkpoint folder of the given kind (model, heads, ...)."""
    path = Path(path)
    file = path / CONFIG_FILE
    if not file.is_file():
        raise CheckpointError(f"{path}: not a checkpoint folder (no {CONFIG_FILE})")
    try:
        config = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file}: not valid JSON ({e})") from e
    if config.get("kind") != kind:
        raise CheckpointError(f"{file}: expected a {kind} checkpoint, found {config.get('kind')!r}")
    return config


def read_weights(path: Path, config: dict) -> dict[str, torch.Tensor]:
    """Load the weights and check them against the config's fingerprint."""
    file = Path(path) / WEIGHTS_FILE
    if not file.is_file():
        raise CheckpointError(f"{path}: missing {WEIGHTS_FILE}")
    try:
        state = load_file(file)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{file}: unreadable safetensors file ({e})") from e
    actual = fingerprint(state, config["identity"])
    if actual != config.get("fingerprint"):
        raise CheckpointError(
            f"{file} does not match {Path(path) / CONFIG_FILE}: weights fingerprint {actual}, "
            f"config says {config.get('fingerprint')} (was one of them replaced?)"
        )
    return state


def load_state_strict(module: torch.nn.Module, state: dict[str, torch.Tensor], where: Path) -> None:
    """Load a state dict strictly; on mismatch list missing, unexpected and mis-shaped keys."""
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
    module.load_state_dict(state, strict=True)
