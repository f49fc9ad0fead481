"""Search scaling: hnswlib vs faiss HNSW vs exact numpy, recall@10 against latency.

``python -m benchmarks.search [--smoke]``. For 10k, 100k and 1M clustered synthetic vectors of
the gallery dim (L2-normalised, inner product) and, with ``--gallery``, a real gallery with
real query vectors, it sweeps ``ef`` and records recall@10 against exact search and the p50 /
p90 latency of one query at a time on one thread (a phone-like setting), for

- hnswlib (the format galleries ship in), and over the gallery's own shards as the SDK merges
  them (``query_sdk.shards.search_shards``);
- faiss ``IndexHNSWFlat`` with the same M, efConstruction and metric;
- exact numpy search (one matrix-vector product + partial sort).

Batches (all queries in one call, 1 thread and all threads) are measured at one ef. Indexes are
built with every thread and cached (with a sha256 checked before loading) in
``~/.cache/cmce/bench``, so a 1M index is built once.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import click
import hnswlib
import numpy as np

from query_sdk.gallery_format import HNSW_SPACE, load_shard, sha256_file, verify_gallery
from query_sdk.shards import search_shards

from ._common import (
    CACHE_DIR,
    blas_threads,
    machine_info,
    output_options,
    pyplot,
    resolve_outputs,
    rss_bytes,
    timed,
    write_outputs,
)

SIZES = (10_000, 100_000, 1_000_000)
EFS = (10, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)
K = 10
M, EF_CONSTRUCTION = 16, 200  # the gallery builder's defaults (BuildSettings)
TARGETS = (0.9, 0.95, 0.99)  # recall@10 levels at which latencies are compared
CLUSTERS, SPREAD = 1000, 0.7  # synthetic data: noise norm relative to the cluster centre


# ----------------------------------------------------------------------------------- data
def clustered_vectors(n: int, dim: int, seed: int) -> np.ndarray:
    """``n`` normalised vectors around ``CLUSTERS`` random centres (float32, deterministic)."""
    centres = np.random.default_rng(12345).standard_normal((CLUSTERS, dim)).astype(np.float32)
    rng = np.random.default_rng(seed)
    out = np.empty((n, dim), np.float32)
    for s in range(0, n, 100_000):
        m = min(100_000, n - s)
        x = centres[rng.integers(0, CLUSTERS, m)]
        x += SPREAD * rng.standard_normal((m, dim), dtype=np.float32)
        out[s : s + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def exact_topk(data: np.ndarray, queries: np.ndarray, k: int, chunk: int = 100_000) -> np.ndarray:
    """Row indices of the k largest inner products per query, best first (chunked over data)."""
    best_i = np.zeros((len(queries), 0), np.int64)
    best_s = np.zeros((len(queries), 0), np.float32)
    for s in range(0, len(data), chunk):
        scores = queries @ data[s : s + chunk].T
        kk = min(k, scores.shape[1])
        top = np.argpartition(-scores, kk - 1, axis=1)[:, :kk]
        best_i = np.concatenate([best_i, top + s], axis=1)
        best_s = np.concatenate([best_s, np.take_along_axis(scores, top, axis=1)], axis=1)
        keep = np.argsort(-best_s, axis=1, kind="stable")[:, :k]
        best_i = np.take_along_axis(best_i, keep, axis=1)
        best_s = np.take_along_axis(best_s, keep, axis=1)
    return best_i


def recall_at_k(found: np.ndarray, exact: np.ndarray) -> float:
    k = exact.shape[1]
    return float(np.mean([len(set(a[:k]) & set(b)) / k for a, b in zip(found, exact, strict=True)]))


# -------------------------------------------------------------------------------- engines
@dataclass
class Engine:
    """One searchable index: ``search(queries, threads) -> row ids (n, K)`` at the set ef."""

    name: str
    set_ef: object
    search: object
    bytes_per_item: float
    resident_bytes_per_item: float
    build_seconds: float | None = None


def _cached(path: Path, build) -> float:
    """Build the index file ``path`` unless a cached one with its recorded sha256 is there
    (checked before any native loader sees it); returns the build seconds."""
    info_path = path.with_suffix(path.suffix + ".json")
    if path.is_file() and info_path.is_file():
        info = json.loads(info_path.read_text())
        if sha256_file(path) == info["sha256"]:
            return info["build_seconds"]
    path.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    build(path)
    seconds = time.perf_counter() - start
    info_path.write_text(
        json.dumps(
            {"sha256": sha256_file(path), "build_seconds": seconds, "threads": os.cpu_count()}
        )
    )
    return seconds


def _resident(load, path: Path) -> tuple[object, int]:
    before = rss_bytes()
    index = load(path)
    return index, rss_bytes() - before


def hnswlib_engine(data: np.ndarray, path: Path) -> Engine:
    n, dim = data.shape

    def build(p: Path) -> None:
        index = hnswlib.Index(space=HNSW_SPACE, dim=dim)
        index.init_index(max_elements=n, M=M, ef_construction=EF_CONSTRUCTION, random_seed=100)
        index.add_items(data, np.arange(n), num_threads=os.cpu_count())
        index.save_index(str(p))

    def load(p: Path):
        index = hnswlib.Index(space=HNSW_SPACE, dim=dim)
        index.load_index(str(p), max_elements=n)
        if index.get_current_count() != n:
            raise RuntimeError(f"{p}: {index.get_current_count()} items, expected {n}")
        return index

    seconds = _cached(path, build)
    index, resident = _resident(load, path)
    return Engine(
        "hnswlib",
        lambda ef: index.set_ef(max(ef, K)),
        lambda q, t: index.knn_query(q, k=K, num_threads=t)[0].astype(np.int64),
        path.stat().st_size / n,
        resident / n,
        seconds,
    )


def faiss_engine(data: np.ndarray, path: Path) -> Engine:
    import faiss

    n, dim = data.shape

    def build(p: Path) -> None:
        index = faiss.IndexHNSWFlat(dim, M, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = EF_CONSTRUCTION
        faiss.omp_set_num_threads(os.cpu_count())
        index.add(data)
        faiss.write_index(index, str(p))

    seconds = _cached(path, build)
    index, resident = _resident(lambda p: faiss.read_index(str(p)), path)
    if index.ntotal != n:
        raise RuntimeError(f"{path}: {index.ntotal} items, expected {n}")

    def set_ef(ef: int) -> None:
        index.hnsw.efSearch = max(ef, K)

    def search(q: np.ndarray, threads: int) -> np.ndarray:
        faiss.omp_set_num_threads(threads)
        return index.search(q, K)[1].astype(np.int64)

    return Engine("faiss", set_ef, search, path.stat().st_size / n, resident / n, seconds)


def shards_engine(gallery: Path) -> tuple[Engine, np.ndarray, np.ndarray]:
    """The gallery's shards as shipped, merged as the SDK does; also (vectors, labels)."""
    manifest = verify_gallery(gallery)
    before = rss_bytes()
    loaded = [
        load_shard(gallery, sh, manifest.dim, ef_search=K, verify=False) for sh in manifest.shards
    ]
    resident = rss_bytes() - before
    pairs = [(index, int((~meta.deleted).sum())) for index, meta in loaded]
    labels = np.concatenate([meta.labels[~meta.deleted] for _, meta in loaded])
    vectors = np.concatenate(
        [
            np.asarray(index.get_items(meta.labels[~meta.deleted]), np.float32)
            for index, meta in loaded
        ]
    )
    row = {int(lab): r for r, lab in enumerate(labels)}
    to_rows = np.vectorize(lambda lab: row.get(int(lab), -1), otypes=[np.int64])

    def set_ef(ef: int) -> None:
        for index, _ in pairs:
            index.set_ef(max(ef, K))

    def search(q: np.ndarray, threads: int) -> np.ndarray:
        return to_rows(search_shards(pairs, q, K, num_threads=threads)[0])

    on_disk = sum(f["bytes"] for sh in manifest.shards for f in sh.files.values())
    name = f"hnswlib, {len(pairs)} shards (SDK merge)"
    return (
        Engine(name, set_ef, search, on_disk / manifest.count, resident / manifest.count),
        vectors,
        labels,
    )


