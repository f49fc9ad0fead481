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
version 1 manifests are read as they are. Every field and its bounds are declared once
(``MANIFEST_SPEC``, see :mod:`query_sdk.manifest`), which is also the published JSON Schema
``query_sdk/schemas/bundle-manifest.schema.json``.

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
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import FormatError
from .fileio import read_json, write_json_atomic
from .gallery_format import safe_join, sha256_file, utc_now_iso
from .manifest import (
    MAX_COUNT,
    MAX_DIM,
    MAX_FILE_BYTES,
    SHA256,
    UTC_TIME,
    AnyOf,
    Arr,
    Case,
    Enum,
    FreeObj,
    Int,
    Null,
    Nullable,
    Num,
    Obj,
    Str,
    Versions,
    file_name,
    json_schema,
    validate,
)
from .spec import MAX_SIDE, InputSpec

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
#: largest batch an artifact may declare, and largest shape dimension
MAX_BATCH = 1 << 16
MAX_ARTIFACTS = 256


class BundleError(FormatError):
    """A query bundle is missing, damaged or inconsistent; the message names the file and key."""


# --------------------------------------------------------------------------- manifest spec

_ROLE = Str(
    pattern=r"^(query|head:[A-Za-z0-9][A-Za-z0-9_.+-]*)$",
    what="'query' or 'head:<gallery model name>'",
)
_SHAPE = Arr(
    AnyOf(Enum([-1]), Int(1, max(MAX_BATCH, MAX_SIDE, MAX_DIM)), what="-1 or a positive int"),
    min_items=1,
    max_items=8,
    doc="-1 marks a dynamic dimension (the batch)",
)
_COS = Num(-1.0 - 1e-6, 1.0 + 1e-6)
_COSINE = Nullable(_COS)
_VALIDATION = Obj(
    {
        "runtime": Str(min_len=1),
        "images": Int(0, MAX_COUNT),
        "cosine_min": _COSINE,
        "cosine_mean": _COSINE,
        "recall_at_1_delta": Nullable(Num(-1.0, 1.0)),
        "gallery_space_id": Nullable(Str(min_len=1)),
    },
    optional=("recall_at_1_delta", "gallery_space_id"),
    cases=[
        Case(
            "images",
            0,
            then={"cosine_min": Null(), "cosine_mean": Null()},
            otherwise={"cosine_min": _COS, "cosine_mean": _COS},
        ),
        Case(
            "recall_at_1_delta",
            None,
            then={"gallery_space_id": Null()},
            otherwise={"gallery_space_id": Str(min_len=1)},
            otherwise_required=("gallery_space_id",),
        ),
    ],
    doc="cosine_min/cosine_mean are null exactly when images is 0; recall_at_1_delta and "
    "gallery_space_id go together",
)
_ARTIFACT = Obj(
    {
        "target": Enum(TARGETS),
        "quantization": Enum(QUANTIZATIONS),
        "file": file_name(exclude=(MANIFEST_FILE,)),
        "bytes": Int(1, MAX_FILE_BYTES),
        "sha256": SHA256,
        "role": _ROLE,
        "input_name": Str(min_len=1),
        "input_shape": _SHAPE,
        "input_dtype": Enum(INPUT_DTYPES),
        "output_name": Str(min_len=1),
        "output_shape": Arr(_SHAPE.item, min_items=2, max_items=2, doc="[N, embedding_dim]"),
        "validation": _VALIDATION,
        "max_batch": Nullable(Int(1, MAX_BATCH)),
        "deployment_target": Nullable(Enum(COREML_DEPLOYMENT_TARGETS)),
    },
    optional=("max_batch", "deployment_target"),
    cases=[
        Case(
            "target",
            target,
            then={
                "file": Str(pattern=rf"\{suffix}$", what=f"a file name ending in {suffix}"),
                **({} if target == "coreml" else {"deployment_target": Null()}),
            },
        )
        for target, suffix in TARGET_SUFFIX.items()
    ],
)
_INPUT_SPEC = Obj(
    {
        "height": Int(1, MAX_SIDE),
        "width": Int(1, MAX_SIDE),
        "channels": Enum([1, 3]),
        "mean": Arr(Num(), min_items=1, max_items=3),
        "std": Arr(Num(0, gt=True), min_items=1, max_items=3),
        "dtype": Enum(["uint8"]),
        "layout": Enum(["NHWC"]),
    },
    optional=("mean", "std", "dtype", "layout"),
    doc="query_sdk.spec.InputSpec; mean and std have 1 or channels values",
)
_FIELDS = {
    "format_version": Enum(READABLE_VERSIONS),
    "space_id": Str(min_len=1, doc="the embedding space; a searcher refuses a gallery of another"),
    "mode": Enum(MODES),
    "input_spec": _INPUT_SPEC,
    "embedding_dim": Int(1, MAX_DIM),
    "query_fingerprint": Str(min_len=1),
    "artifacts": Arr(_ARTIFACT, min_items=1, max_items=MAX_ARTIFACTS),
    "created": UTC_TIME,
    "tool_version": Str(),
    "extra": Nullable(FreeObj()),
}
_MANIFEST = Obj(_FIELDS, optional=("extra",))
MANIFEST_SPEC = Versions(dict.fromkeys(READABLE_VERSIONS, _MANIFEST))
_CROSS_CHECKS = (
    "Readers also check what JSON Schema cannot say: artifact files and (target, "
    "quantization, role) are unique, output_shape is [N, embedding_dim], a query artifact's "
    "input_shape is [N, height, width, channels] of input_spec, input and output batch "
    "dimensions agree, cosine_min <= cosine_mean, mean/std have 1 or channels values, "
    "'created' is a real date; and, against the files, every artifact's bytes and sha256."
)

