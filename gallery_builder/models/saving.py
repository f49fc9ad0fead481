"""Save and load embedding models as checkpoint folders, including users' own backbones.

Three kinds of architecture live in ``config.json``:
- a registered one (``create_model`` name + kwargs): built from the registry, no code from the
  folder runs;
- ``external``: any ``nn.Module`` built by an importable factory ``"package.module:name"`` that
  maps normalised NCHW images to (batch, features), with its weights from a local file;
- ``torchscript``: a scripted/traced module file kept in the folder.

The last two run code (importing and calling the factory with the config's kwargs; TorchScript
is a program), so a folder someone sends you could run anything. They are built only when the
caller trusts them by name: ``load_model(path, trust=[...])`` (CLI: ``--trust-code``, repeatable)
takes entry points ``package.module:callable`` (trusts that callable, with whatever kwargs a
config gives it) and model folders (trusts the entry point or TorchScript file of that folder).
Without it loading raises :class:`TrustError` saying what would run and how to trust it.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import re
import shutil
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from gallery_builder.models.checkpoint import (
    CONFIG_FILE,
    CheckpointError,
    build_checked,
    load_state_strict,
    read_config,
    read_weights,
    require_keys,
    save_checkpoint,
)
from query_sdk.errors import TrustError
from query_sdk.fileio import check_regular_file
from query_sdk.spec import InputSpec

from ._registry import EmbeddingNet, create_model
from .complexity import count_params, mflops

__all__ = [
    "TRUST_FLAG",
    "Trust",
    "save_model",
    "load_model",
    "import_external",
    "import_torchscript",
]

TORCHSCRIPT_FILE = "model.ts"
TRUST_FLAG = "--trust-code"
CODE_ARCHITECTURES = ("external", "torchscript")
_NAME = r"[A-Za-z_][A-Za-z0-9_]*"
ENTRY_POINT = re.compile(rf"(?P<module>{_NAME}(?:\.{_NAME})*):(?P<attr>{_NAME}(?:\.{_NAME})*)")
_IDENTITY_KEYS = {
    "external": {
        "entry_point": (str,),
        "kwargs": (dict,),
        "feature_dim": (int,),
        "embedding_dim": (int, type(None)),
    },
    "torchscript": {"sha256": (str,), "feature_dim": (int,)},
}

Trust = Iterable[str | os.PathLike[str]]
"""What a caller trusts to run: entry points ``package.module:callable`` and model folders."""


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


def build_from_identity(
    identity: dict, folder: Path | None = None, trust: Trust = ()
) -> EmbeddingNet:
    """Construct the (untrained) module an identity describes; an external or TorchScript one
    only if ``trust`` names it (its entry point or ``folder``), else :class:`TrustError`."""
    where = Path(folder) / CONFIG_FILE if folder is not None else "identity"
    spec = InputSpec.from_dict(identity["input_spec"])
    arch = identity["architecture"]
    if arch in CODE_ARCHITECTURES:
        require_keys(identity, _IDENTITY_KEYS[arch], where, "identity.")
    if arch == "external":
        entry_point, kwargs = identity["entry_point"], identity["kwargs"]
        module, attr = _parse_entry_point(entry_point)
        if not _trusted(trust, folder, entry_point):
            call = ", ".join(f"{k}={_short(v)}" for k, v in list(kwargs.items())[:8])
            call += ", …" if len(kwargs) > 8 else ""
            raise TrustError(
                f"{where}: this external model would import module {module!r} and call "
                f"{attr}({call}); code named by a model folder runs only when trusted: if you "
                f"trust it, pass {TRUST_FLAG} {entry_point} (or {TRUST_FLAG} {folder}), in "
                f"Python load_model(..., trust=[{entry_point!r}])"
            )
        backbone = _import_entry_point(module, attr)(**kwargs)
        if not isinstance(backbone, nn.Module):
            raise CheckpointError(
                f"{entry_point} returned a {type(backbone).__name__}, not a torch.nn.Module"
            )
        return EmbeddingNet(backbone, identity["feature_dim"], identity["embedding_dim"], spec)
    if arch == "torchscript":
        file = Path(folder or ".") / TORCHSCRIPT_FILE
        check_regular_file(file, "TorchScript file", CheckpointError)
        digest = _sha256(file)
        if digest != identity["sha256"]:
            raise CheckpointError(f"{file}: missing or its sha256 differs from the config")
        if not _trusted(trust, folder, None):
            raise TrustError(
                f"{file}: a TorchScript program (sha256 {digest[:16]}), and loading one runs "
                f"its code; it runs only when trusted: if you trust this folder, pass "
                f"{TRUST_FLAG} {folder}, in Python load_model(..., trust=[{str(folder)!r}])"
            )
        backbone = torch.jit.load(str(file), map_location="cpu")
        return EmbeddingNet(backbone, identity["feature_dim"], None, spec)
    return create_model(arch, spec, identity["embedding_dim"], **identity.get("kwargs", {}))


def load_model(path: Path, trust: Trust = ()) -> tuple[EmbeddingNet, dict]:
    """Load a checkpoint folder strictly; returns the model in eval mode and its config.

    ``trust`` names the entry points and folders whose code may run (see the module
    docstring); registered architectures need none.
    """
    path = Path(path)
    config = read_config(path, "model")
    state = read_weights(path, config)
    identity = config["identity"]
    try:
        if identity["architecture"] in CODE_ARCHITECTURES:
            model = build_from_identity(identity, path, trust)
            load_state_strict(model, state, path)
        else:
            model = build_checked(lambda: build_from_identity(identity), state, path)
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(
            f"{path / CONFIG_FILE}: cannot build the architecture in its config: {e}"
        ) from e
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
    """Make a checkpoint folder from a user's ``nn.Module`` factory and its safetensors weights
    (naming the factory here is what trusts it: it is imported and called)."""
    _parse_entry_point(entry_point)
    try:
        kwargs = json.loads(json.dumps(kwargs or {}, allow_nan=False))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"factory kwargs must be JSON values: {e}") from e
    identity = {
        "architecture": "external",
        "entry_point": entry_point,
        "kwargs": kwargs,
        "feature_dim": feature_dim,
        "embedding_dim": None,
        "input_spec": input_spec.to_dict(),
    }
    model = build_from_identity(identity, trust=[entry_point])
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
    """Make a checkpoint folder around a TorchScript file (copied into the folder; naming the
    file here is what trusts it: it is loaded)."""
    out = Path(out)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        shutil.copyfile(file, out / TORCHSCRIPT_FILE)
        identity = {
            "architecture": "torchscript",
            "feature_dim": feature_dim,
            "sha256": _sha256(out / TORCHSCRIPT_FILE),
            "input_spec": input_spec.to_dict(),
        }
        model = build_from_identity(identity, out, trust=[out])
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


def _parse_entry_point(entry_point: object) -> tuple[str, str]:
    """``(module, attribute)`` of ``package.module:name``: dotted identifiers, no dunders."""
    match = ENTRY_POINT.fullmatch(entry_point) if isinstance(entry_point, str) else None
    if match is None or "__" in match["attr"]:
        raise CheckpointError(
            f"entry point must look like 'package.module:name', got {entry_point!r}"
        )
    return match["module"], match["attr"]


def _sha256(file: Path) -> str:
    h = hashlib.sha256()
    with open(file, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _short(value: object, limit: int = 160) -> str:
    text = json.dumps(value)
    return text if len(text) <= limit else text[:limit] + "…"


def _trusted(trust: Trust, folder: Path | None, entry_point: str | None) -> bool:
    if isinstance(trust, str | os.PathLike):
        trust = [trust]
    for name in trust:
        if isinstance(name, str) and ENTRY_POINT.fullmatch(name):
            if name == entry_point:
                return True
        elif folder is not None and Path(name).resolve() == Path(folder).resolve():
            return True
    return False


def _import_entry_point(module: str, attr: str):
    try:
        obj = importlib.import_module(module)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as e:
        raise CheckpointError(f"cannot import {module}:{attr}: {e}") from e
    if not callable(obj):
        raise CheckpointError(f"{module}:{attr} is a {type(obj).__name__}, not a factory")
    return obj