# ------------------------------------------------------------------------------ measuring
def _one_at_a_time(engine: Engine, queries: np.ndarray) -> tuple[np.ndarray, dict]:
    found = np.zeros((len(queries), K), np.int64)

    def one(i: int) -> None:
        found[i] = engine.search(queries[i : i + 1], 1)[0]

    return found, timed(one, len(queries))


def sweep(engine: Engine, queries: np.ndarray, exact: np.ndarray, efs: tuple[int, ...]) -> dict:
    """Recall@10 and single-query latency (1 thread) at each ef."""
    points = []
    for ef in efs:
        engine.set_ef(ef)
        found, stats = _one_at_a_time(engine, queries)
        points.append({"ef": ef, "recall_at_10": recall_at_k(found, exact), **stats})
    return {
        "engine": engine.name,
        "bytes_per_item": engine.bytes_per_item,
        "resident_bytes_per_item": engine.resident_bytes_per_item,
        "build_seconds": engine.build_seconds,
        "curve": points,
    }


def at_recall(curve: list[dict], target: float, key: str = "p50_ms") -> float | None:
    """``key`` (p50 wall or CPU ms) at ``target`` recall, interpolated along the curve; None
    if the curve never reaches it."""
    recalls = np.maximum.accumulate([p["recall_at_10"] for p in curve])
    if recalls[-1] < target:
        return None
    lat = [p[key] for p in curve]
    first = int(np.argmax(recalls >= target))
    if first == 0 or recalls[first] == recalls[first - 1]:
        return float(lat[first])
    return float(np.interp(target, recalls[first - 1 : first + 1], lat[first - 1 : first + 1]))