#: the published JSON Schema of a query bundle's ``manifest.json``
MANIFEST_SCHEMA = json_schema(
    MANIFEST_SPEC,
    name="bundle-manifest.schema.json",
    title="cmce query bundle manifest.json",
    description=f"A query bundle's manifest (format_version 1 and 2). {_CROSS_CHECKS}",
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
    def _checked(cls, d: dict, where: str) -> Validation:
        """From a dict ``_VALIDATION`` accepted: the checks between its values."""
        cmin, cmean = d["cosine_min"], d["cosine_mean"]
        if cmin is not None and cmin > cmean + 1e-9:
            raise BundleError(f"{where}: cosine_min {cmin} exceeds cosine_mean {cmean}")

        def num(key: str) -> float | None:
            return None if d.get(key) is None else float(d[key])

        return cls(
            runtime=d["runtime"],
            images=d["images"],
            cosine_min=num("cosine_min"),
            cosine_mean=num("cosine_mean"),
            recall_at_1_delta=num("recall_at_1_delta"),
            gallery_space_id=d.get("gallery_space_id"),
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
    def _checked(cls, d: dict, where: str) -> Artifact:
        """From a dict ``_ARTIFACT`` accepted."""
        return cls(
            **{k: d.get(k) for k in cls._KEYS if k != "validation"},
            validation=Validation._checked(d["validation"], f"{where}: validation"),
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
        """Parse and validate; BundleError naming ``where``, the key and the value."""
        d = validate(MANIFEST_SPEC, d, where, BundleError)
        try:
            spec = InputSpec.from_dict(d["input_spec"])
        except (TypeError, ValueError) as exc:
            raise BundleError(f"{where}: key 'input_spec' is invalid: {exc}") from None
        artifacts = [
            Artifact._checked(a, f"{where}: artifacts[{i}]") for i, a in enumerate(d["artifacts"])
        ]
        _check_artifacts(artifacts, spec, d["embedding_dim"], where)
        return cls(
            space_id=d["space_id"],
            mode=d["mode"],
            input_spec=spec,
            embedding_dim=d["embedding_dim"],
            query_fingerprint=d["query_fingerprint"],
            artifacts=artifacts,
            created=d["created"],
            tool_version=d["tool_version"],
            format_version=d["format_version"],
            extra=dict(d.get("extra") or {}),
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
    if target not in TARGETS or quantization not in QUANTIZATIONS or not _ROLE.accepts(role):
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
        path = safe_join(folder, a.file, error=BundleError, what="bundle folder")
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
