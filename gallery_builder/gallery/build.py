"""Gallery commands: ``build``, ``add``, ``remove`` and ``reproject``, each all-or-nothing.

A gallery is made in two phases, both resumable and shared by every command:
:mod:`~gallery_builder.gallery.encode` (images -> the N gallery models -> raw parts, the
expensive part) and :mod:`~gallery_builder.gallery.index` (raw parts -> heads -> hnswlib shards,
``ef_search`` tuned, the manifest written last). ``reproject`` is phase 2 alone with new heads;
``refresh`` re-encodes only the query model's own member (a new query model) before phase 2;
``add`` encodes new parts and indexes them into new shards; ``remove`` marks items deleted
(with heads that average over neighbours both re-index every part: vectors depend on others).

Every command is one :func:`query_sdk.fileio.folder_transaction` on the gallery folder: it takes
the gallery's lock (a second writer is refused at once with a ``BusyError`` naming the holder),
recovers what a killed run left, works in ``.<name>.staging`` and swaps the result in whole, so
the gallery path holds the old gallery or the new one, never a mix and never nothing. Obstacles
(a gallery already there, clashing ids, heads for other models) are checked before any work.
``build`` stages from empty and keeps its staging folder when it fails, for ``--resume``;
``add``/``remove``/``reproject`` stage a copy in which shards and raw parts are hard-linked (their
writers only ever replace them) and the small files are copied. Besides the shards, the
manifest's ``files`` holds the checksums of ``skipped.jsonl``, ``build.json`` and every raw part.
"""

from __future__ import annotations

import json
import time
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from gallery_builder.data.datasets import DataError
from gallery_builder.data.sources import GalleryItem, ItemSource, open_source
from gallery_builder.gallery.encode import Ensemble, decode_items, encode, split_ranges
from gallery_builder.gallery.index import BuildSettings, gallery_manifest, index_parts
from gallery_builder.gallery.raw_store import RAW_DIR, list_parts, part_path, read_part, write_part
from gallery_builder.models.checkpoint import CheckpointError
from gallery_builder.models.saving import Trust, load_model
from gallery_builder.training.fit import embed
from gallery_builder.training.heads import QUERY_MEMBER, check_query_model, load_heads
from query_sdk.fileio import folder_transaction, read_json, write_bytes_atomic, write_json_atomic
from query_sdk.gallery_format import (
    MANIFEST_FILE,
    GalleryError,
    Manifest,
    describe_files,
    load_shard,
    read_manifest,
    update_shard_deletions,
    write_manifest,
)

__all__ = [
    "BuildSettings",
    "Ensemble",
    "Summary",
    "build",
    "add",
    "remove",
    "reproject",
    "refresh",
    "BUILD_FILE",
    "SKIPPED_FILE",
]

BUILD_FILE = "build.json"  # server side: what made the gallery (not downloaded)
SKIPPED_FILE = "skipped.jsonl"
_BUILD_KEYS = ("job", "models", "heads", "settings", "sources", "next_position", "removed")


# ------------------------------------------------------------------------------ the gallery files
def _linked(name: str) -> bool:
    """Files a staged copy shares with the live gallery by hard link: shards and raw parts, which
    every writer replaces (a new inode) and none edits in place."""
    return name.endswith((".hnsw", ".meta.npz")) or (
        name.startswith(f"{RAW_DIR}/") and name.endswith(".npz")
    )


def _change(gallery: Path) -> AbstractContextManager[Path]:
    """The transaction of add/remove/reproject: a staged copy of the gallery, swapped in whole."""
    return folder_transaction(gallery, start="copy", link=_linked)


def _read_build(gallery: Path) -> dict:
    path = Path(gallery) / BUILD_FILE
    if not path.exists():
        raise GalleryError(
            f"{gallery}: no {BUILD_FILE}; not a gallery built here "
            "(add/remove/reproject need the server-side raw store)"
        )
    info = read_json(path, "build record", GalleryError)
    if not isinstance(info, dict) or any(k not in info for k in _BUILD_KEYS):
        raise GalleryError(
            f"{path}: a build record needs keys {list(_BUILD_KEYS)}; rebuild the gallery"
        )
    return info


def _write_skipped(gallery: Path, numbers: list[int]) -> int:
    """Write ``skipped.jsonl`` (as a new file) from the raw parts; returns its line count."""
    lines = [json.dumps(s) for k in numbers for s in read_part(part_path(gallery, k)).skipped]
    write_bytes_atomic(Path(gallery) / SKIPPED_FILE, "".join(f"{x}\n" for x in lines).encode())
    return len(lines)


