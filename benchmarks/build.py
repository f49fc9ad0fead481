"""Gallery build throughput: ensembles of 1 to 4 models, local engine vs Ray, and reproject.

``python -m benchmarks.build [--smoke]``. Everything goes through the builder's public API
(``gallery_builder.gallery.build`` / ``reproject``), as ``cmce-build-gallery`` does:

- images: the first N images of ``--images`` written once as PNG files into an image folder,
  so every point also pays decoding, as a real gallery does;
- ensembles: the first 1..4 gallery models of ``--run``'s ``models/`` (``--models``). An
  ensemble of k models needs heads for exactly those k, so each gets quick ``unified`` heads
  trained here (1 epoch on ``--head-images`` images: they are for timing, not accuracy).
  Where the run has fewer gallery models than asked for, the missing ones are untrained copies
  of the first model's architecture (same cost per image; named ``<model>-copyN``);
- engines: ``local`` (this process) and ``ray`` (a local Ray with one CPU per core, i.e. two
  workers on a two-core machine); Ray's start-up is timed apart from the builds;
- ``reproject``: the k-model gallery re-indexed with a second set of heads, against the time of
  its full build;
- ``--large``: the same for one gallery model of a real backbone's cost (the ``resnet`` family
  at 224x224 RGB, width 32: about 2.4 G multiply-adds per image, ResNet-18 class; untrained,
  timing only), because the reproject speed-up depends on what the gallery models cost.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import click
import torch

from gallery_builder.data.datasets import ImageSet, load_source
from gallery_builder.gallery.build import BuildSettings, build, reproject
from gallery_builder.models import create_model, load_model, mflops, save_model
from gallery_builder.models.saving import build_from_identity, registered_identity
from gallery_builder.training.fit import embed
from gallery_builder.training.heads import HeadSettings, save_heads, train_heads
from query_sdk.spec import InputSpec, to_model_input

from ._common import (
    machine_info,
    output_options,
    png_folder,
    pyplot,
    resolve_outputs,
    write_outputs,
)

GALLERY_MODELS = ("resnet", "widecnn", "vit", "query")  # "query": the query model's own member
LARGE_SPEC = InputSpec(224, 224, 3, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
LARGE_KWARGS = {"width": 32}


def model_dirs(run: Path, names: list[str], count: int, work: Path) -> list[Path]:
    """``count`` gallery model folders: the named ones, then untrained copies of the first."""
    dirs = [run / "models" / n for n in names[:count]]
    first, config = load_model(dirs[0])
    for k in range(len(dirs), count):
        copy = work / f"{dirs[0].name}-copy{k}"
        if not copy.is_dir():
            torch.manual_seed(1000 + k)
            model = build_from_identity(config["identity"])
            save_model(
                copy,
                model,
                config["identity"],
                "gallery",
                {"note": "untrained copy, for build throughput only"},
            )
        dirs.append(copy)
    return dirs


def quick_heads(
    query_dir: Path, dirs: list[Path], data: ImageSet, n: int, out: Path, seed: int
) -> Path:
    """Unified heads for exactly these gallery models, 1 epoch on ``n`` images (timing only)."""
    query, qcfg = load_model(query_dir)
    models = {d.name: load_model(d) for d in dirs}
    raw = {
        name: embed(m, to_model_input(data.images[:n], m.input_spec))
        for name, (m, _) in models.items()
    }
    settings = HeadSettings(epochs=1, seed=seed)
    heads = train_heads(
        "unified",
        raw,
        embed(query, to_model_input(data.images[:n], query.input_spec)),
        torch.as_tensor(data.labels[:n]),
        settings,
    )
    save_heads(
        out,
        heads,
        qcfg["fingerprint"],
        {name: c["fingerprint"] for name, (_, c) in models.items()},
        settings,
        {"data": data.name, "images": n, "note": "quick heads for build throughput"},
    )
    return out


def start_ray() -> tuple[float | None, str | None]:
    """Start a local Ray (one CPU per core): (seconds it took, None) or (None, its error)."""
    import ray

    start = time.perf_counter()
    try:
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    except Exception as exc:  # Ray raises bare Exception when its node does not come up
        return None, str(exc).splitlines()[0]
    return time.perf_counter() - start, None


def timed_build(
    dirs: list[Path], heads: Path, source: str, out: Path, settings: BuildSettings, engine: str
) -> dict:
    summary = build(dirs, heads, source, out, settings, engine)
    return {
        "seconds": summary.seconds,
        "images_per_second": summary.images_per_second,
        "items": summary.items,
        "bytes_per_item": summary.bytes_per_item,
    }


def build_and_reproject(
    dirs: list[Path], heads: Path, new_heads: Path, source: str, out: Path, settings: BuildSettings
) -> dict:
    """A local build, then ``reproject`` with ``new_heads``: both timed, the gallery removed."""
    shutil.rmtree(out, ignore_errors=True)
    point = timed_build(dirs, heads, source, out, settings, "local")
    summary = reproject(out, new_heads)
    point["reproject"] = {"seconds": summary.seconds, "speedup": point["seconds"] / summary.seconds}
    shutil.rmtree(out, ignore_errors=True)
    return point


def large_point(
    query_dir: Path,
    data: ImageSet,
    n_images: int,
    head_images: int,
    work: Path,
    settings: BuildSettings,
) -> dict:
    """Build and reproject ``n_images`` with one untrained gallery model of a backbone's cost."""
    folder = work / "large-model"
    if not folder.is_dir():
        torch.manual_seed(0)
        model = create_model("resnet", LARGE_SPEC, 128, **LARGE_KWARGS)
        save_model(
            folder,
            model,
            registered_identity("resnet", LARGE_SPEC, 128, **LARGE_KWARGS),
            "gallery",
            {"note": "untrained, for build throughput only"},
        )
    model, _ = load_model(folder)
    images = png_folder(data, n_images, work / f"images-{n_images}")
    heads = [
        quick_heads(query_dir, [folder], data, head_images, work / f"heads-large-{seed}", seed)
        for seed in (0, 1)
    ]
    point = build_and_reproject([folder], *heads, str(images), work / "gallery-large", settings)
    return {"images": n_images, "mflops": mflops(model, LARGE_SPEC), "input": "224x224x3", **point}