def exact_latency(data: np.ndarray, queries: np.ndarray) -> dict:
    """Exact search, one query at a time and as one batch, on one BLAS thread."""

    def one(i: int) -> np.ndarray:
        scores = data @ queries[i]
        top = np.argpartition(-scores, K - 1)[:K]
        return top[np.argsort(-scores[top])]

    with blas_threads(1):
        single = timed(one, len(queries), warmup=2)
        start = time.perf_counter()
        exact_topk(data, queries, K)
        batch_1 = (time.perf_counter() - start) / len(queries) * 1e3
    return {
        "single": single,
        "batch_ms_per_query_1_thread": batch_1,
        "bytes_per_item": data.shape[1] * 4,
    }


def batch_latency(engine: Engine, queries: np.ndarray, exact: np.ndarray, ef: int) -> dict:
    """Milliseconds per query when all queries go in one call, on 1 and on all threads."""
    engine.set_ef(ef)
    out = {"ef": ef}
    for threads in sorted({1, os.cpu_count()}):
        start = time.perf_counter()
        found = engine.search(queries, threads)
        out[f"ms_per_query_{threads}_threads"] = (time.perf_counter() - start) / len(queries) * 1e3
        out["recall_at_10"] = recall_at_k(found, exact)
    return out


def run_point(
    name: str,
    data: np.ndarray,
    queries: np.ndarray,
    engines: list[Engine],
    efs: tuple[int, ...],
    exact_queries: int,
) -> dict:
    """Every engine's curve and batch figures, exact search, and the goal ratios."""
    exact = exact_topk(data, queries, K)
    curves = [sweep(e, queries, exact, efs) for e in engines]
    ex = exact_latency(data, queries[:exact_queries])
    first = curves[0]["curve"]
    batch_ef = next((p["ef"] for p in first if p["recall_at_10"] >= 0.95), efs[-1])
    for e, c in zip(engines, curves, strict=True):
        c["batch"] = batch_latency(e, queries, exact, batch_ef)
    summary = {}
    for target in TARGETS:
        row = {}
        for key, suffix in (("p50_ms", ""), ("cpu_p50_ms", "_cpu")):
            lat = {c["engine"]: at_recall(c["curve"], target, key) for c in curves}
            row[key] = lat
            hnsw = lat.get("hnswlib")
            if hnsw:
                row[f"speedup_vs_exact{suffix}"] = ex["single"][key] / hnsw
                if lat.get("faiss"):
                    row[f"hnswlib_over_faiss{suffix}"] = hnsw / lat["faiss"]
        summary[str(target)] = row
    return {
        "name": name,
        "items": len(data),
        "dim": data.shape[1],
        "queries": len(queries),
        "engines": curves,
        "exact": ex,
        "at_recall": summary,
    }


