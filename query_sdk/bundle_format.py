"""The on-disk query bundle format: the single definition, for ``cmce-export`` (writes) and the
SDK (reads).

A bundle is a folder shipped inside an app::

    manifest.json                  written last; describes everything below
    query.onnx  query.int8.onnx    one file per artifact (ONNX, ExecuTorch ``.pte``)
    query.pte   query.int8.pte
    query.fp16.mlpackage/          Core ML packages are directories
    query.ort   query.int8.ort     optional ONNX Runtime ORT-format copies of the ONNX files
    ort-required-operators.config  with them: the operators a reduced ORT build must keep
    head-<gallery model>.onnx ...  optional gallery heads (for devices that enroll items)

``manifest.json`` (sorted keys, indent 2) holds ``format_version``, ``space_id`` (the same id
the gallery manifest carries: a searcher refuses a gallery from another space), ``mode``
("unified": the query head T_q is fused into the query artifact; "to-query": the space is the
query model's own), ``input_spec`` (:class:`query_sdk.spec.InputSpec` as a dict),
``embedding_dim``, ``query_fingerprint``, ``artifacts`` (see :class:`Artifact`), ``created``
(ISO 8601 UTC), ``tool_version`` and ``extra`` (free-form). Unknown keys are refused:
additions go into ``extra`` or bump ``FORMAT_VERSION``. Version 2 added the "ort" target, the
Core ML palettized quantizations "pal6"/"pal4" and the artifacts' ``deployment_target``;
version 1 manifests are read as they are.

Every query artifact takes the image batch as the app has it (``input_spec``: uint8 NHWC,
H x W x channels; ``input_dtype`` says when a runtime needs the same pixel values as another
dtype) and returns L2-normalised float32 vectors ``(N, embedding_dim)``: scaling, mean/std and
the final normalisation are inside the model. A head artifact takes a gallery model's raw
float32 embedding and returns its vector in the space (normalised).

An artifact's ``bytes`` and ``sha256`` are those of its file; for a directory (``.mlpackage``)
``bytes`` is the sum of its files' sizes and ``sha256`` is the sha256 of the text made of one
line ``<sha256 of file>  <relative posix path>\\n`` per file, sorted by path (symlinks and other
non-regular entries are refused). :func:`verify_bundle` checks them before any runtime sees a
file. Artifact file names are plain names inside the bundle folder (no paths).

This module imports only the standard library (and query_sdk); never torch.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from query_sdk.gallery_format import (
    GalleryError,
    safe_join,
    sha256_file,
    utc_now_iso,
)
from query_sdk.spec import InputSpec

from .errors import FormatError
from .fileio import read_json, write_json_atomic

__all__ = [
    "FORMAT_VERSION",
    "READABLE_VERSIONS",
    "MANIFEST_FILE",
    "TARGETS",
    "QUANTIZATIONS",
    "COREML_DEPLOYMENT_TARGETS",
    "ORT_OPERATORS_FILE",
    "MODES",
    "TARGET_SUFFIX",
    "QUERY_ROLE",
    "HEAD_ROLE_PREFIX",
    "BundleError",
    "Validation",
    "Artifact",
    "BundleManifest",
    "artifact_file_name",
    "path_digest",
    "write_bundle_manifest",
    "read_bundle_manifest",
    "verify_bundle",
    "find_artifact",
    "utc_now_iso",
]

FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
MANIFEST_FILE = "manifest.json"
TARGETS = ("onnx", "executorch", "coreml", "ort")
#: most precise first; pal<n> = Core ML weights as 2**n-entry look-up tables (k-means)
QUANTIZATIONS = ("fp32", "fp16", "int8", "pal6", "pal4")
MODES = ("unified", "to-query")
TARGET_SUFFIX = {"onnx": ".onnx", "executorch": ".pte", "coreml": ".mlpackage", "ort": ".ort"}
#: minimum OS versions a Core ML artifact can be built for (coremltools deployment targets)
COREML_DEPLOYMENT_TARGETS = ("iOS16", "iOS17", "iOS18", "macOS13", "macOS14", "macOS15")
#: beside "ort" artifacts: the operators a reduced ORT build needs (not an artifact)
ORT_OPERATORS_FILE = "ort-required-operators.config"
QUERY_ROLE = "query"
HEAD_ROLE_PREFIX = "head:"
INPUT_DTYPES = ("uint8", "int32", "float32", "float16")
_HEAD_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class BundleError(FormatError):
    """A query bundle is missing, damaged or inconsistent; the message names the file and key."""


# --------------------------------------------------------------------------- value checks


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _get(d: dict, key: str, where: str, check, what: str, optional: bool = False) -> Any:
    """``d[key]`` if ``check`` accepts it; BundleError naming ``where``, the key and ``what``."""
    if key not in d:
        if optional:
            return None
        raise BundleError(f"{where}: missing key {key!r}")
    v = d[key]
    if optional and v is None:
        return None
    if not check(v):
        raise BundleError(f"{where}: key {key!r} must be {what}, got {v!r:.80}")
    return v


def _only(d: dict, allowed: tuple[str, ...], where: str) -> None:
    unknown = sorted(set(d) - set(allowed))
    if unknown:
        raise BundleError(
            f"{where}: unknown key(s) {unknown} (bundle format_version {FORMAT_VERSION})"
        )


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _cosine(v: Any) -> bool:
    return _number(v) and -1.0 - 1e-6 <= v <= 1.0 + 1e-6


def _nonempty_str(v: Any) -> bool:
    return isinstance(v, str) and bool(v)


def _sha_hex(v: Any) -> bool:
    return isinstance(v, str) and bool(_SHA256.match(v))


def _shape(v: Any) -> bool:
    """A shape: positive ints, -1 for a dynamic dimension."""
    return isinstance(v, list) and bool(v) and all(_is_int(x) and (x > 0 or x == -1) for x in v)


def _role(v: Any) -> bool:
    if v == QUERY_ROLE:
        return True
    return (
        isinstance(v, str)
        and v.startswith(HEAD_ROLE_PREFIX)
        and bool(_HEAD_NAME.match(v[len(HEAD_ROLE_PREFIX) :]))
    )


# --------------------------------------------------------------------------- dataclasses


@dataclass
class Validation:
    """How an artifact was checked against the fp32 torch model it came from.

    ``runtime`` names what ran it ("onnxruntime", "executorch", "coreml"), or "spec-only" when
    the artifact could only be checked structurally (Core ML off macOS); then the cosine
    figures are None and ``images`` is 0. ``recall_at_1_delta`` is the change of Recall@1
    (absolute, artifact minus torch fp32) against a gallery, when one was given.
    """

    runtime: str
    images: int
    cosine_min: float | None
    cosine_mean: float | None
    recall_at_1_delta: float | None = None
    gallery_space_id: str | None = None

    _KEYS = (
        "runtime",
        "images",
        "cosine_min",
        "cosine_mean",
        "recall_at_1_delta",
        "gallery_space_id",
    )

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self._KEYS}

    @classmethod
    def from_dict(cls, d: Any, where: str) -> Validation:
        if not isinstance(d, dict):
            raise BundleError(f"{where}: must be an object")
        _only(d, cls._KEYS, where)
        runtime = _get(d, "runtime", where, _nonempty_str, "a non-empty string")
        images = _get(d, "images", where, lambda v: _is_int(v) and v >= 0, "an int >= 0")
        cmin = _get(d, "cosine_min", where, _cosine, "a number in [-1, 1] or null", True)
        cmean = _get(d, "cosine_mean", where, _cosine, "a number in [-1, 1] or null", True)
        if (cmin is None) != (cmean is None) or (cmin is None) != (images == 0):
            raise BundleError(
                f"{where}: cosine_min and cosine_mean are both null exactly when images is 0"
            )
        if cmin is not None and cmin > cmean + 1e-9:
            raise BundleError(f"{where}: cosine_min {cmin} exceeds cosine_mean {cmean}")
        delta = _get(d, "recall_at_1_delta", where, _number, "a number or null", True)
        space = _get(d, "gallery_space_id", where, _nonempty_str, "a string or null", True)
        if (delta is None) != (space is None):
            raise BundleError(
                f"{where}: recall_at_1_delta and gallery_space_id go together (both or neither)"
            )
        return cls(
            runtime=runtime,
            images=images,
            cosine_min=None if cmin is None else float(cmin),
            cosine_mean=None if cmean is None else float(cmean),
            recall_at_1_delta=None if delta is None else float(delta),
            gallery_space_id=space,
        )


@dataclass
class Artifact:
    """One exported model file (or ``.mlpackage`` directory) in the bundle.

    ``role`` is "query" (image -> vector in the space) or "head:<gallery model name>" (a
    gallery model's raw embedding -> vector in the space). Shapes use -1 for a dynamic batch;
    ``max_batch`` is the largest batch the artifact takes (None: no limit), so callers split
    bigger batches. ``deployment_target`` is the minimum OS of a Core ML artifact (one of
    :data:`COREML_DEPLOYMENT_TARGETS`; None for other targets, and in version 1 manifests,
    whose Core ML artifacts all targeted iOS17 / macOS14).
    """

    target: str
    quantization: str
    file: str
    bytes: int
    sha256: str
    role: str
    input_name: str
    input_shape: list[int]
    input_dtype: str
    output_name: str
    output_shape: list[int]
    validation: Validation
    max_batch: int | None = None
    deployment_target: str | None = None

    _KEYS = (
        "target",
        "quantization",
        "file",
        "bytes",
        "sha256",
        "role",
        "input_name",
        "input_shape",
        "input_dtype",
        "output_name",
        "output_shape",
        "validation",
        "max_batch",
        "deployment_target",
    )

    @property
    def head_name(self) -> str | None:
        """The gallery model name of a head artifact, None for the query artifact."""
        return None if self.role == QUERY_ROLE else self.role[len(HEAD_ROLE_PREFIX) :]

    def to_dict(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in self._KEYS}
        d["input_shape"], d["output_shape"] = list(self.input_shape), list(self.output_shape)
        d["validation"] = self.validation.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: Any, where: str) -> Artifact:
        if not isinstance(d, dict):
            raise BundleError(f"{where}: must be an object")
        _only(d, cls._KEYS, where)
        target = _get(d, "target", where, lambda v: v in TARGETS, f"one of {list(TARGETS)}")
        quant = _get(
            d, "quantization", where, lambda v: v in QUANTIZATIONS, f"one of {list(QUANTIZATIONS)}"
        )
        file = _get(d, "file", where, _nonempty_str, "a non-empty string")
        suffix = TARGET_SUFFIX[target]
        if not file.endswith(suffix) or file == MANIFEST_FILE:
            raise BundleError(f"{where}: file {file!r} of target {target!r} must end in {suffix}")
        os_target = _get(
            d,
            "deployment_target",
            where,
            lambda v: v in COREML_DEPLOYMENT_TARGETS and target == "coreml",
            f"null, or for coreml one of {list(COREML_DEPLOYMENT_TARGETS)}",
            True,
        )
        return cls(
            target=target,
            quantization=quant,
            file=file,
            bytes=_get(d, "bytes", where, lambda v: _is_int(v) and v > 0, "a positive int"),
            sha256=_get(d, "sha256", where, _sha_hex, "a hex sha256"),
            role=_get(d, "role", where, _role, "'query' or 'head:<gallery model name>'"),
            input_name=_get(d, "input_name", where, _nonempty_str, "a non-empty string"),
            input_shape=list(_get(d, "input_shape", where, _shape, "a shape (-1 = dynamic)")),
            input_dtype=_get(
                d, "input_dtype", where, lambda v: v in INPUT_DTYPES, f"one of {INPUT_DTYPES}"
            ),
            output_name=_get(d, "output_name", where, _nonempty_str, "a non-empty string"),
            output_shape=list(_get(d, "output_shape", where, _shape, "a shape (-1 = dynamic)")),
            validation=Validation.from_dict(
                _get(d, "validation", where, lambda v: isinstance(v, dict), "an object"),
                f"{where}: validation",
            ),
            max_batch=_get(
                d, "max_batch", where, lambda v: _is_int(v) and v > 0, "a positive int", True
            ),
            deployment_target=os_target,
        )


@dataclass
class BundleManifest:
    """The contents of a bundle's ``manifest.json``."""

    space_id: str
    mode: str
    input_spec: InputSpec
    embedding_dim: int
    query_fingerprint: str
    artifacts: list[Artifact]
    created: str = field(default_factory=utc_now_iso)
    tool_version: str = ""
    format_version: int = FORMAT_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    _KEYS = (
        "format_version",
        "space_id",
        "mode",
        "input_spec",
        "embedding_dim",
        "query_fingerprint",
        "artifacts",
        "created",
        "tool_version",
        "extra",
    )

    def to_dict(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in self._KEYS}
        d["input_spec"] = self.input_spec.to_dict()
        d["artifacts"] = [a.to_dict() for a in self.artifacts]
        d["extra"] = dict(self.extra)
        return d

    @classmethod
    def from_dict(cls, d: Any, where: str = MANIFEST_FILE) -> BundleManifest:
        """Parse and validate; BundleError naming ``where`` and the missing/bad key."""
        if not isinstance(d, dict):
            raise BundleError(f"{where}: top level must be a JSON object")
        version = _get(d, "format_version", where, _is_int, "an int")
        if version not in READABLE_VERSIONS:
            raise BundleError(
                f"{where}: unknown format_version {version}; this reader supports "
                f"format_version {', '.join(map(str, READABLE_VERSIONS))}"
            )
        _only(d, cls._KEYS, where)
        spec_dict = _get(d, "input_spec", where, lambda v: isinstance(v, dict), "an object")
        try:
            spec = InputSpec.from_dict(spec_dict)
        except (TypeError, ValueError) as exc:
            raise BundleError(f"{where}: key 'input_spec' is invalid: {exc}") from exc
        created = _get(d, "created", where, _nonempty_str, "an ISO 8601 UTC time")
        try:
            stamp = datetime.fromisoformat(created.replace("Z", "+00:00"))
        except ValueError as exc:
            raise BundleError(f"{where}: 'created' {created!r} is not ISO 8601") from exc
        if stamp.utcoffset() is None or stamp.utcoffset().total_seconds() != 0:
            raise BundleError(f"{where}: 'created' {created!r} must be in UTC")
        dim = _get(d, "embedding_dim", where, lambda v: _is_int(v) and v > 0, "a positive int")
        items = _get(d, "artifacts", where, lambda v: isinstance(v, list) and v, "a non-empty list")
        artifacts = [Artifact.from_dict(a, f"{where}: artifacts[{i}]") for i, a in enumerate(items)]
        _check_artifacts(artifacts, spec, dim, where)
        extra = _get(d, "extra", where, lambda v: isinstance(v, dict), "an object", True)
        return cls(
            space_id=_get(d, "space_id", where, _nonempty_str, "a non-empty string"),
            mode=_get(d, "mode", where, lambda v: v in MODES, f"one of {list(MODES)}"),
            input_spec=spec,
            embedding_dim=dim,
            query_fingerprint=_get(d, "query_fingerprint", where, _nonempty_str, "a string"),
            artifacts=artifacts,
            created=created,
            tool_version=_get(d, "tool_version", where, lambda v: isinstance(v, str), "a string"),
            format_version=version,
            extra=dict(extra or {}),
        )


def _check_artifacts(artifacts: list[Artifact], spec: InputSpec, dim: int, where: str) -> None:
    """Unique files and (target, quantization, role); query shapes agree with the spec."""
    files: set[str] = set()
    keys: set[tuple[str, str, str]] = set()
    for i, a in enumerate(artifacts):
        w = f"{where}: artifacts[{i}]"
        if a.file in files:
            raise BundleError(f"{w}: file {a.file!r} is listed more than once")
        files.add(a.file)
        key = (a.target, a.quantization, a.role)
        if key in keys:
            raise BundleError(f"{w}: a second {a.target}/{a.quantization} artifact for {a.role!r}")
        keys.add(key)
        if a.output_shape[-1] != dim or len(a.output_shape) != 2:
            raise BundleError(f"{w}: output_shape {a.output_shape} must be [N, {dim}]")
        if a.role == QUERY_ROLE and a.input_shape[1:] != list(spec.shape):
            raise BundleError(
                f"{w}: input_shape {a.input_shape} does not match input_spec "
                f"[N, {', '.join(map(str, spec.shape))}]"
            )
        if a.input_shape[0] != a.output_shape[0]:
            raise BundleError(f"{w}: input and output batch dimensions differ")


# --------------------------------------------------------------------------- file digests


def artifact_file_name(target: str, quantization: str, role: str = QUERY_ROLE) -> str:
    """The conventional file name: ``query.onnx``, ``query.int8.pte``, ``head-vit.fp16.mlpackage``,
    ``query.int8.ort``.

    fp32 carries no tag, except for Core ML, whose default precision is fp16.
    """
    if target not in TARGETS or quantization not in QUANTIZATIONS or not _role(role):
        raise ValueError(f"bad artifact {target!r}/{quantization!r}/{role!r}")
    stem = "query" if role == QUERY_ROLE else "head-" + role[len(HEAD_ROLE_PREFIX) :]
    tag = "" if quantization == "fp32" and target != "coreml" else f".{quantization}"
    return f"{stem}{tag}{TARGET_SUFFIX[target]}"


def path_digest(path: Path) -> tuple[int, str]:
    """``(bytes, sha256)`` of a file, or of a directory as the module docstring defines it."""
    path = Path(path)
    if path.is_symlink():
        raise BundleError(f"{path.name}: symlinks are refused in a bundle")
    if path.is_file():
        return path.stat().st_size, sha256_file(path)
    if not path.is_dir():
        raise BundleError(f"{path.name}: missing or not a regular file/directory")
    total, entries = 0, []
    for root, dirs, names in os.walk(path):
        for name in dirs + names:
            p = Path(root) / name
            if p.is_symlink() or not (p.is_dir() or p.is_file()):
                raise BundleError(f"{path.name}: {p.relative_to(path)} is not a regular file")
        for name in names:
            p = Path(root) / name
            total += p.stat().st_size
            entries.append((p.relative_to(path).as_posix(), sha256_file(p)))
    text = "".join(f"{digest}  {rel}\n" for rel, digest in sorted(entries))
    return total, hashlib.sha256(text.encode("utf-8")).hexdigest()


# --------------------------------------------------------------------------- read / write


def write_bundle_manifest(folder: Path, manifest: BundleManifest) -> None:
    """Validate and write ``folder/manifest.json`` atomically. Write it after the artifacts."""
    d = manifest.to_dict()
    BundleManifest.from_dict(d, where=f"{MANIFEST_FILE} (about to be written)")  # never junk
    write_json_atomic(Path(folder) / MANIFEST_FILE, d)


def read_bundle_manifest(folder: Path) -> BundleManifest:
    """Read and validate ``folder/manifest.json``; BundleError naming the file and key."""
    path = Path(folder) / MANIFEST_FILE
    if not path.exists():
        raise BundleError(f"{MANIFEST_FILE}: missing in {Path(folder)} (is it a query bundle?)")
    d = read_json(path, "bundle manifest", BundleError)
    return BundleManifest.from_dict(d, where=str(path))


def verify_bundle(folder: Path, artifacts: list[Artifact] | None = None) -> BundleManifest:
    """Check size and sha256 of the given artifacts (default: all) before any runtime loads them.

    Returns the manifest. Artifacts passed in must come from this bundle's manifest.
    """
    folder = Path(folder)
    manifest = read_bundle_manifest(folder)
    chosen = manifest.artifacts if artifacts is None else artifacts
    listed = {a.file: a for a in manifest.artifacts}
    for a in chosen:
        if listed.get(a.file) != a:
            raise BundleError(f"{a.file}: not listed (as given) in {folder / MANIFEST_FILE}")
        try:
            path = safe_join(folder, a.file)
        except GalleryError as exc:
            raise BundleError(str(exc).replace("gallery folder", "bundle folder")) from exc
        if not path.exists():
            raise BundleError(f"{a.file}: listed in the manifest but missing from {folder}")
        size, digest = path_digest(path)
        if size != a.bytes:
            raise BundleError(f"{a.file}: {size} bytes, manifest says {a.bytes}")
        if digest != a.sha256:
            raise BundleError(f"{a.file}: sha256 {digest}, manifest says {a.sha256}")
    return manifest


def find_artifact(
    manifest: BundleManifest, target: str, quantization: str, role: str = QUERY_ROLE
) -> Artifact:
    """The artifact for ``(target, quantization, role)``; BundleError listing what there is."""
    for a in manifest.artifacts:
        if (a.target, a.quantization, a.role) == (target, quantization, role):
            return a
    have = ", ".join(f"{a.target}/{a.quantization}/{a.role}" for a in manifest.artifacts)
    raise BundleError(
        f"{MANIFEST_FILE}: no {target}/{quantization} artifact for {role!r}; the bundle has {have}"
    )