def _build_and_reproject_text(point: dict) -> str:
    return (
        f"{point['images_per_second']:.1f} images/s ({point['seconds']:.1f} s); reproject "
        f"{point['reproject']['seconds']:.2f} s ({point['reproject']['speedup']:.1f}× "
        "faster)."
    )


def markdown(result: dict) -> str:
    ray = (
        f"Ray: a local Ray with {result['ray_cpus']} CPUs and an actor pool of 2 per model "
        f"(so k models want 2k CPUs), up to {result['ray_max_models']} model(s); started "
        f"in {result['ray_start_seconds']:.1f} s, which is not in the figures."
        if result.get("ray_start_seconds") is not None
        else f"Ray did not start on this machine: {result['ray_error']}"
        if result.get("ray_error")
        else "Ray: not measured in this run."
    )
    lines = [
        "## Gallery build throughput",
        "",
        f"`gallery_builder.gallery.build` on {result['images']:,} PNG images of "
        f"`{result['source']}` (decoding included), shard size {result['shard_size']:,}, "
        f"M=16, efConstruction=200, torch on {result['torch_threads']} threads. Gallery "
        f"models: {', '.join(result['models'])} (an ensemble of k = the first k); quick "
        f"unified heads per ensemble (timing only). {ray}",
        "",
        "| models | engine | images/s | seconds | reproject s | reproject speed-up |",
        "|---|---|---|---|---|---|",
    ]
    for p in result["points"]:
        rp = p.get("reproject")
        lines.append(
            f"| {p['models']} | {p['engine']} | {p['images_per_second']:.0f} | "
            f"{p['seconds']:.1f} | {rp['seconds']:.2f} | {rp['speedup']:.1f}× |"
            if rp
            else f"| {p['models']} | {p['engine']} | {p['images_per_second']:.0f} | "
            f"{p['seconds']:.1f} | — | — |"
        )
    full, large = result.get("full"), result.get("large")
    if full:
        lines += [
            "",
            f"Full point: `{full['source']}` ({full['items']:,} images, built-in "
            f"arrays, no decoding), {len(result['models'][:3])} models, local engine: "
            + _build_and_reproject_text(full),
        ]
    if large:
        lines += [
            "",
            f"Large point: one gallery model of a backbone's cost (`resnet` family at "
            f"{large['input']}, {large['mflops'] / 2e3:.1f} G multiply-adds per image, "
            f"untrained: timing only), {large['images']:,} PNG images: "
            + _build_and_reproject_text(large),
        ]
    small = [p["reproject"]["speedup"] for p in result["points"] if p.get("reproject")]
    if full:
        small.append(full["reproject"]["speedup"])
    if small:
        goal = (
            f"with the demo's small gallery models: {'met' if max(small) >= 20 else 'not met'}"
            f" (best {max(small):.1f}×): both rebuild every shard's HNSW graph (one thread "
            "per shard, shards side by side), a large share of a build when the models are "
            "cheap"
        )
        if large:
            speedup = large["reproject"]["speedup"]
            goal += (
                f"; with a gallery model of a backbone's cost: "
                f"{'met' if speedup >= 20 else 'not met'} ({speedup:.0f}×)"
            )
        lines += ["", f"**Goal** reproject ≥ 20× faster than a full build {goal}."]
    return "\n".join(lines)


