"""Save and load embedding models as checkpoint folders, including users' own backbones.

Three kinds of architecture live in ``config.json``:
- a registered one (``create_model`` name + kwargs),
- ``external``: any ``nn.Module`` built by an importable factory ``"package.module:name"`` that
  maps normalised NCHW images to (batch, features), with its weights from a local file,
- ``torchscript``: a scripted/traced module file kept in the folder (trusted, server-side only:
  TorchScript archives are not a safe format for files from strangers).
"""

from __future__ import annotations

import hashlib
import importlib
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from gallery_builder.models.checkpoint import (
    CheckpointError,
    load_state_strict,
    read_config,
    read_weights,
    save_checkpoint,
)
from query_sdk.spec import InputSpec

from ._registry import EmbeddingNet, create_model
from .complexity import count_params, mflops

__all__ = ["save_model", "load_model", "import_external", "import_torchscript"]

TORCHSCRIPT_FILE = "model.ts"


def save_model(path: Path, model: EmbeddingNet, identity: dict, role: str, training: dict) -> dict:
    """Write ``model`` as a checkpoint folder; ``identity`` says how to rebuild it."""
    config = {
        "kind": "model",
        "identity": identity,
        "role": role,
        "embedding_dim": model.embedding_dim,
        "input_spec": model.input_spec.to_dict(),
        "training": training,
        "params": count_params(model),
        "mflops": round(mflops(model, model.input_spec), 4),
    }
    return save_checkpoint(path, model.state_dict(), config)


def registered_identity(
    architecture: str, input_spec: InputSpec, embedding_dim: int, **kwargs
) -> dict:
    return {
        "architecture": architecture,
        "kwargs": kwargs,
        "embedding_dim": embedding_dim,
        "input_spec": input_spec.to_dict(),
    }


def build_from_identity(identity: dict, folder: Path | None = None) -> EmbeddingNet:
    """Construct the (untrained) module an identity describes."""
    spec = InputSpec.from_dict(identity["input_spec"])
    arch = identity["architecture"]
    if arch == "external":
        backbone = _import_entry_point(identity["entry_point"])(**identity.get("kwargs", {}))
        return EmbeddingNet(backbone, identity["feature_dim"], identity.get("embedding_dim"), spec)
    if arch == "torchscript":
        file = Path(folder or ".") / TORCHSCRIPT_FILE
        digest = hashlib.sha256(file.read_bytes()).hexdigest() if file.is_file() else None
        if digest != identity["sha256"]:
            raise CheckpointError(f"{file}: missing or its sha256 differs from the config")
        backbone = torch.jit.load(str(file), map_location="cpu")
        return EmbeddingNet(backbone, identity["feature_dim"], None, spec)
    return create_model(arch, spec, identity["embedding_dim"], **identity.get("kwargs", {}))


def load_model(path: Path) -> tuple[EmbeddingNet, dict]:
    """Load a checkpoint folder strictly; returns the model in eval mode and its config."""
    path = Path(path)
    config = read_config(path, "model")
    state = read_weights(path, config)
    try:
        model = build_from_identity(config["identity"], path)
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot build the architecture in its config: {e}") from e
    load_state_strict(model, state, path)
    return model.eval(), config


def import_external(
    out: Path,
    entry_point: str,
    weights: Path,
    input_spec: InputSpec,
    feature_dim: int,
    kwargs: dict | None = None,
    role: str = "gallery",
) -> dict:
    """Make a checkpoint folder from a user's ``nn.Module`` factory and its safetensors weights."""
    identity = {
        "architecture": "external",
        "entry_point": entry_point,
        "kwargs": kwargs or {},
        "feature_dim": feature_dim,
        "embedding_dim": None,
        "input_spec": input_spec.to_dict(),
    }
    model = build_from_identity(identity)
    try:
        state = load_file(weights)
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{weights}: unreadable safetensors file ({e})") from e
    load_state_strict(model.backbone, state, Path(weights))
    _check_feature_dim(model, feature_dim)
    return save_model(out, model, identity, role, {"source": str(weights)})


def import_torchscript(
    out: Path, file: Path, input_spec: InputSpec, feature_dim: int, role: str = "gallery"
) -> dict:
    """Make a checkpoint folder around a TorchScript file (copied into the folder)."""
    out = Path(out)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        shutil.copyfile(file, out / TORCHSCRIPT_FILE)
        identity = {
            "architecture": "torchscript",
            "feature_dim": feature_dim,
            "sha256": hashlib.sha256((out / TORCHSCRIPT_FILE).read_bytes()).hexdigest(),
            "input_spec": input_spec.to_dict(),
        }
        model = build_from_identity(identity, out)
        _check_feature_dim(model, feature_dim)
        return save_model(out, model, identity, role, {"source": str(file)})
    except BaseException:  # leave no half-made checkpoint behind
        if created:
            shutil.rmtree(out, ignore_errors=True)
        else:
            (out / TORCHSCRIPT_FILE).unlink(missing_ok=True)
        raise


def _check_feature_dim(model: EmbeddingNet, feature_dim: int) -> None:
    with torch.no_grad():
        out = model.eval()(torch.zeros(2, *model.input_spec.shape, dtype=torch.uint8))
    if out.shape != (2, feature_dim):
        raise CheckpointError(
            f"the module returns shape {tuple(out.shape[1:])} per image, expected ({feature_dim},)"
        )


def _import_entry_point(entry_point: str):
    module, _, name = entry_point.partition(":")
    if not module or not name:
        raise CheckpointError(
            f"entry point must look like 'package.module:name', got {entry_point!r}"
        )
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise CheckpointError(f"cannot import {entry_point!r}: {e}") from e
