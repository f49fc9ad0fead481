"""Gallery building: encode images with the ensemble, write verifiable hnswlib shards.

Two phases, both resumable and both shared by every command:
1. *encode* (the expensive part): each input range of ``shard_size`` items goes through the N
   gallery models; the raw embeddings are kept as a part of the raw store (``raw_store``).
2. *index*: the heads turn raw parts into gallery vectors + uncertainties, the most uncertain
   items are optionally rejected, each part becomes one hnswlib shard, ``ef_search`` is tuned
   against exact search, and the manifest is written last.

``reproject`` is phase 2 alone with new heads; ``add`` encodes new parts and indexes them into
new shards; ``remove`` marks items deleted. Those three work on a staged copy (hard links) of
the gallery and swap it into place at the end, so an error leaves the previous gallery intact.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from gallery_builder.data.datasets import DataError
from gallery_builder.data.sources import GalleryItem, ItemSource, open_source
from gallery_builder.gallery.raw_store import Part, list_parts, part_path, read_part, write_part
from gallery_builder.models import load_model
from gallery_builder.models.checkpoint import CheckpointError, write_json
from gallery_builder.training.fit import embed
from gallery_builder.training.heads import HeadSet, check_gallery_models, load_heads
from query_sdk.gallery_format import (
    MANIFEST_FILE,
    METRIC,
    GalleryError,
    Manifest,
    ShardFiles,
    load_shard,
    read_manifest,
    update_shard_deletions,
    write_manifest,
    write_shard,
)
from query_sdk.shards import search_shards
from query_sdk.spec import InputSpec

log = logging.getLogger(__name__)

__all__ = [
    "BuildSettings",
    "Ensemble",
    "build",
    "add",
    "remove",
    "reproject",
    "BUILD_FILE",
    "SKIPPED_FILE",
]

BUILD_FILE = "build.json"  # server side: what made the gallery (not downloaded)
SKIPPED_FILE = "skipped.jsonl"
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


class Ensemble:
    """The gallery models and their heads: images -> raw embeddings -> vectors + uncertainty."""

    def __init__(self, model_dirs: list[Path], heads_dir: Path) -> None:
        self.model_dirs = [Path(d).resolve() for d in model_dirs]
        self.heads_dir = Path(heads_dir).resolve()
        self.models = {d.name: load_model(d) for d in self.model_dirs}
        self.heads, self.heads_config = load_heads(self.heads_dir)
        missing = set(self.heads.names) - set(self.models)
        if missing:
            raise CheckpointError(
                f"the heads in {heads_dir} need gallery models {sorted(self.heads.names)}; "
                f"missing {sorted(missing)} (models are named by their folder)"
            )
        check_gallery_models(self.heads_config, {n: c for n, (_, c) in self.models.items()})

    @property
    def names(self) -> list[str]:
        return self.heads.names

    @property
    def specs(self) -> dict[str, InputSpec]:
        return {n: self.models[n][0].input_spec for n in self.names}

    def encode_raw(self, source: ItemSource, items: list[GalleryItem]) -> Part:
        """Run every gallery model on ``items``; unusable items come back as skipped."""
        images, reasons = decode_items(source, items, set(self.specs.values()))
        raw = {n: embed(self.models[n][0], images[spec]).numpy() for n, spec in self.specs.items()}
        return assemble_part(items, raw, reasons)

    def job_identity(self) -> dict:
        return {
            "models": {n: c["fingerprint"] for n, (_, c) in self.models.items()},
            "heads": self.heads_config["fingerprint"],
        }


def decode_items(
    source: ItemSource, items: list[GalleryItem], specs: set[InputSpec]
) -> tuple[dict[InputSpec, np.ndarray], list[str]]:
    """Decode ``items`` for every input spec, aligned with ``items``.

    An item that fails for any spec gets a reason (and zero pixels everywhere); "" means ok.
    """
    reasons = [""] * len(items)
    row = {item.position: r for r, item in enumerate(items)}
    out = {}
    for spec in specs:
        images, bad = source.decode(items, spec)
        for item, reason in bad:
            reasons[row[item.position]] = reasons[row[item.position]] or reason
        bad_rows = {row[item.position] for item, _ in bad}
        full = np.zeros((len(items), *spec.shape), np.uint8)
        full[[r for r in range(len(items)) if r not in bad_rows]] = images
        out[spec] = full
    return out, reasons


def assemble_part(items: list[GalleryItem], raw: dict[str, np.ndarray], reasons: list[str]) -> Part:
    """Keep the items that decoded and whose embeddings are finite in every model."""
    reasons = list(reasons)
    for name, values in raw.items():
        for r in np.flatnonzero(~np.isfinite(values).all(axis=1)):
            reasons[r] = reasons[r] or f"non-finite embedding from gallery model {name}"
    keep = np.array([not r for r in reasons], bool)
    kept = [i for i, ok in zip(items, keep, strict=True) if ok]
    return Part(
        positions=np.array([i.position for i in kept], np.int64),
        ids=[i.id for i in kept],
        payload=[i.payload for i in kept],
        raw={n: np.asarray(v)[keep].astype(np.float16) for n, v in raw.items()},
        skipped=[
            {"position": i.position, "id": i.id, "reason": r}
            for i, r in zip(items, reasons, strict=True)
            if r
        ],
    )


def fuse_part(heads: HeadSet, part: Part) -> tuple[np.ndarray, np.ndarray]:
    """Gallery vectors (float32, normalised) and uncertainties of a raw part."""
    if len(part) == 0:
        return np.zeros((0, heads.dim), np.float32), np.zeros(0, np.float32)
    raw = {n: torch.from_numpy(part.raw[n].astype(np.float32)) for n in heads.names}
    vectors, uncertainty = heads.encode_gallery(raw)
    return vectors.numpy().astype(np.float32), uncertainty.numpy().astype(np.float32)


# ----------------------------------------------------------------------------- phase 1: encode
def _ranges(items: list[GalleryItem], size: int, first: int) -> list[tuple[int, list]]:
    return [(first + k, items[s : s + size]) for k, s in enumerate(range(0, len(items), size))]


def encode_parts(
    ensemble: Ensemble,
    source: ItemSource,
    gallery: Path,
    ranges: list[tuple[int, list[GalleryItem]]],
    batch_size: int,
    resume: bool,
) -> None:
    """Phase 1 on this machine: one raw part per range (finished parts are kept on resume)."""
    todo = [(k, items) for k, items in ranges if not (resume and part_path(gallery, k).is_file())]
    if len(todo) < len(ranges):
        log.info("resuming: %d of %d parts already encoded", len(ranges) - len(todo), len(ranges))
    with tqdm(total=sum(len(items) for _, items in todo), desc="encode", unit="img") as bar:
        for k, items in todo:
            parts = []
            for s in range(0, len(items), batch_size):
                parts.append(ensemble.encode_raw(source, items[s : s + batch_size]))
                bar.update(len(items[s : s + batch_size]))
            write_part(part_path(gallery, k), _concat(parts, ensemble.names))


def _concat(parts: list[Part], names: list[str]) -> Part:
    return Part(
        positions=np.concatenate([p.positions for p in parts]),
        ids=[i for p in parts for i in p.ids],
        payload=[x for p in parts for x in p.payload],
        raw={n: np.concatenate([p.raw[n] for p in parts]) for n in names},
        skipped=[s for p in parts for s in p.skipped],
    )


# ------------------------------------------------------------------------------ phase 2: index
@dataclass
class _Indexed:
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
) -> _Indexed:
    """Phase 2: parts -> shards (one per part). ``threshold=None`` derives it from
    ``s.reject_quantile`` over these parts; items listed in ``removed`` are left out.

    Each shard's graph is built on one thread (so it is reproducible); shards are built side
    by side, one per core (hnswlib releases the GIL while it inserts)."""
    fused = {}
    for k in numbers:
        part = read_part(part_path(gallery, k))
        vectors, unc = fuse_part(heads, part)
        live = np.array([i not in removed for i in part.ids], bool)
        fused[k] = (part, vectors, unc, live)
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
                )
            )

    def write(job: tuple) -> ShardFiles:
        return write_shard(
            gallery, *job, M=s.M, ef_construction=s.ef_construction, seed=s.seed, num_threads=1
        )

    with ThreadPoolExecutor(max_workers=max(1, min(len(jobs), os.cpu_count() or 1))) as pool:
        shards = list(tqdm(pool.map(write, jobs), total=len(jobs), desc="index", unit="shard"))
    return _Indexed(shards, rejected, threshold, all_unc)


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
def _manifest(
    gallery: Path,
    heads: HeadSet,
    heads_config: dict,
    s: BuildSettings,
    indexed: _Indexed,
    skipped: int,
    rejected: list[dict],
) -> Manifest:
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
    )


def _read_build(gallery: Path) -> dict:
    try:
        return json.loads((Path(gallery) / BUILD_FILE).read_text())
    except FileNotFoundError:
        raise GalleryError(
            f"{gallery}: no {BUILD_FILE}; not a gallery built here "
            "(add/remove/reproject need the server-side raw store)"
        ) from None


def _write_skipped(gallery: Path, numbers: list[int]) -> int:
    lines = [json.dumps(s) for k in numbers for s in read_part(part_path(gallery, k)).skipped]
    (Path(gallery) / SKIPPED_FILE).write_text("".join(line + "\n" for line in lines))
    return len(lines)


# ---------------------------------------------------------------------------------- commands
@dataclass
class Summary:
    items: int
    skipped: int
    rejected: int
    shards: int
    bytes_per_item: float
    images_per_second: float
    seconds: float
    ef_search: int
    recall_at_10: float

    def to_dict(self) -> dict:
        return asdict(self)


def _summary(gallery: Path, manifest: Manifest, seconds: float, processed: int) -> Summary:
    total = sum(f["bytes"] for sh in manifest.shards for f in sh.files.values())
    return Summary(
        manifest.count,
        manifest.skipped,
        len(manifest.rejected),
        len(manifest.shards),
        total / max(manifest.count, 1),
        processed / max(seconds, 1e-9),
        seconds,
        manifest.hnsw["ef_search"],
        manifest.extra["recall_at_10"],
    )


def build(
    model_dirs: list[Path],
    heads_dir: Path,
    source: str,
    out: Path,
    s: BuildSettings,
    engine: str = "local",
    resume: bool = False,
) -> Summary:
    """Build a gallery from scratch (or finish an interrupted build with ``resume``)."""
    start = time.perf_counter()
    out = Path(out)
    if (out / MANIFEST_FILE).exists():
        raise GalleryError(
            f"{out} already holds a gallery; choose another --out, or use "
            "`add`, `remove` or `reproject` on it"
        )
    ensemble = Ensemble(model_dirs, heads_dir)
    src = open_source(source)
    job = {
        **ensemble.job_identity(),
        "source": source,
        "items": len(src),
        "shard_size": s.shard_size,
    }
    out.mkdir(parents=True, exist_ok=True)
    if (out / BUILD_FILE).exists():
        previous = _read_build(out)
        if not resume:
            raise GalleryError(
                f"{out} holds an unfinished build; pass --resume to finish it "
                "or choose another --out"
            )
        if previous["job"] != job:
            raise GalleryError(
                f"{out}: --resume with different models, heads, source or "
                f"shard size than the interrupted build ({previous['job']})"
            )
    write_json(
        out / BUILD_FILE,
        {
            "job": job,
            "models": [str(d) for d in ensemble.model_dirs],
            "heads": str(ensemble.heads_dir),
            "settings": asdict(s),
            "sources": [source],
            "next_position": len(src),
            "removed": [],
        },
    )
    ranges = _ranges(src.items, s.shard_size, 0)
    _encode(engine, ensemble, src, out, ranges, s, resume)
    numbers = [k for k, _ in ranges]
    indexed = index_parts(ensemble.heads, out, numbers, s, set())
    skipped = _write_skipped(out, numbers)
    manifest = _manifest(
        out, ensemble.heads, ensemble.heads_config, s, indexed, skipped, indexed.rejected
    )
    write_manifest(out, manifest)
    return _summary(out, manifest, time.perf_counter() - start, len(src))


def _encode(engine, ensemble, src, gallery, ranges, s, resume) -> None:
    if engine == "local":
        encode_parts(ensemble, src, gallery, ranges, s.batch_size, resume)
    elif engine == "ray":
        from gallery_builder.gallery.ray_engine import encode_parts_ray

        encode_parts_ray(ensemble, src, gallery, ranges, s.batch_size, resume)
    else:
        raise ValueError(f"engine must be 'local' or 'ray', got {engine!r}")


@contextmanager
def staged(gallery: Path) -> Iterator[Path]:
    """A hard-linked copy of the gallery to change; swapped in on success, dropped on error.

    Files are replaced (never edited in place) by every writer, so the original stays intact.
    """
    gallery = Path(gallery)
    stage = gallery.with_name(f".{gallery.name}.staging")
    old = gallery.with_name(f".{gallery.name}.old")
    shutil.rmtree(stage, ignore_errors=True)
    shutil.copytree(gallery, stage, copy_function=os.link)
    try:
        yield stage
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    os.replace(gallery, old)
    os.replace(stage, gallery)
    shutil.rmtree(old, ignore_errors=True)


def _settings(build_info: dict) -> BuildSettings:
    return BuildSettings(**build_info["settings"])


def reproject(gallery: Path, heads_dir: Path) -> Summary:
    """Rebuild every shard with new gallery heads from the raw store; no gallery model runs."""
    start = time.perf_counter()
    gallery = Path(gallery)
    manifest = read_manifest(gallery)
    info = _read_build(gallery)
    heads, heads_config = load_heads(heads_dir)
    known = {g["name"]: g["fingerprint"] for g in manifest.gallery_models}
    given = {g["name"]: g["fingerprint"] for g in heads_config["gallery_models"]}
    if known != given:
        raise CheckpointError(
            f"the heads in {heads_dir} are for gallery models {given}; "
            f"this gallery was encoded by {known}"
        )
    s = _settings(info)
    numbers = list_parts(gallery)
    with staged(gallery) as stage:
        for sh in manifest.shards:
            for name in sh.files:
                (stage / name).unlink(missing_ok=True)
        indexed = index_parts(heads, stage, numbers, s, set(info["removed"]))
        new = _manifest(stage, heads, heads_config, s, indexed, manifest.skipped, indexed.rejected)
        write_json(
            stage / BUILD_FILE,
            {
                **info,
                "heads": str(Path(heads_dir).resolve()),
                "job": {**info["job"], "heads": heads_config["fingerprint"]},
            },
        )
        write_manifest(stage, new)
    n = sum(len(read_part(part_path(gallery, k))) for k in numbers)
    return _summary(gallery, new, time.perf_counter() - start, n)


def add(gallery: Path, source: str, engine: str = "local") -> Summary:
    """Encode and index new images into new shards; existing shards are not touched."""
    start = time.perf_counter()
    gallery = Path(gallery)
    manifest = read_manifest(gallery)
    info = _read_build(gallery)
    ensemble = Ensemble([Path(d) for d in info["models"]], Path(info["heads"]))
    if ensemble.heads_config["space_id"] != manifest.space_id:
        raise GalleryError(
            f"{info['heads']} maps into space {ensemble.heads_config['space_id']}"
            f", the gallery is in {manifest.space_id}"
        )
    src = open_source(source, start=info["next_position"])
    numbers = list_parts(gallery)
    existing = {i for k in numbers for i in read_part(part_path(gallery, k)).ids}
    clash = [i.id for i in src.items if i.id in existing and i.id not in info["removed"]]
    if clash:
        raise DataError(f"{len(clash)} ids are already in {gallery}, first: {clash[:5]}")
    s = _settings(info)
    with staged(gallery) as stage:
        ranges = _ranges(src.items, s.shard_size, (max(numbers) + 1) if numbers else 0)
        _encode(engine, ensemble, src, stage, ranges, s, False)
        new_numbers = [k for k, _ in ranges]
        threshold = manifest.extra.get("reject_threshold")
        indexed = index_parts(
            ensemble.heads,
            stage,
            new_numbers,
            s,
            set(info["removed"]),
            threshold=threshold if threshold is not None else float("inf"),
        )
        all_unc = np.concatenate(
            [indexed.uncertainties]
            + [load_shard(stage, sh, manifest.dim, 10)[1].uncertainty for sh in manifest.shards]
        )
        indexed.shards = manifest.shards + indexed.shards
        indexed.uncertainties = all_unc
        indexed.threshold = threshold
        skipped = _write_skipped(stage, numbers + new_numbers)
        new = _manifest(
            stage,
            ensemble.heads,
            ensemble.heads_config,
            s,
            indexed,
            skipped,
            manifest.rejected + indexed.rejected,
        )
        write_json(
            stage / BUILD_FILE,
            {
                **info,
                "sources": info["sources"] + [source],
                "next_position": info["next_position"] + len(src),
            },
        )
        write_manifest(stage, new)
    return _summary(gallery, new, time.perf_counter() - start, len(src))


def remove(gallery: Path, ids: list[str]) -> dict:
    """Mark items deleted in their shards (hnswlib ``mark_deleted``); returns counts."""
    gallery = Path(gallery)
    manifest = read_manifest(gallery)
    info = _read_build(gallery)
    wanted = set(ids)
    with staged(gallery) as stage:
        shards, found = [], set()
        for sh in manifest.shards:
            _, meta = load_shard(stage, sh, manifest.dim, 10)
            hit = {
                int(lab)
                for i, lab, d in zip(meta.ids, meta.labels, meta.deleted, strict=True)
                if i in wanted and not d
            }
            found |= {i for i in meta.ids if i in wanted}
            shards.append(update_shard_deletions(stage, sh, hit, manifest.dim) if hit else sh)
        missing = wanted - found
        if missing and len(missing) == len(wanted):
            raise DataError(f"none of the ids are in {gallery}: {sorted(missing)[:5]}")
        manifest.shards = shards
        write_json(stage / BUILD_FILE, {**info, "removed": sorted(set(info["removed"]) | found)})
        write_manifest(stage, manifest)
    return {"removed": len(found), "not_found": sorted(missing), "items": manifest.count}