def plot(result: dict):
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.6))
    for engine in sorted({p["engine"] for p in result["points"]}):
        pts = [p for p in result["points"] if p["engine"] == engine]
        ax.plot(
            [p["models"] for p in pts],
            [p["images_per_second"] for p in pts],
            marker="o",
            label=f"build, {engine}",
        )
    rp = [p for p in result["points"] if p.get("reproject")]
    if rp:
        ax.plot(
            [p["models"] for p in rp],
            [p["items"] / p["reproject"]["seconds"] for p in rp],
            marker="s",
            ls="--",
            label="reproject (local)",
        )
    ax.set_yscale("log")
    ax.set_xlabel("gallery models in the ensemble")
    ax.set_ylabel("images / s")
    ax.set_xticks(sorted({p["models"] for p in result["points"]}))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@output_options
@click.option(
    "--run",
    "run_dir",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    required=True,
    help="A `cmce demo` / `cmce train` folder with models/.",
)
@click.option(
    "--models",
    "names",
    default=",".join(GALLERY_MODELS),
    show_default=True,
    help="Gallery models in models/, in ensemble order.",
)
@click.option("--max-models", default=4, show_default=True, help="Largest ensemble.")
@click.option(
    "--query",
    "query_name",
    default="query",
    show_default=True,
    help="Query model in models/ (for the quick heads).",
)
@click.option(
    "--images",
    "source",
    default="fashion-mnist:train",
    show_default=True,
    help="Built-in source the images come from.",
)
@click.option("--n-images", default=3000, show_default=True, help="Images per point.")
@click.option(
    "--head-images", default=2000, show_default=True, help="Images the quick heads train on."
)
@click.option(
    "--engines", default="local,ray", show_default=True, help="Comma-separated: local, ray."
)
@click.option(
    "--ray-max-models",
    default=1,
    show_default=True,
    help="Largest ensemble built with Ray: the Ray engine runs an actor pool of 2 "
    "per model, so k models want 2k CPUs and wait for them on a small machine.",
)
@click.option(
    "--full/--no-full",
    default=False,
    show_default=True,
    help="Also build all of --images (built-in arrays) with the run's "
    "heads/unified and reproject it with heads/to-query.",
)
@click.option(
    "--large/--no-large",
    default=False,
    show_default=True,
    help="Also build and reproject with one gallery model of a backbone's cost "
    "(224x224 RGB, about 2.4 G multiply-adds per image).",
)
@click.option(
    "--large-images", default=500, show_default=True, help="Images for the --large point."
)
@click.option(
    "--work",
    type=click.Path(path_type=Path),
    default=None,
    help="Scratch folder [default: a temporary one].",
)
def main(
    smoke,
    out,
    results_md,
    run_dir,
    names,
    max_models,
    query_name,
    source,
    n_images,
    head_images,
    engines,
    ray_max_models,
    full,
    large,
    large_images,
    work,
) -> None:
    """Build throughput of the gallery builder for 1..4 gallery models, local vs Ray.

    \b
    Examples:
      python -m benchmarks.build --smoke --run runs/demo
      python -m benchmarks.build --run runs/demo --n-images 3000 --full
    """
    out, results_md = resolve_outputs(smoke, out, results_md)
    if smoke:
        n_images, head_images, max_models, large_images = 300, 300, 2, 20
    engine_list = [e.strip() for e in engines.split(",") if e.strip()]
    torch.set_num_threads(os.cpu_count())
    machine = machine_info()
    work = Path(work or tempfile.mkdtemp(prefix="cmce-bench-build-"))
    work.mkdir(parents=True, exist_ok=True)
    data = load_source(source)
    folder = png_folder(data, n_images, work / f"images-{n_images}")
    settings = BuildSettings(shard_size=max(1000, n_images // 3))
    name_list = [n.strip() for n in names.split(",") if n.strip()]
    ray_start, ray_error = start_ray() if "ray" in engine_list else (None, None)
    if ray_error:
        click.echo(f"Ray did not start, building with the local engine only: {ray_error}", err=True)
        engine_list.remove("ray")
    points = []
    for count in range(1, max_models + 1):
        dirs = model_dirs(run_dir, name_list, count, work)
        heads = quick_heads(
            run_dir / "models" / query_name,
            dirs,
            data,
            head_images,
            work / f"heads-{count}",
            seed=0,
        )
        for engine in [e for e in engine_list if e != "ray" or count <= ray_max_models]:
            click.echo(f"{count} models, {engine}", err=True)
            gallery = work / f"gallery-{count}-{engine}"
            shutil.rmtree(gallery, ignore_errors=True)
            point = {"models": count, "model_names": [d.name for d in dirs], "engine": engine}
            if engine == "local":
                new = quick_heads(
                    run_dir / "models" / query_name,
                    dirs,
                    data,
                    head_images,
                    work / f"heads-{count}-b",
                    seed=1,
                )
                point.update(build_and_reproject(dirs, heads, new, str(folder), gallery, settings))
            else:
                point.update(timed_build(dirs, heads, str(folder), gallery, settings, engine))
                shutil.rmtree(gallery, ignore_errors=True)
            points.append(point)
    result = {
        "benchmark": "build",
        "smoke": smoke,
        "source": source,
        "images": n_images,
        "shard_size": settings.shard_size,
        "torch_threads": torch.get_num_threads(),
        "models": [d.name for d in model_dirs(run_dir, name_list, max_models, work)],
        "ray_start_seconds": ray_start,
        "ray_cpus": os.cpu_count() if ray_start else None,
        "ray_max_models": ray_max_models,
        "ray_error": ray_error,
        "points": points,
        "machine": machine,
    }
    if full:
        click.echo(f"full build of {source}", err=True)
        dirs = [run_dir / "models" / n for n in name_list]
        result["full"] = {
            "source": source,
            **build_and_reproject(
                dirs,
                run_dir / "heads" / "unified",
                run_dir / "heads" / "to-query",
                source,
                work / "gallery-full",
                BuildSettings(),
            ),
        }
    if large:
        click.echo("large gallery model", err=True)
        result["large"] = large_point(
            run_dir / "models" / query_name,
            data,
            large_images,
            min(head_images, large_images),
            work,
            settings,
        )
    paths = write_outputs("build", result, markdown(result), out, results_md, plot(result))
    click.echo(json.dumps({k: str(v) for k, v in paths.items()}))


if __name__ == "__main__":
    main()
