"""The native SDK (libcmce_query, its C API through ctypes) against the Python SDK, 1 thread.

``python -m benchmarks.native_e2e --bundle B --gallery G6 [--one-index G1] [--smoke]``. The
bundle needs ExecuTorch artifacts (fp32, and int8 for the int8 rows); G6 is the gallery in
several shards, G1 the same items in one index. Figures, all in one run:

- end to end: image file -> hits (``cmce_search_file``: decode, preprocess, the .pte through
  ExecuTorch + XNNPACK, every shard, exact merge, rejection at a quantile) per query, native
  fp32 and int8 beside the Python SDK's ``Searcher.search(path, k, max_uncertainty)`` on the
  same artifact;
- search alone (``cmce_search_vector``) over the shards of G6 vs the one index of G1;
- parity on every query image: native vs Python SDK top-k ids (identical?) and the cosine of
  the two query embeddings (fp32: goal >= 0.9999).

Each native call is timed from Python around one ctypes call with its arguments prepared
beforehand; the ctypes overhead (a call that does nothing: ``cmce_memory_bytes``) is measured
and reported, not subtracted.
"""

from __future__ import annotations

import ctypes
import json
from pathlib import Path

import click
import numpy as np

from gallery_builder.data.datasets import load_source

from ._common import (
    machine_info,
    output_options,
    png_folder,
    pyplot,
    resolve_outputs,
    timed,
    write_outputs,
)

GOAL_E2E_MS = 0.5
GOAL_SHARDS_RATIO = 1.5
GOAL_COSINE = 0.9999


class _OpenOptions(ctypes.Structure):
    _fields_ = [
        ("threads", ctypes.c_int32),
        ("shards", ctypes.POINTER(ctypes.c_int32)),
        ("n_shards", ctypes.c_size_t),
        ("public_key", ctypes.c_char_p),
        ("quantization", ctypes.c_char_p),
        ("space_id", ctypes.c_char_p),
        ("dim", ctypes.c_int32),
    ]


class _Error(ctypes.Structure):
    _fields_ = [("code", ctypes.c_int32), ("message", ctypes.c_char * 1024)]


class _SearchOptions(ctypes.Structure):
    _fields_ = [
        ("k", ctypes.c_uint32),
        ("use_max_uncertainty", ctypes.c_bool),
        ("max_uncertainty", ctypes.c_double),
        ("max_uncertainty_quantile", ctypes.c_char_p),
    ]


class _Hit(ctypes.Structure):
    _fields_ = [
        ("id", ctypes.c_char_p),
        ("score", ctypes.c_float),
        ("uncertainty", ctypes.c_float),
        ("payload_json", ctypes.c_char_p),
        ("class_name", ctypes.c_char_p),
        ("label", ctypes.c_int64),
    ]


class _Info(ctypes.Structure):
    _fields_ = [
        ("dim", ctypes.c_int32),
        ("count", ctypes.c_int64),
        ("shards_loaded", ctypes.c_int32),
        ("shards_total", ctypes.c_int32),
        ("threads", ctypes.c_int32),
        ("memory_bytes", ctypes.c_uint64),
        ("has_model", ctypes.c_bool),
        ("space_id", ctypes.c_char_p),
        ("model_file", ctypes.c_char_p),
        ("quantization", ctypes.c_char_p),
    ]


_P, _S, _N, _I = ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_int
#: the C API functions used here: (argument types, result type)
_SIGNATURES = {
    "cmce_open": ([_S, _S, _P, _P, _P], _I),
    "cmce_close": ([_P], None),
    "cmce_info": ([_P, _P, _P], _I),
    "cmce_memory_bytes": ([_P], ctypes.c_uint64),
    "cmce_embed_file": ([_P, _S, _P, _N, _P], _I),
    "cmce_search_file": ([_P, _S, _P, _P, _N, _P, _P], _I),
    "cmce_search_vector": ([_P, _P, _N, _P, _P, _N, _P, _P], _I),
}


