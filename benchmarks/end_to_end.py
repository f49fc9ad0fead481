"""End to end on the phone's path: image file -> hits through ``query_sdk.Searcher``, 1 thread.

``python -m benchmarks.end_to_end --bundle B --gallery G [--gallery G2 ...] [--smoke]``. For
every gallery (e.g. the same items in many small shards and in one) and every query artifact of
the bundle this machine can run (ONNX Runtime, ExecuTorch; fp32 and int8), each query is timed
per stage with the SDK's public API:

- preprocessing: ``query_sdk.images.load_image`` (PNG decode, grey/RGB, resize to the spec);
- embedding: ``Searcher.embed`` on the decoded pixels (model + re-normalisation);
- search: ``Searcher.gallery.search`` (every shard at the manifest's ef_search, exact merge,
  ids and payloads);
- search + rejection: the same with ``max_uncertainty`` (items above an uncertainty quantile
  are left out; more candidates are fetched when needed);

and the whole ``Searcher.search(path, k, max_uncertainty)`` call is timed on its own.
"""

from __future__ import annotations

import json
from pathlib import Path

import click
import numpy as np

from gallery_builder.data.datasets import load_source
from query_sdk import Searcher
from query_sdk.images import load_image

from ._common import (
    machine_info,
    open_searchers,
    output_options,
    png_folder,
    pyplot,
    resolve_outputs,
    timed,
    write_outputs,
)

STAGES = ("preprocessing", "embedding", "search", "search_with_rejection")
GOAL_MS = 2.0


def measure(searcher: Searcher, paths: list[Path], k: int, reject: str) -> dict:
    """Per-stage and total latency over ``paths``, one query at a time."""
    pixels = [load_image(p, searcher.spec) for p in paths]
    vectors = [searcher.embed(x) for x in pixels]
    gallery = searcher.gallery
    stages = {
        "preprocessing": timed(lambda i: load_image(paths[i], searcher.spec), len(paths)),
        "embedding": timed(lambda i: searcher.embed(pixels[i]), len(paths)),
        "search": timed(lambda i: gallery.search(vectors[i], k), len(paths)),
        "search_with_rejection": timed(lambda i: gallery.search(vectors[i], k, reject), len(paths)),
    }
    out = {**stages, "total": timed(lambda i: searcher.search(paths[i], k, reject), len(paths))}
    out["rejection_p50_ms"] = out["search_with_rejection"]["p50_ms"] - out["search"]["p50_ms"]
    return out


def measure_gallery(bundle: Path, gallery: Path, paths: list[Path], k: int, reject: str) -> dict:
    """Every runnable query artifact of ``bundle`` against ``gallery``."""
    rows, searcher = [], None
    for row, opened in open_searchers(bundle, gallery, threads=1):
        if opened is not None:
            searcher = opened
            row["stages"] = measure(searcher, paths, k, reject)
        rows.append(row)
    manifest = searcher.gallery.manifest
    return {
        "path": str(gallery),
        "items": searcher.gallery.count,
        "shards": len(manifest.shards),
        "ef_search": manifest.hnsw["ef_search"],
        "variants": rows,
    }


def _gallery_label(g: dict) -> str:
    return f"{g['shards']} × {g['items'] // g['shards']:,} items, ef {g['ef_search']}"


