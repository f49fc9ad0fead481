"""Accuracy: the core's report table, and Recall@1 of every exported query model through the SDK.

``python -m benchmarks.accuracy --report R --bundle B --gallery G --query-model Q
--query-heads H [--smoke]``. The first table is the experiment's own (``report.json`` of
``cmce demo``, exact search, its protocol). The second runs the query images through
``query_sdk.Searcher`` for every artifact of the bundle this machine can run, and through the
torch checkpoint (the fp32 reference the artifacts were exported from) into the same
gallery search, so the difference is what export and quantization cost. A hit is correct when
its gallery item's class (stored in the shard sidecar by the gallery builder) is the query's.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from export.validate import top1_recall
from gallery_builder.data.datasets import load_source
from gallery_builder.evaluation.report import settings_table

from ._common import (
    machine_info,
    open_searchers,
    output_options,
    pyplot,
    resolve_outputs,
    write_outputs,
)
from .search import real_queries


def markdown(result: dict, table: str | None) -> str:
    lines = ["## Accuracy", ""]
    if table:
        lines += [
            f"From `{result['report']}` ({result['protocol']}). Exact search, in %:",
            "",
            table,
            "",
        ]
    lines += [
        f"Through the SDK: {result['queries']:,} queries of `{result['query_source']}` "
        f"against `{result['gallery']}` ({result['gallery_items']:,} items, HNSW at the "
        "manifest's ef_search), top-1 class = query class. Reference: the torch "
        "checkpoint's vectors in the same gallery search.",
        "",
        "| query model | Recall@1 (%) | vs torch fp32 (points) |",
        "|---|---|---|",
    ]
    ref = result["torch_fp32_recall_at_1"]
    lines.append(f"| torch fp32 (checkpoint) | {100 * ref:.2f} | — |")
    for v in result["variants"]:
        if "error" in v:
            lines.append(
                f"| {v['backend']} {v['quantization']} | not runnable here: {v['error']} | |"
            )
        else:
            lines.append(
                f"| {v['backend']} {v['quantization']} | "
                f"{100 * v['recall_at_1']:.2f} | "
                f"{100 * (v['recall_at_1'] - ref):+.2f} |"
            )
    return "\n".join(lines)


def plot(result: dict):
    plt = pyplot()
    ok = [v for v in result["variants"] if "recall_at_1" in v]
    names = ["torch fp32"] + [f"{v['backend']}\n{v['quantization']}" for v in ok]
    values = [result["torch_fp32_recall_at_1"]] + [v["recall_at_1"] for v in ok]
    fig, ax = plt.subplots(figsize=(1.2 * len(names) + 1.5, 3.4))
    ax.bar(names, [100 * v for v in values])
    low = 100 * min(values)
    ax.set_ylim(max(0.0, low - 5), min(100.0, 100 * max(values) + 2))
    ax.set_ylabel("Recall@1 (%) through the SDK")
    ax.tick_params(axis="x", labelsize=7)
    fig.tight_layout()
    return fig


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@output_options
@click.option(
    "--report",
    "report_path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="report.json of `cmce demo` (its table is copied).",
)
@click.option(
    "--bundle", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True
)
@click.option(
    "--gallery", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True
)
@click.option(
    "--query-model",
    type=click.Path(exists=True, path_type=Path),
    required=True,
    help="The query checkpoint the bundle was exported from.",
)
@click.option(
    "--query-heads",
    type=click.Path(exists=True, path_type=Path),
    required=True,
    help="Its heads folder (the query head in unified mode).",
)
@click.option(
    "--images",
    "source",
    default="fashion-mnist:test",
    show_default=True,
    help="Query images (not in the gallery).",
)
@click.option("--queries", "n_queries", default=10000, show_default=True)
def main(
    smoke,
    out,
    results_md,
    report_path,
    bundle,
    gallery,
    query_model,
    query_heads,
    source,
    n_queries,
) -> None:
    """Recall@1 of every exported query model through the SDK, beside the core's report.

    \b
    Example:
      python -m benchmarks.accuracy --report runs/demo/report.json --bundle bundle/ \\
          --gallery gallery/ --query-model runs/demo/models/query \\
          --query-heads runs/demo/heads/unified
    """
    out, results_md = resolve_outputs(smoke, out, results_md)
    n_queries = 200 if smoke else n_queries
    machine = machine_info()
    data = load_source(source)
    classes = [data.classes[int(i)] for i in data.labels[:n_queries]]
    rows, searcher = [], None
    for row, opened in open_searchers(bundle, gallery, threads=2):
        if opened is not None:
            searcher = opened
            queries = load_source(source, searcher.spec).images[:n_queries]
            hits = searcher.search_batch(list(queries), k=1)
            row["recall_at_1"] = top1_recall(hits, classes, gallery)
        rows.append(row)
    reference = real_queries(query_model, query_heads, source, n_queries, searcher.bundle.space_id)
    reference_hits = searcher.gallery.search(reference, k=1)
    report = json.loads(report_path.read_text()) if report_path else None
    result = {
        "benchmark": "accuracy",
        "smoke": smoke,
        "bundle": str(bundle),
        "gallery": str(gallery),
        "gallery_items": searcher.gallery.count,
        "query_source": source,
        "queries": len(classes),
        "torch_fp32_recall_at_1": top1_recall(reference_hits, classes, gallery),
        "variants": rows,
        "report": str(report_path) if report_path else None,
        "protocol": report["protocol"] if report else None,
        "report_settings": report["settings"] if report else None,
        "machine": machine,
    }
    table = settings_table(report) if report else None
    paths = write_outputs(
        "accuracy", result, markdown(result, table), out, results_md, plot(result)
    )
    click.echo(json.dumps({k: str(v) for k, v in paths.items()}))


if __name__ == "__main__":
    main()