class NativeQuery:
    """One ``cmce_query_t`` handle through ctypes (include/cmce_query.h), for measuring."""

    def __init__(
        self,
        lib: ctypes.CDLL,
        bundle: Path | None,
        gallery: Path,
        quantization: str | None,
        threads: int = 1,
    ):
        self.lib, self.error = lib, _Error()
        quantized = quantization.encode() if quantization else None
        opts = _OpenOptions(threads=threads, quantization=quantized)
        handle = ctypes.c_void_p()
        bundle_arg = str(bundle).encode() if bundle else None
        self._check(
            lib.cmce_open(
                bundle_arg,
                str(gallery).encode(),
                ctypes.byref(opts),
                ctypes.byref(handle),
                ctypes.byref(self.error),
            )
        )
        self.handle = handle
        self.info = _Info()
        self._check(lib.cmce_info(handle, ctypes.byref(self.info), ctypes.byref(self.error)))
        self.dim = self.info.dim
        self.vector = (ctypes.c_float * self.dim)()
        self.n_hits = ctypes.c_size_t()

    def _check(self, status: int) -> None:
        if status:
            raise click.ClickException(
                f"libcmce_query: {self.error.message.decode()} (code {status})"
            )

    def close(self) -> None:
        self.lib.cmce_close(self.handle)

    def options(self, k: int, reject: str | None) -> tuple[_SearchOptions, ctypes.Array]:
        """Search options and a hits buffer of k, made once per measurement."""
        opts = _SearchOptions(k=k, max_uncertainty_quantile=reject.encode() if reject else None)
        return opts, (_Hit * k)()

    def embed_file(self, path: bytes) -> np.ndarray:
        self._check(
            self.lib.cmce_embed_file(
                self.handle, path, self.vector, self.dim, ctypes.byref(self.error)
            )
        )
        return np.ctypeslib.as_array(self.vector).copy()

    def search_file(self, path: bytes, opts: _SearchOptions, hits: ctypes.Array) -> int:
        self._check(
            self.lib.cmce_search_file(
                self.handle,
                path,
                ctypes.byref(opts),
                hits,
                len(hits),
                ctypes.byref(self.n_hits),
                ctypes.byref(self.error),
            )
        )
        return self.n_hits.value

    def search_vector(self, vector: ctypes.Array, opts: _SearchOptions, hits: ctypes.Array) -> int:
        self._check(
            self.lib.cmce_search_vector(
                self.handle,
                vector,
                self.dim,
                ctypes.byref(opts),
                hits,
                len(hits),
                ctypes.byref(self.n_hits),
                ctypes.byref(self.error),
            )
        )
        return self.n_hits.value


def load_library(path: Path | None) -> ctypes.CDLL:
    """libcmce_query.so: ``path``, or the release build of query_sdk.native.build."""
    if path is None:
        from query_sdk.native.build import build_library

        path = build_library("release") / "libcmce_query.so"
    lib = ctypes.CDLL(str(path))
    for name, (argtypes, restype) in _SIGNATURES.items():
        getattr(lib, name).argtypes, getattr(lib, name).restype = argtypes, restype
    return lib


def _hits(hits: ctypes.Array, n: int) -> list[tuple[str, float]]:
    return [(hits[i].id.decode(), hits[i].score) for i in range(n)]