def markdown(result: dict) -> str:
    galleries = ", ".join(
        f"`{g['path']}` ({g['items']:,} items in {_gallery_label(g)})" for g in result["galleries"]
    )
    lines = [
        "## End to end: image file → hits (query SDK, 1 thread)",
        "",
        f"`Searcher.search(path, k={result['k']}, max_uncertainty="
        f'"{result["max_uncertainty"]}")` on {result["queries"]} PNG query images '
        f"against {galleries}; every shard is searched at the manifest's ef_search. "
        "p50 / p90 in ms per stage, each timed apart; total = the whole call (its CPU time "
        "beside it: on a busy machine the wall time also holds waits for a core).",
        "",
        "| gallery | model | preprocessing | embedding | search | rejection (extra) "
        "| total p50 | total p90 | total CPU p50 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for g in result["galleries"]:
        for v in g["variants"]:
            head = f"| {_gallery_label(g)} | {v['backend']} {v['quantization']} |"
            if "error" in v:
                lines.append(f"{head} not runnable here: {v['error']} | | | | | | |")
                continue
            s = v["stages"]
            cells = [f"{s[n]['p50_ms']:.3f} / {s[n]['p90_ms']:.3f}" for n in STAGES[:3]]
            lines.append(
                f"{head} {' | '.join(cells)} | {s['rejection_p50_ms']:+.3f} | "
                f"{s['total']['p50_ms']:.3f} | {s['total']['p90_ms']:.3f} | "
                f"{s['total']['cpu_p50_ms']:.3f} |"
            )
    ok = [(g, v) for g in result["galleries"] for v in g["variants"] if "stages" in v]
    if ok:
        g, best = min(ok, key=lambda gv: gv[1]["stages"]["total"]["p50_ms"])
        p50 = best["stages"]["total"]["p50_ms"]
        lines += [
            "",
            f"**Goal** p50 under {GOAL_MS:g} ms at 1 thread: "
            f"{'met' if p50 < GOAL_MS else 'not met'} (best {p50:.3f} ms, "
            f"{best['backend']} {best['quantization']}, {_gallery_label(g)}).",
        ]
    return "\n".join(lines)


def plot(result: dict):
    plt = pyplot()
    ok = [(g, v) for g in result["galleries"] for v in g["variants"] if "stages" in v]
    fig, ax = plt.subplots(figsize=(7, 0.6 * len(ok) + 1.5))
    names = [f"{v['backend']} {v['quantization']}\n{_gallery_label(g)}" for g, v in ok]
    left = np.zeros(len(ok))
    for stage in STAGES[:3]:
        widths = np.array([v["stages"][stage]["p50_ms"] for _, v in ok])
        ax.barh(names, widths, left=left, label=stage)
        left += widths
    rej = np.array([max(v["stages"]["rejection_p50_ms"], 0.0) for _, v in ok])
    ax.barh(names, rej, left=left, label="rejection")
    ax.axvline(GOAL_MS, color="grey", ls="--", label=f"goal {GOAL_MS:g} ms")
    ax.set_xlabel("p50 ms per query (1 thread)")
    ax.tick_params(axis="y", labelsize=7)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@output_options
@click.option(
    "--bundle",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    required=True,
    help="Query bundle (cmce-export output).",
)
@click.option(
    "--gallery",
    "galleries",
    multiple=True,
    required=True,
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Gallery in the bundle's space (repeatable: e.g. the same items in 10k-item "
    "shards and in one shard).",
)
@click.option(
    "--images",
    "source",
    default="fashion-mnist:test",
    show_default=True,
    help="Built-in source the query images come from (written as PNG files).",
)
@click.option("--queries", "n_queries", default=1000, show_default=True)
@click.option("--k", default=10, show_default=True)
@click.option(
    "--max-uncertainty",
    "reject",
    default="q0.9",
    show_default=True,
    help="Rejection threshold: a number or a manifest quantile such as q0.9.",
)
@click.option(
    "--work",
    type=click.Path(path_type=Path),
    default=None,
    help="Where the PNG query images go [default: <out>/images].",
)
def main(smoke, out, results_md, bundle, galleries, source, n_queries, k, reject, work) -> None:
    """Per-stage latency of one query through the query SDK at one thread.

    \b
    Example:
      python -m benchmarks.end_to_end --bundle bundle/ --gallery gallery/
    """
    out, results_md = resolve_outputs(smoke, out, results_md)
    n_queries = 30 if smoke else n_queries
    machine = machine_info()
    data = load_source(source)
    folder = png_folder(data, n_queries, Path(work or out / "images") / f"{data.name}")
    paths = sorted(folder.glob("*/*.png"))[:n_queries]
    results = [measure_gallery(bundle, gallery, paths, k, reject) for gallery in galleries]
    result = {
        "benchmark": "end_to_end",
        "smoke": smoke,
        "bundle": str(bundle),
        "galleries": results,
        "queries": len(paths),
        "query_source": source,
        "k": k,
        "max_uncertainty": reject,
        "threads": 1,
        "machine": machine,
    }
    paths_out = write_outputs("end_to_end", result, markdown(result), out, results_md, plot(result))
    click.echo(json.dumps({key: str(v) for key, v in paths_out.items()}))


if __name__ == "__main__":
    main()
