"""``cmce-export``: the query model (T_q fused in unified mode) as Core ML, ExecuTorch and ONNX
artifacts, quantized and numerically checked, in one query bundle."""

from __future__ import annotations

import json
import logging
import os
import warnings
from pathlib import Path

import click

from gallery_builder.cli.options import experiment_option, from_experiment, trust_option
from query_sdk.bundle_format import COREML_DEPLOYMENT_TARGETS, ORT_OPERATORS_FILE
from query_sdk.bundle_format import QUANTIZATIONS as QUANTS
from query_sdk.errors import cli_errors

from .bundle import OFFERED, ExportPlan, export_bundle
from .coreml import DEFAULT_DEPLOYMENT_TARGET

PathType = click.Path(path_type=Path)
TARGETS = ("onnx", "executorch", "coreml")


def _quiet_third_party() -> None:
    """Hide the exporters' own chatter that says nothing about this export (optional kernels
    torchao cannot load, torchvision ops torch.onnx skips, deprecation notices); CMCE_DEBUG=1
    shows it all."""
    if os.environ.get("CMCE_DEBUG"):
        return
    for name in ("torchao", "torch.utils._pytree", "torch.onnx._internal.exporter._registration"):
        logging.getLogger(name).setLevel(logging.ERROR)
    for category in (FutureWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category)


