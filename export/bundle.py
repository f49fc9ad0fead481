"""Assemble a query bundle: export every (target, quantization), validate it, write the manifest.

The bundle is written into a temporary sibling folder and renamed into place when complete, so
``--out`` appears whole or not at all; an existing ``--out`` is replaced only with ``force``.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from query_sdk.bundle_format import (
    HEAD_ROLE_PREFIX,
    ORT_OPERATORS_FILE,
    QUERY_ROLE,
    Artifact,
    BundleManifest,
    Validation,
    artifact_file_name,
    path_digest,
    write_bundle_manifest,
)
from query_sdk.errors import BackendError
from query_sdk.fileio import folder_transaction
from query_sdk.runtimes import open_runtime
from query_sdk.spec import to_model_input

from .calibration import calibration_and_validation
from .coreml import DEFAULT_DEPLOYMENT_TARGET
from .coreml import QUANTIZATIONS as COREML_QUANTIZATIONS
from .errors import ExportError, one_line
from .graph import (
    ModelIO,
    fold_batch_norms,
    head_io,
    load_export_source,
    load_gallery_model,
    query_io,
)
from .validate import GalleryCheck, cosine_stats

__all__ = ["OFFERED", "ExportPlan", "ExportResult", "export_bundle", "staged_folder"]

#: quantizations each target offers
OFFERED = {
    "onnx": ("fp32", "int8"),
    "executorch": ("fp32", "int8"),
    "coreml": COREML_QUANTIZATIONS,
}


@dataclass
class ExportPlan:
    """Everything one ``cmce-export`` run needs."""

    model_dir: Path
    heads_dir: Path | None
    jobs: list[tuple[str, str]]  # (target, quantization)
    validation: str
    out: Path
    calibration: str | None = None
    n_calibration: int = 512
    n_validation: int = 1000
    gallery: Path | None = None
    gallery_models: list[Path] = field(default_factory=list)  # export their heads too
    force: bool = False
    coreml_target: str = DEFAULT_DEPLOYMENT_TARGET  # minimum OS of the Core ML artifacts
    ort_format: bool = False  # also an ORT-format copy of each ONNX artifact
    trust: tuple[str, ...] = ()  # model code that may run (see gallery_builder load_model)


@dataclass
class ExportResult:
    manifest: BundleManifest
    notes: dict[str, list[str]] = field(default_factory=dict)  # file -> remarks
    recall_at_1_torch: float | None = None


@dataclass
class _Target:
    export: Callable  # (module, io, quantization, calibration, path) -> notes
    backend: str | None  # the query_sdk runtime that runs it here; None: checked structurally
    input_dtype: str = "uint8"
    max_batch: int | None = None  # None: what the runtime reports (ExecuTorch: planned bound)
    deployment_target: str | None = None  # Core ML: the minimum OS


def _targets(coreml_target: str) -> dict[str, _Target]:
    from . import coreml, executorch, onnx

    return {
        "onnx": _Target(onnx.export_onnx, "onnxruntime"),
        # converts the .onnx file of the same name, exported just before (see _jobs)
        "ort": _Target(
            lambda module, io, quant, cal, path: onnx.export_ort(path.with_suffix(".onnx"), path),
            "onnxruntime-ort",
        ),
        "executorch": _Target(executorch.export_executorch, "executorch"),
        "coreml": _Target(
            functools.partial(coreml.export_coreml, deployment_target=coreml_target),
            "coreml" if coreml.can_predict() else None,
            input_dtype=coreml.INPUT_DTYPE,
            max_batch=coreml.MAX_BATCH,
            deployment_target=coreml_target,
        ),
    }


@contextlib.contextmanager
def staged_folder(out: Path, force: bool) -> Iterator[Path]:
    """A staging folder beside ``out`` that becomes ``out`` when the block succeeds: one
    :func:`query_sdk.fileio.folder_transaction` (locked, umask modes, swapped in whole, leftovers
    of a killed export recovered)."""
    out = Path(out)
    if out.exists() and not force:
        raise ExportError(f"{out} exists; pass --force to replace it")
    with folder_transaction(out, start="empty") as folder:
        yield folder
        if out.exists() and not force:
            raise ExportError(f"{out} appeared while exporting; pass --force to replace it")


def _jobs(plan: ExportPlan) -> list[tuple[str, str]]:
    """The plan's (target, quantization) pairs, checked; with ``ort_format`` each ONNX pair is
    followed by its ORT-format conversion ("ort")."""
    if not plan.jobs:
        raise ExportError("nothing to export: no (target, quantization) pair was asked for")
    for target, quant in plan.jobs:
        if quant not in OFFERED.get(target, ()):
            raise ExportError(
                f"{target} does not offer {quant}; it offers {', '.join(OFFERED[target])}"
            )
    if not plan.ort_format:
        return list(plan.jobs)
    if not any(target == "onnx" for target, _ in plan.jobs):
        raise ExportError("--ort-format converts the ONNX artifacts: add --target onnx")
    jobs = []
    for target, quant in plan.jobs:
        jobs += [(target, quant), ("ort", quant)] if target == "onnx" else [(target, quant)]
    return jobs


@dataclass
class _Subject:
    """One model to export in every (target, quantization): the query graph or a gallery head."""

    role: str
    module: nn.Module  # batch norms folded
    io: Callable[[str], ModelIO]  # input dtype of the target -> I/O
    calibration: np.ndarray | None
    validation: np.ndarray
    reference: np.ndarray  # fp32 torch output on ``validation``
    gallery: bool  # measure Recall@1 against the gallery (query only)


def export_bundle(plan: ExportPlan, progress: bool = True) -> ExportResult:
    """Run the plan; returns the written manifest and per-artifact notes."""
    plan_jobs = _jobs(plan)
    if Path(plan.out).exists() and not plan.force:
        raise ExportError(f"{plan.out} exists; pass --force to replace it")
    needs_calibration = any(q == "int8" for _, q in plan_jobs)
    if needs_calibration and plan.calibration is None:
        raise ExportError("int8 needs --calibration images (e.g. the training split)")
    source = load_export_source(plan.model_dir, plan.heads_dir, plan.trust)
    gallery_models = [load_gallery_model(d, source, plan.trust) for d in plan.gallery_models]
    spec = source.input_spec
    cal, val = calibration_and_validation(
        plan.calibration if needs_calibration else None,
        plan.validation,
        spec,
        plan.n_calibration,
        plan.n_validation,
    )
    subjects = [
        _Subject(
            QUERY_ROLE,
            fold_batch_norms(source.graph),
            lambda dtype: query_io(spec, source.embedding_dim, dtype),
            None if cal is None else cal.images,
            val.images,
            _run_torch(source.graph, val.images),
            gallery=True,
        )
    ]
    for name, model in gallery_models:
        head = source.heads[name]
        raw_val = _embed(model, val.images)
        subjects.append(
            _Subject(
                f"{HEAD_ROLE_PREFIX}{name}",
                fold_batch_norms(head),
                lambda _, d=raw_val.shape[1]: head_io(d, source.embedding_dim),
                None if cal is None else _embed(model, cal.images),
                raw_val,
                _run_torch(head, raw_val),
                gallery=False,
            )
        )
    gallery = recall_torch = classes = None
    if plan.gallery is not None:
        if (val.labels < 0).any():
            raise ExportError(f"--gallery needs labelled validation images; {val.name} has none")
        gallery = GalleryCheck(plan.gallery, source.space_id)
        classes = [val.classes[int(i)] for i in val.labels]
        recall_torch = gallery.recall_at_1(subjects[0].reference, classes)
    targets = _targets(plan.coreml_target)
    artifacts, notes = [], {}
    jobs = [(s, t, q) for s in subjects for t, q in plan_jobs]
    with staged_folder(plan.out, plan.force) as folder:
        for subject, target, quant in tqdm(jobs, desc="export", disable=not progress):
            spec_t = targets[target]
            io = subject.io(spec_t.input_dtype)
            name = artifact_file_name(target, quant, subject.role)
            path = folder / name
            notes[name] = list(spec_t.export(subject.module, io, quant, subject.calibration, path))
            artifact = _artifact(folder, name, target, quant, subject.role, io, spec_t)
            artifacts.append(
                _validate(
                    spec_t.backend,
                    folder,
                    artifact,
                    subject,
                    gallery if subject.gallery else None,
                    classes,
                    recall_torch,
                )
            )
        ort_files = [a.file for a in artifacts if a.target == "ort"]
        if ort_files:
            from .onnx import write_required_operators

            write_required_operators(folder, ort_files, ORT_OPERATORS_FILE)
        manifest = BundleManifest(
            space_id=source.space_id,
            mode=source.mode,
            input_spec=spec,
            embedding_dim=source.embedding_dim,
            query_fingerprint=source.query_fingerprint,
            artifacts=artifacts,
            tool_version=version("cmce"),
            extra={
                "calibration": None
                if cal is None
                else {"source": plan.calibration, "images": len(cal)},
                "validation": {"source": plan.validation, "images": len(val)},
                "recall_at_1_torch": recall_torch,
                "ort_required_operators": ORT_OPERATORS_FILE if ort_files else None,
            },
        )
        write_bundle_manifest(folder, manifest)
    return ExportResult(manifest, notes, recall_torch)


def _run_torch(module: nn.Module, inputs: np.ndarray, batch: int = 1024) -> np.ndarray:
    """fp32 torch outputs (eval mode, no grad), in batches."""
    module.eval()
    with torch.no_grad():
        return np.concatenate(
            [
                module(torch.from_numpy(inputs[i : i + batch])).numpy()
                for i in range(0, len(inputs), batch)
            ]
        )


def _embed(model: nn.Module, images: np.ndarray) -> np.ndarray:
    """A gallery model's raw embeddings of query-spec images (converted to its own spec)."""
    return _run_torch(model, to_model_input(images, model.input_spec))


