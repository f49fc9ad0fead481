"""Query embedding latency: torch eager vs ONNX Runtime vs ExecuTorch (XNNPACK), fp32 and int8.

``python -m benchmarks.latency [--smoke]``. One image per call, p50 / p90 over many calls, at
1 thread (a phone's CPU core is emulated by one thread of this machine) and 2 threads, for

- the project's query model (its checkpoint + the unified query head, one graph), and
- MobileNetV3-Small at 224x224 RGB (random weights; the architecture of torchvision's
  ``mobilenet_v3_small``, ``benchmarks/mobilenet_v3.py``), so that the figures can be set
  beside published phone numbers.

The exported artifacts come from the export package (``cmce-export``'s code path: the same
graph, the same int8 recipe, a query bundle) and run through ``query_sdk.runtimes``, as the
SDK runs them. Speed-ups are against torch eager fp32 at the same thread count, in the same run.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import click
import numpy as np
import torch

from export.calibration import MIN_VALIDATION_IMAGES
from export.graph import load_export_source
from gallery_builder.data.datasets import load_source
from gallery_builder.models import count_params, create_model, mflops, save_model
from gallery_builder.models.mobilenet_v3 import IMAGENET_SPEC, PUBLISHED_PARAMS
from gallery_builder.models.saving import registered_identity
from query_sdk.bundle_format import (
    MANIFEST_FILE,
    QUERY_ROLE,
    read_bundle_manifest,
    verify_bundle,
)
from query_sdk.runtimes import BACKENDS, BackendError, open_runtime
from query_sdk.spec import to_model_input

from ._common import (
    machine_info,
    output_options,
    pyplot,
    resolve_outputs,
    timed,
    write_outputs,
)

THREADS = (1, 2)
GOAL_SPEEDUP = 2.0


JOBS = [("onnx", "fp32"), ("onnx", "int8"), ("executorch", "fp32"), ("executorch", "int8")]


def export_query_bundle(
    model_dir: Path,
    heads_dir: Path | None,
    images: str,
    out: Path,
    smoke: bool,
    jobs: list[tuple[str, str]] = JOBS,
) -> Path:
    """A query bundle with ONNX and ExecuTorch artifacts, fp32 and int8, made by the export
    package exactly as ``cmce-export`` makes it (calibrated and validated on ``images``); an
    earlier run's bundle in ``out`` with those artifacts is reused."""
    from export.bundle import ExportPlan, export_bundle

    if (out / MANIFEST_FILE).is_file():
        manifest = verify_bundle(out)
        if {(a.target, a.quantization) for a in manifest.artifacts} >= set(jobs):
            return out  # exported by an earlier run (checksums verified)
    plan = ExportPlan(
        model_dir=model_dir,
        heads_dir=heads_dir,
        jobs=list(jobs),
        validation=images,
        out=out,
        calibration=images,
        n_calibration=32 if smoke else 512,
        n_validation=MIN_VALIDATION_IMAGES,
        force=True,
    )
    export_bundle(plan, progress=False)
    return out


def resized_images(source: str, n: int, path: Path) -> str:
    """The first ``n`` images of ``source`` at 224x224 RGB as an .npy (real images for the
    int8 calibration of MobileNetV3-Small)."""
    if not path.is_file():
        images = to_model_input(load_source(source).images[:n], IMAGENET_SPEC)
        np.save(path, images, allow_pickle=False)
    return str(path)


def mobilenet_checkpoint(folder: Path) -> Path:
    """MobileNetV3-Small with random weights (seed 0) as a query checkpoint folder."""
    if not (folder / "config.json").is_file():
        torch.manual_seed(0)
        model = create_model("mobilenet_v3_small", IMAGENET_SPEC, None)
        save_model(
            folder,
            model,
            registered_identity("mobilenet_v3_small", IMAGENET_SPEC, None),
            "query",
            {"note": "random weights, for latency only"},
        )
    return folder


def eager_latency(module: torch.nn.Module, image: np.ndarray, threads: int, n: int) -> dict:
    torch.set_num_threads(threads)
    x = torch.from_numpy(image)
    module.eval()
    with torch.inference_mode():
        return timed(lambda i: module(x), n, warmup=10)