def measure_variant(
    lib, bundle: Path, gallery: Path, quantization: str, paths: list[Path], k: int, reject: str
) -> dict:
    """Native vs Python SDK on one .pte: e2e latency of both, parity of ids and embeddings."""
    from query_sdk import Searcher

    native = NativeQuery(lib, bundle, gallery, quantization)
    python = Searcher.open(
        bundle=bundle, gallery=gallery, backend="executorch", threads=1, quantization=quantization
    )
    names = [str(p).encode() for p in paths]
    opts, hits = native.options(k, reject)
    row = {
        "quantization": quantization,
        "native_e2e": timed(lambda i: native.search_file(names[i], opts, hits), len(paths)),
        "python_e2e": timed(lambda i: python.search(paths[i], k, reject), len(paths)),
        "native_embed": timed(lambda i: native.embed_file(names[i]), len(paths)),
    }
    cosines, same, by_vector, gaps = [], 0, 0, []
    vector_opts, vector_hits = native.options(k, reject)
    for i, path in enumerate(paths):
        a, b = native.embed_file(names[i]), python.embed(path)
        cosines.append(float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b))))
        n = native.search_file(names[i], opts, hits)
        ours, theirs = _hits(hits, n), python.search(path, k, reject)
        if [h[0] for h in ours] == [h.id for h in theirs]:
            same += 1
        else:  # how far apart the scores are where the two lists first differ
            pairs = list(zip(ours, theirs, strict=False))
            r = next((r for r, (o, t) in enumerate(pairs) if o[0] != t.id), None)
            gaps.append(float("inf") if r is None else abs(pairs[r][0][1] - pairs[r][1].score))
        row_b = (ctypes.c_float * len(b))(*b.astype(np.float32))
        n = native.search_vector(row_b, vector_opts, vector_hits)
        by_vector += [h[0] for h in _hits(vector_hits, n)] == [h.id for h in theirs]
    row["parity"] = {
        "queries": len(paths),
        "identical_top_k": same,
        "identical_top_k_same_vector": by_vector,
        "differing_score_gaps": gaps,
        "cosine_min": float(np.min(cosines)),
        "cosine_p01": float(np.percentile(cosines, 1)),
    }
    row["memory_bytes"] = int(native.info.memory_bytes)
    native.close()
    return row


def measure_search(lib, gallery: Path, vectors: np.ndarray, k: int, threads: int = 1) -> dict:
    """cmce_search_vector alone (no rejection) over every query vector, the shards searched on
    ``threads`` threads, and the Python SDK's Gallery.search on the same vectors."""
    from query_sdk.shards import Gallery

    native = NativeQuery(lib, None, gallery, None, threads)
    rows = [(ctypes.c_float * native.dim)(*v) for v in vectors]
    opts, hits = native.options(k, None)
    python = Gallery.open(gallery)
    out = {
        "path": str(gallery),
        "items": int(native.info.count),
        "shards": int(native.info.shards_loaded),
        "threads": threads,
        "native": timed(lambda i: native.search_vector(rows[i], opts, hits), len(rows)),
        "python": timed(lambda i: python.search(vectors[i], k), len(rows)),
        "memory_bytes": int(native.info.memory_bytes),
        "ctypes_call": timed(lambda i: lib.cmce_memory_bytes(native.handle), len(rows)),
    }
    native.close()
    return out


def one_index_copy(gallery: Path, out: Path) -> Path:
    """``out``: the items of ``gallery`` re-indexed into one hnswlib shard (same vectors, ids,
    uncertainties, payloads, classes; same M and efConstruction; ef_search re-tuned to the
    builder's recall target), unless ``out`` holds one already."""
    import shutil
    from dataclasses import replace

    from gallery_builder.gallery.index import BuildSettings, tune_ef_search
    from query_sdk.gallery_format import load_shard, read_manifest, write_manifest, write_shard

    if (out / "manifest.json").is_file():
        return out
    manifest = read_manifest(gallery)
    parts = [load_shard(gallery, sh, manifest.dim, 10) for sh in manifest.shards]
    metas = [meta for _, meta in parts]
    vectors = np.concatenate([np.asarray(i.get_items(m.labels), np.float32) for i, m in parts])
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    classes = None if metas[0].classes is None else sum((m.classes for m in metas), [])
    shard = write_shard(
        staging,
        0,
        vectors,
        np.concatenate([m.labels for m in metas]),
        sum((m.ids for m in metas), []),
        np.concatenate([m.uncertainty for m in metas]),
        sum((m.payload for m in metas), []),
        manifest.hnsw["M"],
        manifest.hnsw["ef_construction"],
        num_threads=2,
        classes=classes,
    )
    ef, _ = tune_ef_search(staging, [shard], manifest.dim, BuildSettings().recall_target)
    hnsw = {**manifest.hnsw, "ef_search": ef}
    write_manifest(staging, replace(manifest, shards=[shard], hnsw=hnsw, files={}))
    staging.rename(out)
    return out