def _files(stage: Path, numbers: list[int], previous: dict[str, dict]) -> dict[str, dict]:
    """``Manifest.files`` of a staged gallery: the build record and skipped list hashed anew, raw
    parts carried over from ``previous`` when listed there (never rewritten), else hashed."""
    parts = [part_path(stage, k).relative_to(stage).as_posix() for k in numbers]
    kept = {n: previous[n] for n in parts if n in previous}
    todo = [BUILD_FILE, SKIPPED_FILE, *(n for n in parts if n not in kept)]
    return {**kept, **describe_files(stage, todo)}


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


def _summary(manifest: Manifest, seconds: float, processed: int) -> Summary:
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


def _check_new(out: Path) -> None:
    if (out / MANIFEST_FILE).exists():
        raise GalleryError(
            f"{out} already holds a gallery; choose another --out, or use "
            "`add`, `remove` or `reproject` on it"
        )
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise GalleryError(f"{out} exists and is not an empty folder; choose another --out")


def build(
    model_dirs: list[Path],
    heads_dir: Path,
    source: str,
    out: Path,
    s: BuildSettings,
    engine: str = "local",
    resume: bool = False,
    trust: Trust = (),
) -> Summary:
    """Build a gallery from scratch (or finish an interrupted build with ``resume``);
    ``trust`` names the model code that may run (see ``load_model``)."""
    start = time.perf_counter()
    out = Path(out)
    _check_new(out)
    ensemble = Ensemble(model_dirs, heads_dir, trust)
    src = open_source(source)
    job = {
        **ensemble.job_identity(),
        "source": source,
        "items": len(src),
        "shard_size": s.shard_size,
    }
    with folder_transaction(out, start="resume", keep_on_error=True) as stage:
        _check_new(out)  # again, now holding the lock
        if (stage / BUILD_FILE).exists():
            previous = _read_build(stage)
            if not resume:
                raise GalleryError(
                    f"{out}: an interrupted build is in {stage}; pass --resume to finish it, "
                    f"or delete {stage} to start over"
                )
            if previous["job"] != job:
                raise GalleryError(
                    f"{out}: --resume with different models, heads, source or "
                    f"shard size than the interrupted build ({previous['job']})"
                )
        write_json_atomic(
            stage / BUILD_FILE,
            {
                "job": job,
                "models": [str(d) for d in ensemble.model_dirs],
                "heads": str(ensemble.heads_dir),
                "settings": asdict(s),
                "sources": [source],
                "next_position": len(src),
                "removed": [],
                "neighbours": ensemble.heads.neighbours,
            },
        )
        ranges = split_ranges(src.items, s.shard_size, 0)
        encode(engine, ensemble, src, stage, ranges, s.batch_size, resume)
        numbers = [k for k, _ in ranges]
        indexed = index_parts(ensemble.heads, stage, numbers, s, set())
        skipped = _write_skipped(stage, numbers)
        manifest = gallery_manifest(
            stage,
            ensemble.heads,
            ensemble.heads_config,
            s,
            indexed,
            skipped,
            indexed.rejected,
            _files(stage, numbers, {}),
        )
        write_manifest(stage, manifest)
    return _summary(manifest, time.perf_counter() - start, len(src))


def _settings(build_info: dict) -> BuildSettings:
    return BuildSettings(**build_info["settings"])


def reproject(gallery: Path, heads_dir: Path) -> Summary:
    """Rebuild every shard with new gallery heads from the raw store; no gallery model runs."""
    start = time.perf_counter()
    gallery = Path(gallery)
    heads, heads_config = load_heads(heads_dir)
    with _change(gallery) as stage:
        manifest = read_manifest(gallery)
        info = _read_build(gallery)
        _check_gallery_models(manifest, heads_config, heads_dir)
        numbers = list_parts(gallery)
        new = _reindex(stage, manifest, info, heads, heads_config, heads_dir, numbers, info["job"])
    n = sum(len(read_part(part_path(gallery, k))) for k in numbers)
    return _summary(new, time.perf_counter() - start, n)