def real_queries(
    query_model: Path, query_heads: Path, images: str, n: int, space_id: str
) -> np.ndarray:
    """Query vectors of ``n`` images through the torch query model and its query head."""
    import torch

    from gallery_builder.data.datasets import load_source
    from gallery_builder.models import load_model
    from gallery_builder.training.fit import embed
    from gallery_builder.training.heads import load_heads

    torch.set_num_threads(os.cpu_count())
    model, _ = load_model(query_model)
    heads, config = load_heads(query_heads)
    if config["space_id"] != space_id:
        raise click.UsageError(
            f"{query_heads} maps into space {config['space_id']}, the gallery is in {space_id}"
        )
    source = load_source(images, model.input_spec)
    return heads.encode_query(embed(model, source.images[:n])).numpy().astype(np.float32)


# ---------------------------------------------------------------------------------- report
def _fmt(x: float | None, spec: str = ".3f") -> str:
    return "—" if x is None else format(x, spec)


def markdown(result: dict) -> str:
    lines = [
        "## Search: hnswlib vs faiss HNSW vs exact numpy",
        "",
        f"Recall@10 against exact search and p50 latency of one query at a time on one "
        f"thread (M={M}, efConstruction={EF_CONSTRUCTION}, inner product on normalised "
        f"vectors). p50 latency in ms at equal recall@10 (interpolated along the ef "
        f"sweep); speed-up = exact numpy p50 / hnswlib p50; ratios in wall time / in CPU "
        f"time per query (the busy machine adds waits to wall times, more to the "
        f"memory-bound exact search).",
        "",
        "| data | items | dim | recall@10 | hnswlib | faiss HNSW | exact numpy | "
        "speed-up vs exact (wall / CPU) | hnswlib / faiss (wall / CPU) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for p in result["points"]:
        for target, row in p["at_recall"].items():
            lat = row["p50_ms"]
            shard_name = next((n for n in lat if n.startswith("hnswlib,")), None)
            hnsw = _fmt(lat.get("hnswlib"))
            if shard_name:
                hnsw += f" ({_fmt(lat[shard_name])} over shards)"
            lines.append(
                f"| {p['name']} | {p['items']:,} | {p['dim']} | {target} | {hnsw} | "
                f"{_fmt(lat.get('faiss'))} | {p['exact']['single']['p50_ms']:.3f} | "
                f"{_fmt(row.get('speedup_vs_exact'), '.0f')}× / "
                f"{_fmt(row.get('speedup_vs_exact_cpu'), '.0f')}× | "
                f"{_fmt(row.get('hnswlib_over_faiss'), '.2f')} / "
                f"{_fmt(row.get('hnswlib_over_faiss_cpu'), '.2f')} |"
            )
    lines += [
        "",
        "Memory and batches (batch = all queries in one call, at the smallest ef "
        "where hnswlib reaches recall@10 0.95; resident = growth of the process's RSS "
        "while the index loads, too low where memory freed by an earlier point is "
        "reused):",
        "",
        "| data | engine | bytes/item on disk | resident bytes/item | build s (all "
        "threads, when first built and cached: the machine's load differed) | batch ef | "
        "ms/query batch, 1 thread | ms/query batch, all threads |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for p in result["points"]:
        for c in p["engines"]:
            b = c["batch"]
            threads = [k for k in b if k.startswith("ms_per_query_")]
            lines.append(
                f"| {p['name']} | {c['engine']} | {c['bytes_per_item']:.0f} | "
                f"{c['resident_bytes_per_item']:.0f} | {_fmt(c['build_seconds'], '.1f')} | "
                f"{b['ef']} | {b[threads[0]]:.4f} | {b[threads[-1]]:.4f} |"
            )
        ex = p["exact"]
        lines.append(
            f"| {p['name']} | exact numpy | {ex['bytes_per_item']} | — | — | — | "
            f"{ex['batch_ms_per_query_1_thread']:.4f} | — |"
        )
    lines += ["", _goals(result)]
    return "\n".join(lines)


def _goals(result: dict) -> str:
    clustered = [p for p in result["points"] if p["name"] == "clustered"]
    big = max(clustered, key=lambda p: p["items"])
    row = big["at_recall"]["0.95"]
    speedup = min(row.get("speedup_vs_exact") or 0, row.get("speedup_vs_exact_cpu") or 0)
    reached = "reaches" if row["p50_ms"].get("hnswlib") is not None else "does not reach"
    text = (
        f"**Goals** (largest synthetic point, {big['items']:,} items): hnswlib {reached} "
        f"recall@10 0.95; there it is at least {speedup:.0f}× faster than exact numpy "
        f"(the lower of wall and CPU time; goal ≥ 100×: "
        f"{'met' if speedup >= 100 else 'not met'})."
    )
    with_faiss = [p for p in clustered if p["at_recall"]["0.95"].get("hnswlib_over_faiss")]
    if not with_faiss:
        return text + " faiss HNSW was not measured."
    near = max(with_faiss, key=lambda p: p["items"])
    r = near["at_recall"]["0.95"]
    ratio = max(r["hnswlib_over_faiss"], r.get("hnswlib_over_faiss_cpu") or 0)
    where = "" if near is big else f" (faiss measured up to {near['items']:,} items)"
    return text + (
        f" At {near['items']:,} items hnswlib takes at most {ratio:.2f}× the "
        f"latency of faiss HNSW at equal recall{where} (goal ≤ 1.2×: "
        f"{'met' if ratio <= 1.2 else 'not met'})."
    )


def plot(result: dict):
    plt = pyplot()
    points = result["points"]
    fig, axes = plt.subplots(1, len(points), figsize=(4.2 * len(points), 3.6), squeeze=False)
    for ax, p in zip(axes[0], points, strict=True):
        for c in p["engines"]:
            ax.plot(
                [q["recall_at_10"] for q in c["curve"]],
                [q["p50_ms"] for q in c["curve"]],
                marker="o",
                ms=3,
                label=c["engine"],
            )
        ax.axhline(p["exact"]["single"]["p50_ms"], color="grey", ls="--", label="exact numpy")
        ax.set_yscale("log")
        ax.set_xlabel("recall@10")
        ax.set_title(f"{p['name']} {p['items']:,} × {p['dim']}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    axes[0][0].set_ylabel("p50 ms / query (1 thread)")
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------------------------- CLI
@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@output_options
@click.option(
    "--sizes",
    default=",".join(str(s) for s in SIZES),
    show_default=True,
    help="Comma-separated synthetic gallery sizes.",
)
@click.option("--dim", default=128, show_default=True, help="Vector dim (the gallery's).")
@click.option(
    "--queries",
    "n_queries",
    default=1000,
    show_default=True,
    help="Queries per point (held out from the indexed vectors).",
)
@click.option(
    "--gallery",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="A built gallery: adds the real point (its shards, its vectors).",
)
@click.option(
    "--query-model",
    type=click.Path(exists=True, path_type=Path),
    help="Query model checkpoint for the real point's query vectors.",
)
@click.option(
    "--query-heads",
    type=click.Path(exists=True, path_type=Path),
    help="The heads folder whose query head maps into the gallery's space.",
)
@click.option(
    "--query-images",
    default="fashion-mnist:test",
    show_default=True,
    help="Images the real queries come from (not in the gallery).",
)
@click.option(
    "--faiss-max-items",
    type=int,
    default=None,
    help="Leave faiss out of points larger than this (its build is the slow part).",
)
@click.option(
    "--cache",
    type=click.Path(path_type=Path),
    default=CACHE_DIR,
    show_default=True,
    help="Where built indexes are kept.",
)
def main(
    smoke,
    out,
    results_md,
    sizes,
    dim,
    n_queries,
    gallery,
    query_model,
    query_heads,
    query_images,
    faiss_max_items,
    cache,
) -> None:
    """Recall–latency curves of hnswlib, faiss HNSW and exact numpy search.

    \b
    Examples:
      python -m benchmarks.search --smoke
      python -m benchmarks.search --gallery /tmp/fm-gallery \\
          --query-model runs/demo/models/query --query-heads runs/demo/heads/unified
    """
    out, results_md = resolve_outputs(smoke, out, results_md)
    size_list = (2_000,) if smoke else tuple(int(s) for s in sizes.split(","))
    n_queries = 50 if smoke else n_queries
    efs = (10, 32, 128) if smoke else EFS
    machine = machine_info()
    points = []
    for n in size_list:
        click.echo(f"clustered {n:,} x {dim}", err=True)
        data = clustered_vectors(n, dim, seed=1)
        queries = clustered_vectors(n_queries, dim, seed=2)
        tag = f"clustered-{n}-{dim}-M{M}-efc{EF_CONSTRUCTION}"
        engines = [hnswlib_engine(data, cache / f"{tag}.hnsw")]
        if faiss_max_items is None or n <= faiss_max_items:
            engines.append(faiss_engine(data, cache / f"{tag}.faiss"))
        points.append(
            run_point(
                "clustered", data, queries, engines, efs, min(n_queries, max(20, 50_000_000 // n))
            )
        )
        del engines, data
    if gallery:
        if not (query_model and query_heads):
            raise click.UsageError("--gallery needs --query-model and --query-heads")
        click.echo(f"gallery {gallery}", err=True)
        shards, data, _ = shards_engine(gallery)
        manifest = verify_gallery(gallery)
        queries = real_queries(query_model, query_heads, query_images, n_queries, manifest.space_id)
        digest = hashlib.sha256(
            "".join(f["sha256"] for sh in manifest.shards for f in sh.files.values()).encode()
        ).hexdigest()
        tag = f"gallery-{digest[:16]}-M{M}-efc{EF_CONSTRUCTION}"
        engines = [
            hnswlib_engine(data, cache / f"{tag}.hnsw"),
            faiss_engine(data, cache / f"{tag}.faiss"),
            shards,
        ]
        point = run_point(gallery.name, data, queries, engines, efs, n_queries)
        point["queries_from"] = f"{query_images} through {query_model} + {query_heads}"
        points.append(point)
    result = {
        "benchmark": "search",
        "smoke": smoke,
        "k": K,
        "M": M,
        "ef_construction": EF_CONSTRUCTION,
        "points": points,
        "machine": machine,
    }
    paths = write_outputs("search", result, markdown(result), out, results_md, plot(result))
    click.echo(json.dumps({k: str(v) for k, v in paths.items()}))


if __name__ == "__main__":
    main()