def _ms(s: dict) -> str:
    return f"{s['p50_ms']:.3f} / {s['p90_ms']:.3f}"


def markdown(result: dict) -> str:
    overhead_us = result["search"][0]["ctypes_call"]["p50_ms"] * 1e3
    lines = [
        "## Native SDK (libcmce_query) vs Python SDK, 1 thread",
        "",
        f"{result['queries']} PNG query images of `{result['query_source']}`, k = {result['k']}, "
        f"rejection at `{result['max_uncertainty']}`; bundle `{result['bundle']}` (ExecuTorch "
        "`.pte`, XNNPACK); native calls through the C API (ctypes, arguments prepared "
        f"beforehand; a no-op call costs {overhead_us:.1f} µs, included). p50 / p90 ms.",
        "",
        "### End to end: image file → hits",
        "",
        f"Gallery `{result['gallery']}` ({result['search'][0]['items']:,} items in "
        f"{result['search'][0]['shards']} shards).",
        "",
        "| .pte | native e2e | Python SDK e2e | speed-up | native embed (decode + model) "
        "| identical top-k | embedding cosine min |",
        "|---|---|---|---|---|---|---|",
    ]
    for v in result["variants"]:
        n, p = v["native_e2e"], v["python_e2e"]
        par = v["parity"]
        lines.append(
            f"| {v['quantization']} | {_ms(n)} | {_ms(p)} | {p['p50_ms'] / n['p50_ms']:.1f}× | "
            f"{_ms(v['native_embed'])} | {par['identical_top_k']} / {par['queries']} | "
            f"{par['cosine_min']:.6f} |"
        )
    lines += [
        "",
        "### Search alone (by vector, no rejection)",
        "",
        "| gallery | native threads | native | Python SDK (1 thread) | memory in use |",
        "|---|---|---|---|---|",
    ]
    for s in result["search"]:
        lines.append(
            f"| {s['shards']} shard(s), {s['items']:,} items | {s['threads']} | "
            f"{_ms(s['native'])} | {_ms(s['python'])} | {s['memory_bytes'] / 2**20:.1f} MiB |"
        )
    fp32 = next((v for v in result["variants"] if v["quantization"] == "fp32"), None)
    goals = []
    if fp32:
        p50 = fp32["native_e2e"]["p50_ms"]
        par = fp32["parity"]
        verdict = "met" if p50 < GOAL_E2E_MS else "not met"
        goals.append(f"native e2e p50 < {GOAL_E2E_MS} ms (fp32): {verdict} ({p50:.3f} ms)")
        ok = par["identical_top_k"] == par["queries"] and par["cosine_min"] >= GOAL_COSINE
        gaps = par["differing_score_gaps"]
        goals.append(
            f"parity (identical top-k, cosine ≥ {GOAL_COSINE}, fp32): {'met' if ok else 'not met'} "
            f"({par['identical_top_k']} / {par['queries']}, min {par['cosine_min']:.6f}"
            + (f"; where they differ, the scores differ by at most {max(gaps):.1e}" if gaps else "")
            + f"; searched with the Python SDK's own vector: {par['identical_top_k_same_vector']}"
            f" / {par['queries']})"
        )
    one = next((s for s in result["search"] if s["shards"] == 1), None)
    for s in result["search"]:
        if one is None or s is one:
            continue
        ratio = s["native"]["p50_ms"] / one["native"]["p50_ms"]
        result.setdefault("shards_ratio", {})[s["threads"]] = ratio
        goals.append(
            f"search over {s['shards']} shards on {s['threads']} thread(s) within "
            f"{GOAL_SHARDS_RATIO}× of one index: "
            f"{'met' if ratio <= GOAL_SHARDS_RATIO else 'not met'} ({ratio:.2f}×)"
        )
    lines += ["", "**Goals**: " + "; ".join(goals) + "."]
    return "\n".join(lines)