def refresh(gallery: Path, query_dir: Path, heads_dir: Path, trust: Trust = ()) -> Summary:
    """After a query-model update: re-encode the query model's own member with the new query
    model and rebuild every shard with heads trained for it. Of the ensemble only the (small)
    query model runs, over the gallery's items read again from its recorded sources; the gallery
    models' stored raw embeddings are reused. ``trust`` as for ``load_model``."""
    start = time.perf_counter()
    gallery = Path(gallery)
    heads, heads_config = load_heads(heads_dir)
    if QUERY_MEMBER not in heads.fused:
        raise CheckpointError(
            f"the heads in {heads_dir} fuse no query-model member ({heads.fused}): nothing to "
            "refresh; `reproject` with them instead"
        )
    model, config = load_model(query_dir, trust)
    check_query_model(heads_config, config)
    with _change(gallery) as stage:
        manifest = read_manifest(gallery)
        info = _read_build(gallery)
        _check_gallery_models(manifest, heads_config, heads_dir, but=QUERY_MEMBER)
        numbers = list_parts(gallery)
        lookup = _source_items(info["sources"])
        s = _settings(info)
        parts = {k: read_part(part_path(gallery, k)) for k in numbers}
        total = sum(len(p) for p in parts.values())
        with tqdm(total=total, desc="refresh", unit="img") as bar:
            for k, part in parts.items():
                part.raw[QUERY_MEMBER] = _embed_items(
                    model, config["embedding_dim"], lookup, part.ids, s.batch_size, gallery, bar
                ).astype(np.float16)
                write_part(part_path(stage, k), part)
        # gallery models are named by their folder; the query model is whichever folder is not
        gallery_names = set(info["job"]["models"]) - {QUERY_MEMBER}
        models = [d for d in info["models"] if Path(d).name in gallery_names]
        info = {**info, "models": [*models, str(Path(query_dir).resolve())]}
        job_models = {**info["job"]["models"], QUERY_MEMBER: config["fingerprint"]}
        job = {**info["job"], "models": job_models}
        # the raw parts are rewritten: hashed anew
        manifest.files = {n: f for n, f in manifest.files.items() if not n.startswith(RAW_DIR)}
        new = _reindex(stage, manifest, info, heads, heads_config, heads_dir, numbers, job)
    return _summary(new, time.perf_counter() - start, total)


def _check_gallery_models(
    manifest: Manifest, heads_config: dict, heads_dir: Path, but: str = ""
) -> None:
    """The heads must take the gallery models this gallery was encoded by (all but ``but``)."""
    known = {g["name"]: g["fingerprint"] for g in manifest.gallery_models if g["name"] != but}
    given = {
        g["name"]: g["fingerprint"] for g in heads_config["gallery_models"] if g["name"] != but
    }
    if known != given:
        raise CheckpointError(
            f"the heads in {heads_dir} are for gallery models {given}; "
            f"this gallery was encoded by {known}"
        )


def _reindex(stage, manifest, info, heads, heads_config, heads_dir, numbers, job) -> Manifest:
    """Every shard of the staged gallery rebuilt from its raw parts with ``heads``; the build
    record and manifest rewritten for them (``manifest.files`` are the checksums that carry
    over)."""
    s = _settings(info)
    _unlink_shards(stage, manifest)
    indexed = index_parts(heads, stage, numbers, s, set(info["removed"]))
    write_json_atomic(
        stage / BUILD_FILE,
        {
            **info,
            "heads": str(Path(heads_dir).resolve()),
            "job": {**job, "heads": heads_config["fingerprint"]},
            "neighbours": heads.neighbours,
        },
    )
    new = gallery_manifest(
        stage,
        heads,
        heads_config,
        s,
        indexed,
        manifest.skipped,
        indexed.rejected,
        _files(stage, numbers, manifest.files),
    )
    write_manifest(stage, new)
    return new


def _unlink_shards(stage: Path, manifest: Manifest) -> None:
    for sh in manifest.shards:
        for name in sh.files:
            (stage / name).unlink(missing_ok=True)


def _source_items(sources: list[str]) -> dict[str, tuple[ItemSource, GalleryItem]]:
    """Every item of a gallery's recorded sources by id (a later source's item wins: an id
    removed and added again)."""
    found = {}
    for source in sources:
        src = open_source(source)
        found.update({item.id: (src, item) for item in src.items})
    return found