def runtime_rows(bundle: Path, image: np.ndarray, n: int) -> list[dict]:
    """p50/p90 of every query artifact a backend here runs, at each thread count."""
    manifest = verify_bundle(bundle)
    by_target = {target: backend for backend, target in BACKENDS.items()}
    rows = []
    for a in manifest.artifacts:
        if a.role != QUERY_ROLE or a.target not in by_target:
            continue
        row = {
            "runtime": by_target[a.target],
            "quantization": a.quantization,
            "file": a.file,
            "bytes": a.bytes,
            "cosine_min": a.validation.cosine_min,
        }
        for threads in THREADS:
            try:
                runtime = open_runtime(by_target[a.target], bundle / a.file, a, threads)
            except BackendError as exc:
                row["error"] = str(exc).split(";")[0]
                break
            row[f"threads_{threads}"] = timed(lambda i, r=runtime: r.run(image), n, warmup=10)
        rows.append(row)
    return rows


def measure_model(
    name: str, module: torch.nn.Module, bundle: Path, image: np.ndarray, n: int
) -> dict:
    eager = {
        "runtime": "torch eager",
        "quantization": "fp32",
        "file": None,
        "bytes": None,
        **{f"threads_{t}": eager_latency(module, image, t, n) for t in THREADS},
    }
    rows = [eager] + runtime_rows(bundle, image, n)
    for row in rows:
        for t in THREADS:
            if f"threads_{t}" in row:
                row[f"speedup_{t}"] = (
                    eager[f"threads_{t}"]["p50_ms"] / row[f"threads_{t}"]["p50_ms"]
                )
    return {"model": name, "input": list(image.shape), "bundle": str(bundle), "rows": rows}


