"""Phase 2 of a gallery build: raw parts -> heads -> hnswlib shards, ``ef_search`` tuned
against exact search, and the manifest that describes them.

The heads turn raw parts into gallery vectors + uncertainties, the most uncertain items are
optionally rejected, each part becomes one hnswlib shard (M, efConstruction as in Malkov &
Yashunin), and ``ef_search`` is the smallest candidate reaching the recall target.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib.metadata import version
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from gallery_builder.gallery.encode import fuse_parts
from gallery_builder.gallery.raw_store import part_path, read_part
from gallery_builder.training.heads import HeadSet
from query_sdk.gallery_format import METRIC, Manifest, ShardFiles, load_shard, write_shard
from query_sdk.shards import search_shards

log = logging.getLogger(__name__)

__all__ = ["BuildSettings", "Indexed", "index_parts", "tune_ef_search", "gallery_manifest"]

EF_CANDIDATES = (10, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024)
QUANTILES = (0.5, 0.75, 0.9, 0.95, 0.99)


@dataclass
class BuildSettings:
    """Shard and HNSW parameters (M, efConstruction as in Malkov & Yashunin) and rejection."""

    shard_size: int = 10000
    M: int = 16
    ef_construction: int = 200
    batch_size: int = 256
    reject_quantile: float = 0.0  # leave out this fraction of most uncertain items
    recall_target: float = 0.99  # ef_search is the smallest reaching this recall@10
    seed: int = 100

    def __post_init__(self) -> None:
        if self.shard_size < 1 or self.M < 2 or self.ef_construction < 1 or self.batch_size < 1:
            raise ValueError("shard size, M, ef-construction and batch size must be positive")
        if not 0.0 <= self.reject_quantile < 1.0:
            raise ValueError(f"reject quantile must be in [0, 1), got {self.reject_quantile}")


@dataclass
class Indexed:
    """Shards written by :func:`index_parts`, with what the manifest needs to know of them."""

    shards: list[ShardFiles]
    rejected: list[dict]
    threshold: float | None
    uncertainties: np.ndarray


def index_parts(
    heads: HeadSet,
    gallery: Path,
    numbers: list[int],
    s: BuildSettings,
    removed: set[str],
    threshold: float | None = None,
) -> Indexed:
    """Phase 2: parts -> shards (one per part). ``threshold=None`` derives it from
    ``s.reject_quantile`` over these parts; items listed in ``removed`` are left out (and, with
    heads that average over neighbours, are nobody's neighbour).

    Each shard's graph is built on one thread (so it is reproducible); shards are built side
    by side, one per core (hnswlib releases the GIL while it inserts)."""
    parts = {k: read_part(part_path(gallery, k)) for k in numbers}
    live = {k: np.array([i not in removed for i in p.ids], bool) for k, p in parts.items()}
    fused = {
        k: (parts[k], vectors, unc, live[k])
        for k, (vectors, unc) in fuse_parts(heads, parts, live).items()
    }
    all_unc = (
        np.concatenate([u[live] for _, _, u, live in fused.values()]) if fused else np.zeros(0)
    )
    if threshold is None and s.reject_quantile > 0 and len(all_unc):
        threshold = float(np.quantile(all_unc, 1.0 - s.reject_quantile))
    jobs, rejected = [], []
    for k, (part, vectors, unc, live) in fused.items():
        keep = live & (unc <= threshold if threshold is not None else True)
        rejected += [
            {"id": part.ids[i], "uncertainty": float(unc[i])} for i in np.flatnonzero(live & ~keep)
        ]
        if keep.any():
            rows = np.flatnonzero(keep)
            jobs.append(
                (
                    k,
                    vectors[keep],
                    part.positions[keep],
                    [part.ids[i] for i in rows],
                    unc[keep],
                    [part.payload[i] for i in rows],
                    [part.classes[i] for i in rows] if part.classes else None,
                )
            )

    def write(job: tuple) -> ShardFiles:
        *args, classes = job
        return write_shard(
            gallery,
            *args,
            M=s.M,
            ef_construction=s.ef_construction,
            seed=s.seed,
            num_threads=1,
            classes=classes,
        )

    with ThreadPoolExecutor(max_workers=max(1, min(len(jobs), os.cpu_count() or 1))) as pool:
        shards = list(tqdm(pool.map(write, jobs), total=len(jobs), desc="index", unit="shard"))
    return Indexed(shards, rejected, threshold, all_unc)


def tune_ef_search(
    gallery: Path,
    shards: list[ShardFiles],
    dim: int,
    target: float,
    sample: int = 1000,
    k: int = 10,
    seed: int = 0,
) -> tuple[int, float]:
    """Smallest ef from EF_CANDIDATES whose merged recall@k vs exact search reaches ``target``.

    Queries are gallery vectors with noise added (cosine about 0.9 to their source), so they
    have real neighbourhoods without being exact copies.
    """
    loaded = [load_shard(gallery, sh, dim, ef_search=k) for sh in shards]
    labels, vectors = [], []
    for index, meta in loaded:
        live = meta.labels[~meta.deleted]
        labels.append(live)
        vectors.append(np.asarray(index.get_items(live), np.float32))
    labels, vectors = np.concatenate(labels), np.concatenate(vectors)
    rng = np.random.default_rng(seed)
    pick = rng.choice(len(vectors), size=min(sample, len(vectors)), replace=False)
    noise = rng.standard_normal((len(pick), dim)).astype(np.float32)
    queries = vectors[pick] + 0.5 * noise / np.sqrt(dim)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    kk = min(k, len(vectors))
    exact = labels[np.argpartition(-(queries @ vectors.T), kk - 1, axis=1)[:, :kk]]
    pairs = [(index, int((~meta.deleted).sum())) for index, meta in loaded]
    recall = 0.0
    for ef in EF_CANDIDATES:
        for index, _ in pairs:
            index.set_ef(max(ef, kk))
        found, _ = search_shards(pairs, queries, kk)
        recall = float(
            np.mean([len(set(a) & set(b)) / kk for a, b in zip(found, exact, strict=True)])
        )
        if recall >= target:
            return ef, recall
    log.warning("recall@%d %.4f < %.2f even at ef=%d", k, recall, target, EF_CANDIDATES[-1])
    return EF_CANDIDATES[-1], recall


# ------------------------------------------------------------------------------------ manifest
def gallery_manifest(
    gallery: Path,
    heads: HeadSet,
    heads_config: dict,
    s: BuildSettings,
    indexed: Indexed,
    skipped: int,
    rejected: list[dict],
    files: dict[str, dict],
) -> Manifest:
    """The manifest of freshly indexed shards (``ef_search`` tuned here); ``files`` are the
    checksums of the gallery's other files (``Manifest.files``)."""
    ef, recall = tune_ef_search(gallery, indexed.shards, heads.dim, s.recall_target)
    unc = indexed.uncertainties
    return Manifest(
        space_id=heads_config["space_id"],
        dim=heads.dim,
        metric=METRIC,
        hnsw={"M": s.M, "ef_construction": s.ef_construction, "ef_search": ef},
        gallery_models=heads_config["gallery_models"],
        heads={"mode": heads.mode, "fingerprint": heads_config["fingerprint"]},
        uncertainty_quantiles={
            str(q): float(np.quantile(unc, q)) if len(unc) else 0.0 for q in QUANTILES
        },
        shards=indexed.shards,
        rejected=rejected,
        skipped=skipped,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        tool_version=version("cmce"),
        extra={
            "recall_at_10": recall,
            "reject_quantile": s.reject_quantile,
            "reject_threshold": indexed.threshold,
        },
        files=files,
    )