def _embed_items(model, dim, lookup, ids, batch_size, gallery, bar) -> np.ndarray:
    """The query model's embeddings of the gallery items ``ids``, read from their sources;
    a GalleryError when one is gone or no longer decodes (the gallery is left as it was)."""
    if missing := [i for i in ids if i not in lookup]:
        raise GalleryError(
            f"{len(missing)} items of {gallery} are no longer in its sources, first: "
            f"{missing[:5]}; refresh reads every item again (rebuild the gallery instead)"
        )
    out = []
    for b in range(0, len(ids), batch_size):
        batch = [lookup[i] for i in ids[b : b + batch_size]]
        images = np.zeros((len(batch), *model.input_spec.shape), np.uint8)
        for src in {id(src): src for src, _ in batch}.values():
            rows = [r for r, (s, _) in enumerate(batch) if s is src]
            decoded, reasons = decode_items(src, [batch[r][1] for r in rows], {model.input_spec})
            if bad := [why for why in reasons if why]:
                raise GalleryError(
                    f"{len(bad)} items of {gallery} no longer decode, first: {bad[0]}; "
                    "refresh reads every item again (rebuild the gallery instead)"
                )
            images[rows] = decoded[model.input_spec]
        out.append(embed(model, images).numpy())
        bar.update(len(batch))
    return np.concatenate(out) if out else np.zeros((0, dim), np.float32)


def add(gallery: Path, source: str, engine: str = "local", trust: Trust = ()) -> Summary:
    """Encode and index new images into new shards; existing shards are not touched, unless
    the heads average over neighbours (then every part is re-indexed).
    ``trust`` names the model code that may run (see ``load_model``)."""
    start = time.perf_counter()
    gallery = Path(gallery)
    with _change(gallery) as stage:
        manifest = read_manifest(gallery)
        info = _read_build(gallery)
        ensemble = Ensemble([Path(d) for d in info["models"]], Path(info["heads"]), trust)
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
        ranges = split_ranges(src.items, s.shard_size, (max(numbers) + 1) if numbers else 0)
        encode(engine, ensemble, src, stage, ranges, s.batch_size, False)
        new_numbers = [k for k, _ in ranges]
        threshold = manifest.extra.get("reject_threshold")
        if ensemble.heads.neighbours:  # new items are old items' neighbours: index them all
            _unlink_shards(stage, manifest)
            indexed = index_parts(
                ensemble.heads, stage, numbers + new_numbers, s, set(info["removed"]), threshold
            )
        else:
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
        write_json_atomic(
            stage / BUILD_FILE,
            {
                **info,
                "sources": info["sources"] + [source],
                "next_position": info["next_position"] + len(src),
            },
        )
        new = gallery_manifest(
            stage,
            ensemble.heads,
            ensemble.heads_config,
            s,
            indexed,
            skipped,
            manifest.rejected + indexed.rejected,
            _files(stage, numbers + new_numbers, manifest.files),
        )
        write_manifest(stage, new)
    return _summary(new, time.perf_counter() - start, len(src))


def remove(gallery: Path, ids: list[str]) -> dict:
    """Mark items deleted in their shards (hnswlib ``mark_deleted``); with heads that average
    over neighbours, re-index every part without them instead.

    Returns ``removed`` (how many were live and are now deleted), ``already_removed`` and
    ``not_found`` (the ids given that were deleted before, or are in no shard) and ``items``
    (live items left). DataError when none of the ids is in the gallery.
    """
    gallery = Path(gallery)
    wanted = set(ids)
    with _change(gallery) as stage:
        manifest = read_manifest(gallery)
        info = _read_build(gallery)
        shards, removed, already = [], set(), set()
        for sh in manifest.shards:
            _, meta = load_shard(stage, sh, manifest.dim, 10)
            hit = set()
            for item_id, label, dead in zip(meta.ids, meta.labels, meta.deleted, strict=True):
                if item_id in wanted:
                    (already if dead else removed).add(item_id)
                    if not dead:
                        hit.add(int(label))
            shards.append(update_shard_deletions(stage, sh, hit, manifest.dim) if hit else sh)
        missing = wanted - removed - already
        if missing == wanted:
            raise DataError(f"none of the ids are in {gallery}: {sorted(missing)[:5]}")
        if removed and info.get("neighbours"):  # they were others' neighbours: index anew
            heads, heads_config = load_heads(info["heads"])
            info = {**info, "removed": sorted(set(info["removed"]) | removed)}
            numbers = list_parts(gallery)
            manifest = _reindex(
                stage, manifest, info, heads, heads_config, info["heads"], numbers, info["job"]
            )
        elif removed:
            manifest.shards = shards
            write_json_atomic(
                stage / BUILD_FILE, {**info, "removed": sorted(set(info["removed"]) | removed)}
            )
            manifest.files = _files(stage, list_parts(gallery), manifest.files)
            write_manifest(stage, manifest)
    return {
        "removed": len(removed),
        "already_removed": sorted(already),
        "not_found": sorted(missing),
        "items": manifest.count,
    }