def _jobs(targets: tuple[str, ...], quants: tuple[str, ...]):
    """(target, quantization) pairs asked for, and those left out because a target does not
    offer that precision."""
    targets = TARGETS if "all" in targets else tuple(dict.fromkeys(targets))
    quants = (
        QUANTS
        if "all" in quants
        else tuple(dict.fromkeys("fp32" if q == "none" else q for q in quants))
    )
    pairs = [(t, q) for t in targets for q in quants]
    return [p for p in pairs if p[1] in OFFERED[p[0]]], [
        p for p in pairs if p[1] not in OFFERED[p[0]]
    ]


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--model", "model_dir", type=PathType, help="Query model checkpoint folder.")
@click.option(
    "--heads",
    "heads_dir",
    type=PathType,
    help="Heads checkpoint folder. Unified heads: T_q is fused behind the query model "
    "and the bundle is in the heads' space. Without: the query model's own space.",
)
@click.option(
    "--target",
    "targets",
    multiple=True,
    default=("all",),
    show_default=True,
    type=click.Choice([*TARGETS, "all"]),
    help="Export target (repeatable).",
)
@click.option(
    "--quantize",
    "quants",
    multiple=True,
    default=("fp32",),
    show_default=True,
    type=click.Choice(["none", *QUANTS, "all"]),
    help="Precision (repeatable). none = fp32. fp16 is Core ML only; int8 is static "
    "int8 (ONNX QDQ, ExecuTorch PT2E/XNNPACK) or int8 weights (Core ML); pal6/pal4 (Core ML "
    "only) store each weight tensor as a 64/16-entry k-means palette of fp16 values.",
)
@click.option(
    "--coreml-target",
    type=click.Choice(COREML_DEPLOYMENT_TARGETS),
    help=f"Minimum OS of the Core ML artifacts (default {DEFAULT_DEPLOYMENT_TARGET}; "
    "macOS13/14/15 are the same Core ML versions as iOS16/17/18). Recorded in the manifest.",
)
@click.option(
    "--ort-format",
    is_flag=True,
    help="Also save each ONNX artifact in ONNX Runtime's ORT format (.ort, for reduced "
    f"mobile builds; validated like the .onnx) and {ORT_OPERATORS_FILE} for such a build.",
)
@click.option(
    "--calibration",
    help="Images for int8 calibration: a built-in set (fashion-mnist:train, "
    "fashion-mnist:test, digits, glyphs, han), an image folder or a .npy of uint8 "
    "(N, H, W, C).",
)
@click.option(
    "--calibration-images",
    default=512,
    show_default=True,
    help="How many calibration images to use.",
)
@click.option(
    "--validation",
    required=True,
    help="Held-out images to compare every artifact with the fp32 torch model "
    "(same kinds of source as --calibration).",
)
@click.option(
    "--validation-images",
    default=1000,
    show_default=True,
    help="How many validation images (at least 256).",
)
@click.option(
    "--gallery",
    type=PathType,
    help="A gallery in the same space: also measure the Recall@1 change of each "
    "artifact (needs labelled validation images).",
)
@click.option(
    "--gallery-model",
    "gallery_models",
    multiple=True,
    type=PathType,
    help="Also export the head of this gallery model (repeatable; needs --heads) as "
    "its own artifact, for edge devices that enroll items into the space; "
    "calibrated and validated on this model's embeddings of the images.",
)
@click.option("--out", required=True, type=PathType, help="Bundle folder to create.")
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
@experiment_option
@trust_option
@cli_errors
def main(
    model_dir,
    heads_dir,
    experiment,
    targets,
    quants,
    coreml_target,
    ort_format,
    calibration,
    calibration_images,
    validation,
    validation_images,
    gallery,
    gallery_models,
    out,
    force,
    as_json,
    trust,
) -> None:
    """Export the query side as one bundle: manifest.json (space id, input spec, every
    artifact's checksum and validation figures) plus a model file per target and precision.

    Every model takes the app's uint8 NHWC images (Core ML: the same pixel values as float32)
    and returns L2-normalised vectors: preprocessing is inside.

    \b
    Examples:
      cmce-export --experiment runs/demo --target onnx --quantize int8 \\
          --calibration fashion-mnist:train --validation fashion-mnist:test --out bundle/
      cmce-export --model runs/demo/models/query --heads runs/demo/heads/unified \\
          --target all --quantize fp32 --quantize int8 --calibration fashion-mnist:train \\
          --validation fashion-mnist:test --gallery gallery/ --out bundle/
      cmce-export --model q --heads h --target coreml --quantize fp16 --quantize pal4 \\
          --coreml-target iOS16 --validation fashion-mnist:test --out ios-bundle/
      cmce-export --model q --heads h --target onnx --quantize fp32 --quantize int8 \\
          --ort-format --calibration fashion-mnist:train --validation fashion-mnist:test \\
          --out android-bundle/
    """
    if experiment is not None:
        chosen = from_experiment(experiment, query_model=model_dir, heads=heads_dir)
        model_dir, heads_dir = chosen["query_model"], chosen["heads"]
    elif model_dir is None:
        raise click.UsageError("give --model DIR or --experiment DIR")
    _quiet_third_party()
    jobs, skipped = _jobs(targets, quants)
    for target, quant in skipped:
        click.echo(f"note: {target} does not offer {quant}; left out", err=True)
    if coreml_target and not any(t == "coreml" for t, _ in jobs):
        click.echo("note: --coreml-target applies to Core ML artifacts only; none asked", err=True)
    plan = ExportPlan(
        model_dir=model_dir,
        heads_dir=heads_dir,
        jobs=jobs,
        validation=validation,
        out=out,
        calibration=calibration,
        n_calibration=calibration_images,
        n_validation=validation_images,
        gallery=gallery,
        gallery_models=list(gallery_models),
        force=force,
        coreml_target=coreml_target or DEFAULT_DEPLOYMENT_TARGET,
        ort_format=ort_format,
        trust=trust,
    )
    result = export_bundle(plan, progress=not as_json)
    manifest = result.manifest
    if as_json:
        click.echo(json.dumps(manifest.to_dict(), indent=2, sort_keys=True))
        return
    click.echo(
        f"{out}: space {manifest.space_id} ({manifest.mode}), "
        f"{manifest.embedding_dim}-dim, input {manifest.input_spec.shape} uint8"
    )
    if result.recall_at_1_torch is not None:
        click.echo(f"torch fp32 Recall@1 against {gallery}: {100 * result.recall_at_1_torch:.2f}")
    for a in manifest.artifacts:
        v = a.validation
        figures = (
            f"cosine min {v.cosine_min:.5f} mean {v.cosine_mean:.6f}"
            if v.cosine_mean is not None
            else "validated structurally (no Core ML here)"
        )
        if v.recall_at_1_delta is not None:
            figures += f", Recall@1 {100 * v.recall_at_1_delta:+.2f} pt"
        if a.deployment_target:
            figures += f" [{a.deployment_target}]"
        click.echo(f"  {a.file:28s} {a.bytes / 1024:8.1f} KiB  {figures}")
    if manifest.extra.get("ort_required_operators"):
        click.echo(f"  reduced ORT build: --include_ops_by_config {out / ORT_OPERATORS_FILE}")