def _validate(
    backend: str | None,
    folder: Path,
    artifact: Artifact,
    subject: _Subject,
    gallery: GalleryCheck | None,
    classes: list[str] | None,
    recall_torch: float | None,
) -> Artifact:
    """``artifact`` with its validation figures: its outputs on the validation inputs through
    the SDK's runtime (the code an app runs) against torch's, and the Recall@1 change through
    the SDK's gallery search; with ``backend`` None (Core ML off macOS) structural only."""
    if backend is None:  # its export checked the package (coreml.check_package)
        return artifact
    try:
        runtime = open_runtime(backend, folder / artifact.file, artifact)
        output = runtime.run(subject.validation)
    except BackendError as exc:
        raise ExportError(
            f"{artifact.file}: the SDK's {backend} runtime refused it: {one_line(exc)}"
        ) from exc
    cmin, cmean = cosine_stats(subject.reference, output)
    delta = space = None
    if gallery is not None:
        delta = gallery.recall_at_1(output, classes) - recall_torch
        space = gallery.space_id
    validation = Validation(backend, len(subject.validation), cmin, cmean, delta, space)
    return replace(artifact, validation=validation, max_batch=runtime.max_batch)


def _artifact(
    folder: Path, name: str, target: str, quant: str, role: str, io: ModelIO, spec_t: _Target
) -> Artifact:
    """The manifest entry of a written artifact, not yet validated."""
    size, digest = path_digest(folder / name)
    return Artifact(
        target=target,
        quantization=quant,
        file=name,
        bytes=size,
        sha256=digest,
        role=role,
        input_name=io.input_name,
        input_shape=list(io.input_shape),
        input_dtype=io.input_dtype,
        output_name=io.output_name,
        output_shape=list(io.output_shape),
        validation=Validation(spec_t.backend or "spec-only", 0, None, None),  # see _validate
        max_batch=spec_t.max_batch,
        deployment_target=spec_t.deployment_target,
    )