def plot(result: dict):
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 2.5))
    names, native, python = [], [], []
    for v in result["variants"]:
        names.append(f"e2e {v['quantization']}")
        native.append(v["native_e2e"]["p50_ms"])
        python.append(v["python_e2e"]["p50_ms"])
    for s in result["search"]:
        names.append(f"search {s['shards']} shard(s), {s['threads']} thread(s)")
        native.append(s["native"]["p50_ms"])
        python.append(s["python"]["p50_ms"])
    y = np.arange(len(names))
    ax.barh(y - 0.2, python, height=0.4, label="Python SDK")
    ax.barh(y + 0.2, native, height=0.4, label="native (libcmce_query)")
    ax.set_yticks(y, names, fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("p50 ms per query (log scale)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@output_options
@click.option(
    "--bundle",
    required=True,
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Query bundle with ExecuTorch artifacts (cmce-export output).",
)
@click.option(
    "--gallery",
    required=True,
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Gallery in several shards.",
)
@click.option(
    "--one-index",
    type=click.Path(file_okay=False, path_type=Path),
    help="The same items in one shard, for search alone: shards vs one index (made from "
    "--gallery if missing).",
)
@click.option(
    "--lib",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="libcmce_query.so [default: query_sdk.native.build's release build].",
)
@click.option(
    "--quantization",
    "quantizations",
    multiple=True,
    default=("fp32", "int8"),
    show_default=True,
    help="ExecuTorch artifacts to run (repeatable).",
)
@click.option(
    "--images",
    "source",
    default="fashion-mnist:test",
    show_default=True,
    help="Built-in source of the query images (written as PNG files).",
)
@click.option("--queries", "n_queries", default=1000, show_default=True)
@click.option("--k", default=10, show_default=True)
@click.option(
    "--max-uncertainty",
    "reject",
    default="q0.9",
    show_default=True,
    help="Rejection at a manifest quantile.",
)
@click.option(
    "--threads",
    default=2,
    show_default=True,
    help="Search alone is also measured with the shards searched on this many threads (the "
    "SDK's pool; one index cannot split one query).",
)
@click.option(
    "--work",
    type=click.Path(path_type=Path),
    help="Where the PNG query images go [default: <out>/images].",
)
def main(
    smoke,
    out,
    results_md,
    bundle,
    gallery,
    one_index,
    lib,
    quantizations,
    source,
    n_queries,
    k,
    reject,
    threads,
    work,
) -> None:
    """Native SDK vs Python SDK: end to end, search alone, parity.

    \b
    Example:
      python -m benchmarks.native_e2e --bundle /tmp/fm-bundle --gallery /tmp/fm-gallery \\
          --one-index /tmp/fm-gallery-1shard
    """
    out, results_md = resolve_outputs(smoke, out, results_md)
    n_queries = 30 if smoke else n_queries
    machine = machine_info()
    library = load_library(lib)
    data = load_source(source)
    folder = png_folder(data, n_queries, Path(work or out / "images") / f"{data.name}")
    paths = sorted(folder.glob("*/*.png"))[:n_queries]
    variants = [
        measure_variant(library, bundle, gallery, q, paths, k, reject) for q in quantizations
    ]
    embedder = NativeQuery(library, bundle, gallery, quantizations[0])
    vectors = np.stack([embedder.embed_file(str(p).encode()) for p in paths])
    embedder.close()
    if one_index is not None:
        one_index = one_index_copy(gallery, one_index)
    searches = [measure_search(library, gallery, vectors, k, t) for t in sorted({1, threads})]
    if one_index is not None:
        searches.append(measure_search(library, one_index, vectors, k))
    result = {
        "benchmark": "native_e2e",
        "smoke": smoke,
        "bundle": str(bundle),
        "gallery": str(gallery),
        "variants": variants,
        "search": searches,
        "queries": len(paths),
        "query_source": source,
        "k": k,
        "max_uncertainty": reject,
        "threads": 1,  # end to end; search alone also on --threads
        "machine": machine,
    }
    section = markdown(result)
    paths_out = write_outputs("native_e2e", result, section, out, results_md, plot(result))
    click.echo(json.dumps({key: str(v) for key, v in paths_out.items()}))


if __name__ == "__main__":
    main()