def markdown(result: dict) -> str:
    lines = [
        "## Query embedding latency",
        "",
        "One image per call; p50 / p90 in ms; speed-up = torch eager fp32 p50 / p50 at "
        "the same thread count (same run). 1 thread stands in for one phone core; CPU p50 is "
        "the process CPU time per call (the busy machine adds waits to the wall time). "
        "Artifacts from the export package, run through `query_sdk.runtimes`.",
        "",
    ]
    for m in result["models"]:
        lines += [
            f"**{m['model']}**, input {'x'.join(map(str, m['input']))} uint8"
            + (
                f" ({m['params']:,} parameters, {m['mflops'] / 2:.1f} M multiply-adds)"
                if "params" in m
                else ""
            ),
            "",
            "| runtime | quantization | 1 thread p50 / p90 | speed-up | 1 thread CPU p50 "
            "| 2 threads p50 / p90 | speed-up | file bytes |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in m["rows"]:
            if "error" in r:
                lines.append(
                    f"| {r['runtime']} | {r['quantization']} | not runnable here: "
                    f"{r['error']} | | | | | |"
                )
                continue
            cells = []
            for t in THREADS:
                s = r[f"threads_{t}"]
                cells += [f"{s['p50_ms']:.3f} / {s['p90_ms']:.3f}", f"{r[f'speedup_{t}']:.2f}×"]
                if t == 1:
                    cells.append(f"{s['cpu_p50_ms']:.3f}")
            size = f"{r['bytes']:,}" if r["bytes"] else "—"
            lines.append(f"| {r['runtime']} | {r['quantization']} | {' | '.join(cells)} | {size} |")
        lines.append("")
    lines.append(_goal(result))
    return "\n".join(lines)


def _goal(result: dict) -> str:
    mobile = next((m for m in result["models"] if m["model"].startswith("MobileNetV3")), None)
    row = mobile and next(
        (
            r
            for r in mobile["rows"]
            if r["runtime"] == "executorch" and r["quantization"] == "int8" and "speedup_1" in r
        ),
        None,
    )
    if row is None:
        return "**Goal** ExecuTorch int8 ≥ 2× torch eager fp32 at 1 thread: not measured."
    met = "met" if row["speedup_1"] >= GOAL_SPEEDUP else "not met"
    eager = mobile["rows"][0]["threads_1"]["cpu_p50_ms"]
    cpu = eager / row["threads_1"]["cpu_p50_ms"]
    return (
        f"**Goal** ExecuTorch int8 at 1 thread ≥ {GOAL_SPEEDUP:g}× faster than torch eager "
        f"fp32 on MobileNetV3-Small: {met} in wall time ({row['speedup_1']:.2f}×); in CPU "
        f"time per call {cpu:.2f}× ({'met' if cpu >= GOAL_SPEEDUP else 'not met'})."
    )


def plot(result: dict):
    plt = pyplot()
    fig, axes = plt.subplots(
        1, len(result["models"]), figsize=(5.5 * len(result["models"]), 3.6), squeeze=False
    )
    for ax, m in zip(axes[0], result["models"], strict=True):
        rows = [r for r in m["rows"] if "threads_1" in r]
        names = [f"{r['runtime']}\n{r['quantization']}" for r in rows]
        x = np.arange(len(rows))
        for k, t in enumerate(THREADS):
            ax.bar(
                x + (k - 0.5) * 0.38,
                [r[f"threads_{t}"]["p50_ms"] if f"threads_{t}" in r else 0 for r in rows],
                0.38,
                label=f"{t} thread(s)",
            )
        ax.set_xticks(x, names, fontsize=7)
        ax.set_yscale("log")
        ax.set_ylabel("p50 ms / image (log)")
        ax.set_title(m["model"], fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@output_options
@click.option(
    "--query-model",
    type=click.Path(exists=True, path_type=Path),
    required=True,
    help="The project's query checkpoint.",
)
@click.option(
    "--query-heads",
    type=click.Path(exists=True, path_type=Path),
    help="Its heads (unified: the query head is fused into the graph).",
)
@click.option(
    "--calibration",
    "source",
    default="fashion-mnist:train",
    show_default=True,
    help="Images for the query model's int8 calibration and timing.",
)
@click.option(
    "--bundle",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="An exported bundle of --query-model to time [default: export one].",
)
@click.option(
    "--mobilenet/--no-mobilenet",
    default=True,
    show_default=True,
    help="Also MobileNetV3-Small at 224x224.",
)
@click.option("--iterations", default=300, show_default=True, help="Timed calls per point.")
@click.option(
    "--work",
    type=click.Path(path_type=Path),
    default=None,
    help="Where bundles are exported [default: a temporary folder].",
)
def main(
    smoke, out, results_md, query_model, query_heads, source, bundle, mobilenet, iterations, work
) -> None:
    """Latency of one query image through every runtime and quantization, 1 and 2 threads.

    \b
    Example:
      python -m benchmarks.latency --query-model runs/demo/models/query \\
          --query-heads runs/demo/heads/unified
    """
    out, results_md = resolve_outputs(smoke, out, results_md)
    iterations = 20 if smoke else iterations
    machine = machine_info()
    work = Path(work or tempfile.mkdtemp(prefix="cmce-bench-latency-"))
    work.mkdir(parents=True, exist_ok=True)
    threads_before = torch.get_num_threads()
    models = []
    graph = load_export_source(query_model, query_heads).graph
    image = load_source(source, graph.model.input_spec).images[:1]
    bundle = bundle or export_query_bundle(
        query_model, query_heads, source, work / "query-bundle", smoke
    )
    name = "query model + query head (Fashion-MNIST)"
    models.append(
        {
            "params": count_params(graph),
            "mflops": mflops(graph, graph.model.input_spec),
            **measure_model(name, graph, bundle, image, iterations),
        }
    )
    if mobilenet:
        folder = mobilenet_checkpoint(work / "mobilenet_v3_small")
        n = MIN_VALIDATION_IMAGES + (32 if smoke else 512)
        images = resized_images(source, n, work / f"images-224-{n}.npy")
        bundle = export_query_bundle(folder, None, images, work / "mobilenet-bundle", smoke)
        module = load_export_source(folder, None).graph
        name = "MobileNetV3-Small 224 (random weights)"
        models.append(
            {
                "params": count_params(module),
                "mflops": mflops(module, IMAGENET_SPEC),
                "published_params": PUBLISHED_PARAMS,
                **measure_model(name, module, bundle, np.load(images)[:1], iterations),
            }
        )
    torch.set_num_threads(threads_before)
    manifest = read_bundle_manifest(Path(models[0]["bundle"]))
    result = {
        "benchmark": "latency",
        "smoke": smoke,
        "threads": list(THREADS),
        "iterations": iterations,
        "space_id": manifest.space_id,
        "models": models,
        "machine": machine,
    }
    paths = write_outputs("latency", result, markdown(result), out, results_md, plot(result))
    click.echo(json.dumps({k: str(v) for k, v in paths.items()}))


if __name__ == "__main__":
    main()
