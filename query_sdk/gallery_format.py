"""The on-disk gallery format: the single definition, for the builder (writes) and the SDK (reads).

A gallery is a folder::

    manifest.json            written last (temp file + os.replace); describes everything below
    shard-00000.hnsw         stock hnswlib 0.8 index (space "ip", float32, little-endian)
    shard-00000.meta.npz     sidecar: arrays ids (U), labels (int64), uncertainty (float32),
                             payload (U, one JSON object per item, "" for none), deleted (bool)
    shard-00001.hnsw ...
    raw/, skipped.jsonl      server-side only, not described here

Vectors are L2-normalised, so the hnswlib inner-product space gives cosine similarity
(``score = 1 - hnswlib distance``). hnswlib labels are int64, unique across the whole gallery;
``ids`` are the user's string ids. Deleted items stay in the index, flagged with hnswlib's
``mark_deleted`` and in the sidecar's ``deleted`` array.

``manifest.json`` (sorted keys, indent 2) holds ``format_version``, ``space_id``, ``dim``,
``metric`` ("cosine"), ``hnsw`` {M, ef_construction, ef_search}, ``gallery_models``
[{name, fingerprint, head_fingerprint}], ``heads`` (free-form), ``uncertainty_quantiles``
{"0.5": ..}, ``shards`` [{index_file, meta_file, count, deleted, files {name: {bytes, sha256}}}],
``rejected`` [{id, uncertainty}], ``skipped``, ``created`` (ISO 8601 UTC), ``tool_version``
and ``extra`` (free-form). Unknown keys are refused: additions go into ``extra`` or bump
``FORMAT_VERSION``.

Nothing is ever unpickled. Before an index file is handed to hnswlib (whose loader trusts the
file), its size and sha256 are checked against the manifest and its header and link structure
are parsed here and checked against the manifest (count, dim, M) and the sidecar (labels,
deleted flags).

hnswlib 0.8 ``saveIndex`` layout (native endianness; little-endian on every supported host)::

    offsetLevel0 u64 | max_elements u64 | cur_element_count u64 | size_data_per_element u64 |
    label_offset u64 | offsetData u64 | maxlevel i32 | enterpoint_node u32 | maxM u64 |
    maxM0 u64 | M u64 | mult f64 | ef_construction u64                        (96 bytes)
    level 0: cur_element_count x size_data_per_element bytes, each
        [count u16, flags u8 (bit 0 = deleted), pad u8, maxM0 x u32 neighbours]
        [dim x f32 vector] [label u64]
    then per element: linkListSize u32 + linkListSize bytes (levels x (4 + maxM x 4))

This module imports only the standard library, numpy and hnswlib (never torch).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any

import hnswlib
import numpy as np

from .errors import FormatError
from .fileio import atomic_path, atomic_write, parse_json, write_json_atomic

__all__ = [
    "FORMAT_VERSION",
    "MANIFEST_FILE",
    "METRIC",
    "HNSW_SPACE",
    "GalleryError",
    "ShardFiles",
    "ShardMeta",
    "Manifest",
    "IndexHeader",
    "write_shard",
    "update_shard_deletions",
    "sha256_file",
    "safe_join",
    "write_manifest",
    "write_json_atomic",
    "read_manifest",
    "read_manifest_bytes",
    "parse_manifest",
    "verify_gallery",
    "load_shard",
    "read_meta",
    "read_index_header",
    "shard_file_names",
    "utc_now_iso",
]

FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
METRIC = "cosine"
HNSW_SPACE = "ip"

NORM_TOLERANCE = 1e-3
_META_ARRAYS = ("ids", "labels", "uncertainty", "payload", "deleted")
_HEADER = struct.Struct("<6QiI3QdQ")  # 96 bytes, see module docstring
_LABEL_SIZE = 8  # hnswlib labeltype = size_t
_DELETE_MARK = 0x01


class GalleryError(FormatError):
    """A gallery folder is missing, damaged or inconsistent; the message names the file."""


# --------------------------------------------------------------------------- small helpers


def utc_now_iso() -> str:
    """Current time as ISO 8601 UTC, second precision (``2024-05-01T12:00:00Z``)."""
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def shard_file_names(number: int) -> tuple[str, str]:
    """``(index_file, meta_file)`` names of shard ``number``."""
    return f"shard-{number:05d}.hnsw", f"shard-{number:05d}.meta.npz"


def sha256_file(path: str | os.PathLike[str], chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def safe_join(folder: Path, name: str) -> Path:
    """``folder / name`` for a plain file name from a manifest; refuses anything that escapes.

    Refused: non-strings, empty, ``.``/``..``, absolute paths, path separators (``/``, ``\\``),
    drive colons, NUL, and symlinks resolving outside ``folder``.
    """
    folder = Path(folder)
    if not isinstance(name, str) or not name:
        raise GalleryError(f"manifest entry {name!r}: file name must be a non-empty string")
    if name in (".", "..") or any(c in name for c in "/\\:\x00") or os.path.isabs(name):
        raise GalleryError(
            f"manifest entry {name!r}: not a plain file name inside the gallery folder "
            "(absolute paths, '..' and path separators are refused)"
        )
    path = folder / name
    try:
        resolved = path.resolve()
        root = folder.resolve()
    except (OSError, RuntimeError) as exc:
        raise GalleryError(f"manifest entry {name!r}: cannot resolve path: {exc}") from exc
    if resolved.parent != root:
        raise GalleryError(
            f"manifest entry {name!r}: resolves to {resolved}, outside the gallery folder {root}"
        )
    return path


def _file_entry(path: Path) -> dict[str, Any]:
    return {"bytes": path.stat().st_size, "sha256": sha256_file(path)}


# --------------------------------------------------------------------------- type checks


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def _require(d: dict, key: str, kind: str, where: str) -> Any:
    if key not in d:
        raise GalleryError(f"{where}: missing key {key!r}")
    v = d[key]
    ok = {
        "int": _is_int(v),
        "pos_int": _is_int(v) and v > 0,
        "nonneg_int": _is_int(v) and v >= 0,
        "str": isinstance(v, str),
        "nonempty_str": isinstance(v, str) and bool(v),
        "number": _is_number(v),
        "dict": isinstance(v, dict),
        "list": isinstance(v, list),
    }[kind]
    if not ok:
        raise GalleryError(f"{where}: key {key!r} must be {kind.replace('_', ' ')}, got {v!r:.80}")
    return v


def _no_unknown(d: dict, allowed: Iterable[str], where: str) -> None:
    unknown = sorted(set(d) - set(allowed))
    if unknown:
        raise GalleryError(f"{where}: unknown key(s) {unknown} (format_version {FORMAT_VERSION})")


# --------------------------------------------------------------------------- dataclasses


@dataclass
class ShardFiles:
    """One shard as listed in the manifest."""

    index_file: str
    meta_file: str
    count: int  # items stored in the index, including deleted ones
    deleted: int
    files: dict[str, dict]  # {file name: {"bytes": int, "sha256": str}}

    @property
    def live(self) -> int:
        """Items not deleted."""
        return self.count - self.deleted

    def to_dict(self) -> dict[str, Any]:
        return {
            "index_file": self.index_file,
            "meta_file": self.meta_file,
            "count": self.count,
            "deleted": self.deleted,
            "files": {
                k: {"bytes": v["bytes"], "sha256": v["sha256"]} for k, v in self.files.items()
            },
        }

    @classmethod
    def from_dict(cls, d: Any, where: str = "shard") -> ShardFiles:
        """Parse and validate; GalleryError naming ``where`` and the bad key."""
        if not isinstance(d, dict):
            raise GalleryError(f"{where}: must be an object, got {type(d).__name__}")
        _no_unknown(d, ("index_file", "meta_file", "count", "deleted", "files"), where)
        index_file = _require(d, "index_file", "nonempty_str", where)
        meta_file = _require(d, "meta_file", "nonempty_str", where)
        count = _require(d, "count", "nonneg_int", where)
        deleted = _require(d, "deleted", "nonneg_int", where)
        files = _require(d, "files", "dict", where)
        if index_file == meta_file:
            raise GalleryError(f"{where}: index_file and meta_file are the same ({index_file!r})")
        if deleted > count:
            raise GalleryError(f"{where}: deleted ({deleted}) exceeds count ({count})")
        if set(files) != {index_file, meta_file}:
            raise GalleryError(
                f"{where}: 'files' must describe exactly {sorted({index_file, meta_file})}, "
                f"got {sorted(files)}"
            )
        clean: dict[str, dict] = {}
        for name, entry in files.items():
            w = f"{where}: files[{name!r}]"
            if not isinstance(entry, dict):
                raise GalleryError(f"{w}: must be an object")
            _no_unknown(entry, ("bytes", "sha256"), w)
            size = _require(entry, "bytes", "nonneg_int", w)
            digest = _require(entry, "sha256", "str", w)
            if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
                raise GalleryError(f"{w}: 'sha256' must be 64 lowercase hex digits")
            clean[name] = {"bytes": size, "sha256": digest}
        return cls(index_file, meta_file, count, deleted, clean)


@dataclass
class ShardMeta:
    """The sidecar of one shard: per-item string id, label, uncertainty, payload, deleted flag."""

    ids: list[str]
    labels: np.ndarray  # int64
    uncertainty: np.ndarray  # float32
    payload: list[dict | None]
    deleted: np.ndarray  # bool

    def __len__(self) -> int:
        return len(self.ids)


_MANIFEST_KEYS = (
    "format_version",
    "space_id",
    "dim",
    "metric",
    "hnsw",
    "gallery_models",
    "heads",
    "uncertainty_quantiles",
    "shards",
    "rejected",
    "skipped",
    "created",
    "tool_version",
    "extra",
)


@dataclass
class Manifest:
    """``manifest.json``: what a gallery is, and the checksums of every shard file."""

    space_id: str
    dim: int
    metric: str
    hnsw: dict  # {"M", "ef_construction", "ef_search"}
    gallery_models: list[dict]  # [{name, fingerprint, head_fingerprint}]
    heads: dict  # free-form: mode, fingerprint, ...
    uncertainty_quantiles: dict[str, float]  # {"0.5": .., "0.9": ..}
    shards: list[ShardFiles]
    rejected: list[dict]  # [{id, uncertainty}]
    skipped: int
    created: str  # ISO 8601 UTC
    tool_version: str
    format_version: int = FORMAT_VERSION
    extra: dict = field(default_factory=dict)

    @property
    def count(self) -> int:
        """Live (not deleted) items over all shards."""
        return sum(s.count - s.deleted for s in self.shards)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": self.format_version,
            "space_id": self.space_id,
            "dim": self.dim,
            "metric": self.metric,
            "hnsw": dict(self.hnsw),
            "gallery_models": [dict(m) for m in self.gallery_models],
            "heads": dict(self.heads),
            "uncertainty_quantiles": dict(self.uncertainty_quantiles),
            "shards": [s.to_dict() for s in self.shards],
            "rejected": [dict(r) for r in self.rejected],
            "skipped": self.skipped,
            "created": self.created,
            "tool_version": self.tool_version,
            "extra": dict(self.extra),
        }

    @classmethod
    def from_dict(cls, d: Any, where: str = MANIFEST_FILE) -> Manifest:
        """Parse and validate; GalleryError naming ``where`` and the missing/bad key."""
        if not isinstance(d, dict):
            raise GalleryError(f"{where}: top level must be a JSON object")
        version = _require(d, "format_version", "int", where)
        if version != FORMAT_VERSION:
            raise GalleryError(
                f"{where}: unknown format_version {version}; this reader supports "
                f"format_version {FORMAT_VERSION}"
            )
        _no_unknown(d, _MANIFEST_KEYS, where)
        metric = _require(d, "metric", "str", where)
        if metric != METRIC:
            raise GalleryError(f"{where}: metric {metric!r} is not supported (only {METRIC!r})")
        space_id = _require(d, "space_id", "nonempty_str", where)
        dim = _require(d, "dim", "pos_int", where)

        hnsw = _require(d, "hnsw", "dict", where)
        _no_unknown(hnsw, ("M", "ef_construction", "ef_search"), f"{where}: hnsw")
        for key in ("M", "ef_construction", "ef_search"):
            _require(hnsw, key, "pos_int", f"{where}: hnsw")

        models = _require(d, "gallery_models", "list", where)
        for i, m in enumerate(models):
            w = f"{where}: gallery_models[{i}]"
            if not isinstance(m, dict):
                raise GalleryError(f"{w}: must be an object")
            for key in ("name", "fingerprint", "head_fingerprint"):
                _require(m, key, "str", w)

        heads = _require(d, "heads", "dict", where)
        quantiles = _require(d, "uncertainty_quantiles", "dict", where)
        for q, v in quantiles.items():
            try:
                ok = 0.0 <= float(q) <= 1.0
            except ValueError:
                ok = False
            if not ok or not _is_number(v):
                raise GalleryError(
                    f"{where}: uncertainty_quantiles entry {q!r}: {v!r} needs a key in [0, 1] "
                    "and a finite number"
                )

        shard_dicts = _require(d, "shards", "list", where)
        shards = [
            ShardFiles.from_dict(s, f"{where}: shards[{i}]") for i, s in enumerate(shard_dicts)
        ]
        seen: set[str] = set()
        for s in shards:
            for name in (s.index_file, s.meta_file):
                if name in seen or name == MANIFEST_FILE:
                    raise GalleryError(f"{where}: file {name!r} is listed more than once")
                seen.add(name)

        rejected = _require(d, "rejected", "list", where)
        for i, r in enumerate(rejected):
            w = f"{where}: rejected[{i}]"
            if not isinstance(r, dict):
                raise GalleryError(f"{w}: must be an object")
            _require(r, "id", "str", w)
            _require(r, "uncertainty", "number", w)

        skipped = _require(d, "skipped", "nonneg_int", where)
        created = _require(d, "created", "str", where)
        try:
            stamp = datetime.fromisoformat(created.replace("Z", "+00:00"))
        except ValueError as exc:
            raise GalleryError(f"{where}: 'created' {created!r} is not ISO 8601") from exc
        if stamp.utcoffset() is None or stamp.utcoffset().total_seconds() != 0:
            raise GalleryError(f"{where}: 'created' {created!r} must be in UTC")
        tool_version = _require(d, "tool_version", "str", where)
        extra = d.get("extra", {})
        if not isinstance(extra, dict):
            raise GalleryError(f"{where}: key 'extra' must be dict")
        return cls(
            space_id=space_id,
            dim=dim,
            metric=metric,
            hnsw=dict(hnsw),
            gallery_models=[dict(m) for m in models],
            heads=dict(heads),
            uncertainty_quantiles={str(k): float(v) for k, v in quantiles.items()},
            shards=shards,
            rejected=[dict(r) for r in rejected],
            skipped=skipped,
            created=created,
            tool_version=tool_version,
            format_version=version,
            extra=dict(extra),
        )


# --------------------------------------------------------------------------- meta sidecar


def _payload_json(p: Any, i: int) -> str:
    if p is None:
        return ""
    if not isinstance(p, dict):
        raise ValueError(f"payload[{i}] must be a dict or None, got {type(p).__name__}")
    try:
        return json.dumps(
            p, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
        )
    except (TypeError, ValueError) as exc:
        raise ValueError(f"payload[{i}] is not JSON-serialisable: {exc}") from exc


def _write_meta_file(f: IO[bytes], meta: ShardMeta) -> None:
    payload = [_payload_json(p, i) for i, p in enumerate(meta.payload)]
    np.savez(
        f,
        ids=np.asarray(meta.ids, dtype=np.str_),
        labels=np.asarray(meta.labels, dtype=np.int64),
        uncertainty=np.asarray(meta.uncertainty, dtype=np.float32),
        payload=np.asarray(payload, dtype=np.str_),
        deleted=np.asarray(meta.deleted, dtype=bool),
    )


def read_meta(path: str | os.PathLike[str]) -> ShardMeta:
    """Load a ``.meta.npz`` sidecar (never unpickling); GalleryError if malformed."""
    path = Path(path)
    arrays: dict[str, np.ndarray] = {}
    try:
        with np.load(path, allow_pickle=False) as z:
            if not isinstance(z, np.lib.npyio.NpzFile):
                raise GalleryError(f"{path.name}: not an .npz archive")
            names = set(z.files)
            missing = [k for k in _META_ARRAYS if k not in names]
            if missing:
                raise GalleryError(f"{path.name}: missing array(s) {missing}")
            extra = sorted(names - set(_META_ARRAYS))
            if extra:
                raise GalleryError(f"{path.name}: unknown array(s) {extra}")
            for key in _META_ARRAYS:
                try:
                    arrays[key] = z[key]
                except ValueError as exc:  # object arrays need pickle
                    raise GalleryError(f"{path.name}: array {key!r} refused: {exc}") from exc
    except GalleryError:
        raise
    except FileNotFoundError as exc:
        raise GalleryError(f"{path.name}: missing ({path})") from exc
    except Exception as exc:  # zipfile.BadZipFile, OSError, EOFError, ValueError ...
        raise GalleryError(f"{path.name}: not a readable .npz archive: {exc}") from exc

    kinds = {"ids": "U", "labels": "iu", "uncertainty": "f", "payload": "U", "deleted": "b"}
    n = None
    for key, kind in kinds.items():
        a = arrays[key]
        if a.ndim != 1 or a.dtype.kind not in kind:
            raise GalleryError(
                f"{path.name}: array {key!r} must be 1-D of kind {kind!r}, got {a.dtype} {a.shape}"
            )
        if n is None:
            n = len(a)
        elif len(a) != n:
            raise GalleryError(f"{path.name}: array {key!r} has {len(a)} items, 'ids' has {n}")
    labels = arrays["labels"]
    if labels.size and (labels.min() < 0 or labels.max() > np.iinfo(np.int64).max):
        raise GalleryError(f"{path.name}: labels must be non-negative int64")
    labels = labels.astype(np.int64)
    if len(np.unique(labels)) != len(labels):
        raise GalleryError(f"{path.name}: labels are not unique")
    ids = [str(s) for s in arrays["ids"]]
    if len(set(ids)) != len(ids):
        raise GalleryError(f"{path.name}: ids are not unique")
    payload: list[dict | None] = []
    for i, s in enumerate(arrays["payload"]):
        if s == "":
            payload.append(None)
            continue
        try:
            p = json.loads(str(s))
        except ValueError as exc:
            raise GalleryError(f"{path.name}: payload[{i}] is not JSON: {exc}") from exc
        if not isinstance(p, dict):
            raise GalleryError(f"{path.name}: payload[{i}] must be a JSON object")
        payload.append(p)
    return ShardMeta(
        ids=ids,
        labels=labels,
        uncertainty=arrays["uncertainty"].astype(np.float32),
        payload=payload,
        deleted=arrays["deleted"].astype(bool),
    )


# --------------------------------------------------------------------------- writing shards


def write_shard(
    folder: Path,
    number: int,
    vectors: np.ndarray,
    labels: np.ndarray,
    ids: list[str],
    uncertainty: np.ndarray,
    payload: list[dict | None] | None,
    M: int,
    ef_construction: int,
    seed: int = 100,
    num_threads: int = 1,
) -> ShardFiles:
    """Build an hnswlib index over ``vectors`` and write it plus its sidecar into ``folder``.

    Files are ``shard-{number:05d}.hnsw`` and ``shard-{number:05d}.meta.npz``, each written to
    a temporary name and ``os.replace``d into place. ValueError on bad input.
    """
    folder = Path(folder)
    if not _is_int(number) or number < 0:
        raise ValueError(f"shard number must be a non-negative int, got {number!r}")
    if not isinstance(vectors, np.ndarray) or vectors.ndim != 2 or vectors.dtype != np.float32:
        got = (
            f"{vectors.dtype} {vectors.shape}"
            if isinstance(vectors, np.ndarray)
            else type(vectors).__name__
        )
        raise ValueError(f"vectors must be a 2-D float32 array, got {got}")
    n, dim = vectors.shape
    if n < 1 or dim < 1:
        raise ValueError(f"vectors must be non-empty, got shape {vectors.shape}")
    bad = ~np.isfinite(vectors).all(axis=1)
    if bad.any():
        raise ValueError(f"vectors contain NaN/inf (row {int(np.flatnonzero(bad)[0])})")
    norms = np.linalg.norm(vectors.astype(np.float64), axis=1)
    off = np.abs(norms - 1.0) > NORM_TOLERANCE
    if off.any():
        i = int(np.flatnonzero(off)[0])
        raise ValueError(
            f"vectors must be L2-normalised (within {NORM_TOLERANCE}); "
            f"row {i} has norm {norms[i]:.6f}"
        )
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.dtype.kind not in "iu" or len(labels) != n:
        raise ValueError(
            f"labels must be a 1-D integer array of length {n}, got {labels.dtype} {labels.shape}"
        )
    if labels.min() < 0 or labels.max() > np.iinfo(np.int64).max:
        raise ValueError("labels must be non-negative and fit in int64")
    labels = labels.astype(np.int64)
    if len(np.unique(labels)) != n:
        raise ValueError("labels must be unique")
    if not isinstance(ids, (list, tuple)) or len(ids) != n:
        raise ValueError(f"ids must be a list of {n} strings")
    for i, s in enumerate(ids):
        if not isinstance(s, str) or not s or "\x00" in s:
            raise ValueError(f"ids[{i}] must be a non-empty string without NUL, got {s!r}")
    if len(set(ids)) != n:
        seen: set[str] = set()
        dup = next(s for s in ids if s in seen or seen.add(s))
        raise ValueError(f"ids must be unique within a shard; {dup!r} appears more than once")
    uncertainty = np.asarray(uncertainty, dtype=np.float64)
    if uncertainty.shape != (n,) or not np.isfinite(uncertainty).all():
        raise ValueError(f"uncertainty must be {n} finite numbers, got shape {uncertainty.shape}")
    if payload is None:
        payload = [None] * n
    if len(payload) != n:
        raise ValueError(f"payload must have {n} entries, got {len(payload)}")
    for i, p in enumerate(payload):
        _payload_json(p, i)  # validates
    if not _is_int(M) or M < 2:
        raise ValueError(f"M must be an int >= 2, got {M!r}")
    if not _is_int(ef_construction) or ef_construction < 1:
        raise ValueError(f"ef_construction must be a positive int, got {ef_construction!r}")
    if not _is_int(num_threads) or num_threads < 1:
        raise ValueError(f"num_threads must be a positive int, got {num_threads!r}")

    folder.mkdir(parents=True, exist_ok=True)
    index_name, meta_name = shard_file_names(number)
    meta = ShardMeta(
        ids=list(ids),
        labels=labels,
        uncertainty=uncertainty.astype(np.float32),
        payload=list(payload),
        deleted=np.zeros(n, dtype=bool),
    )
    index = hnswlib.Index(space=HNSW_SPACE, dim=dim)
    index.init_index(max_elements=n, M=M, ef_construction=ef_construction, random_seed=seed)
    index.add_items(vectors, labels, num_threads=num_threads)
    _save_pair(folder, index, index_name, meta, meta_name)
    return ShardFiles(
        index_file=index_name,
        meta_file=meta_name,
        count=n,
        deleted=0,
        files={
            index_name: _file_entry(folder / index_name),
            meta_name: _file_entry(folder / meta_name),
        },
    )


def _save_pair(
    folder: Path, index: hnswlib.Index, index_name: str, meta: ShardMeta, meta_name: str
) -> None:
    """Write the index and its sidecar, each atomically (see :mod:`query_sdk.fileio`)."""
    with atomic_path(folder / index_name) as tmp:
        index.save_index(str(tmp))
    with atomic_write(folder / meta_name) as f:
        _write_meta_file(f, meta)


def update_shard_deletions(
    folder: Path, shard: ShardFiles, delete_labels: set[int] | np.ndarray, dim: int
) -> ShardFiles:
    """Mark the given labels (those present and live in this shard) deleted; return new entry.

    The shard is verified first. Index and sidecar are rewritten via temp files + os.replace;
    until the caller writes the manifest with the returned entry, verification of this shard
    fails (checksums), so a crash in between is detected, never silently used. If nothing
    changes, nothing is written and an equal ShardFiles is returned.
    """
    folder = Path(folder)
    if isinstance(delete_labels, np.ndarray):
        wanted = np.unique(delete_labels.astype(np.int64).ravel())
    else:
        wanted = np.array(sorted({int(x) for x in delete_labels}), dtype=np.int64)
    index, meta = load_shard(folder, shard, dim, ef_search=10, verify=True)
    hit = np.isin(meta.labels, wanted) & ~meta.deleted
    if not hit.any():
        return ShardFiles.from_dict(shard.to_dict())
    for lab in meta.labels[hit]:
        index.mark_deleted(int(lab))
    meta.deleted = meta.deleted | hit
    _save_pair(folder, index, shard.index_file, meta, shard.meta_file)
    return ShardFiles(
        index_file=shard.index_file,
        meta_file=shard.meta_file,
        count=shard.count,
        deleted=int(meta.deleted.sum()),
        files={
            shard.index_file: _file_entry(folder / shard.index_file),
            shard.meta_file: _file_entry(folder / shard.meta_file),
        },
    )


# --------------------------------------------------------------------------- manifest


def write_manifest(folder: Path, manifest: Manifest) -> None:
    """Write ``manifest.json`` (sorted keys, indent 2) via temp file + os.replace. Write it last."""
    d = manifest.to_dict()
    Manifest.from_dict(d, where=f"{MANIFEST_FILE} (about to be written)")  # never write junk
    write_json_atomic(Path(folder) / MANIFEST_FILE, d)


def read_manifest_bytes(folder: Path) -> bytes:
    """The exact bytes of ``folder/manifest.json`` (what a signature covers)."""
    path = Path(folder) / MANIFEST_FILE
    if not path.is_file():
        raise GalleryError(f"{MANIFEST_FILE}: missing in {Path(folder)}")
    return path.read_bytes()


def parse_manifest(data: bytes, where: str = MANIFEST_FILE) -> Manifest:
    """Parse and validate manifest bytes; GalleryError naming ``where`` on any problem."""
    d = parse_json(data, where, GalleryError)
    return Manifest.from_dict(d, where=where)


def read_manifest(folder: Path) -> Manifest:
    """Read and validate ``folder/manifest.json``; GalleryError on any problem."""
    data = read_manifest_bytes(folder)
    return parse_manifest(data, where=str(Path(folder) / MANIFEST_FILE))


# --------------------------------------------------------------------------- index header


@dataclass(frozen=True)
class IndexHeader:
    """The fixed 96-byte header of an hnswlib 0.8 index file."""

    offset_level0: int
    max_elements: int
    cur_element_count: int
    size_data_per_element: int
    label_offset: int
    offset_data: int
    maxlevel: int
    enterpoint_node: int
    maxM: int
    maxM0: int
    M: int
    mult: float
    ef_construction: int

    SIZE = _HEADER.size

    @property
    def implied_dim(self) -> float:
        """Vector dim implied by the element size (non-integer if inconsistent)."""
        return (self.size_data_per_element - _LABEL_SIZE - (self.maxM0 * 4 + 4)) / 4


def read_index_header(data: bytes, name: str = "index") -> IndexHeader:
    """Parse the header from the first bytes of an index file; GalleryError if too short."""
    if len(data) < _HEADER.size:
        raise GalleryError(
            f"{name}: {len(data)} bytes, shorter than the {_HEADER.size}-byte hnswlib header"
        )
    return IndexHeader(*_HEADER.unpack_from(data, 0))


def _check_index(
    data: bytes, name: str, dim: int, count: int, M: int | None, ef_construction: int | None
) -> tuple[np.ndarray, np.ndarray]:
    """Check header and link structure of an hnswlib index file against the manifest.

    Returns ``(labels, deleted)`` per internal id, for comparison with the sidecar.
    """
    h = read_index_header(data, name)
    links0 = h.maxM0 * 4 + 4
    if h.maxM < 1 or h.maxM0 < 1 or h.maxM0 > 0xFFFF or h.maxM > 0xFFFF:
        raise GalleryError(f"{name}: implausible header (maxM {h.maxM}, maxM0 {h.maxM0})")
    if h.size_data_per_element != links0 + dim * 4 + _LABEL_SIZE:
        implied = h.implied_dim
        implied_s = (
            str(int(implied)) if implied == int(implied) else f"{implied:.2f} (not a whole dim)"
        )
        raise GalleryError(
            f"{name}: wrong dims: manifest dim is {dim}, the index implies dim {implied_s} "
            f"(size_data_per_element {h.size_data_per_element}, maxM0 {h.maxM0})"
        )
    expect = {
        "offsetLevel0": (h.offset_level0, 0),
        "offsetData": (h.offset_data, links0),
        "label_offset": (h.label_offset, links0 + dim * 4),
        "cur_element_count": (h.cur_element_count, count),
        "maxM": (h.maxM, h.M),
        "maxM0": (h.maxM0, 2 * h.M),
    }
    if M is not None:
        expect["M"] = (h.M, M)
    if ef_construction is not None and M is not None:
        expect["ef_construction"] = (h.ef_construction, max(ef_construction, M))
    for field_name, (got, want) in expect.items():
        if got != want:
            raise GalleryError(
                f"{name}: header {field_name} is {got}, expected {want} from the manifest"
            )
    if h.max_elements < h.cur_element_count:
        raise GalleryError(
            f"{name}: header max_elements {h.max_elements} < element count {h.cur_element_count}"
        )
    n = h.cur_element_count
    level0_end = _HEADER.size + n * h.size_data_per_element
    if len(data) < level0_end + 4 * n:
        raise GalleryError(
            f"{name}: truncated: {len(data)} bytes, the header and {n} elements need "
            f"at least {level0_end + 4 * n}"
        )
    if n == 0:
        if len(data) != level0_end:
            raise GalleryError(f"{name}: {len(data) - level0_end} unexpected trailing bytes")
        return np.zeros(0, np.int64), np.zeros(0, bool)
    if not 0 <= h.maxlevel < 64 or h.enterpoint_node >= n:
        raise GalleryError(
            f"{name}: bad entry point {h.enterpoint_node} / maxlevel {h.maxlevel} for {n} elements"
        )

    rows = np.frombuffer(data, np.uint8, count=n * h.size_data_per_element, offset=_HEADER.size)
    rows = rows.reshape(n, h.size_data_per_element)
    n_links = rows[:, 0:2].copy().view("<u2").ravel()
    if (n_links > h.maxM0).any():
        raise GalleryError(f"{name}: level-0 link count exceeds maxM0 {h.maxM0}")
    neighbours = rows[:, 4:links0].copy().view("<u4").reshape(n, h.maxM0)
    used = np.arange(h.maxM0)[None, :] < n_links[:, None]
    if (neighbours[used] >= n).any():
        raise GalleryError(f"{name}: level-0 link points past the {n} elements")
    vecs = rows[:, links0 : links0 + dim * 4].copy().view("<f4")
    if not np.isfinite(vecs).all():
        raise GalleryError(f"{name}: stored vectors contain NaN/inf")
    norms = np.linalg.norm(vecs.astype(np.float64), axis=1)
    if (np.abs(norms - 1.0) > NORM_TOLERANCE).any():
        raise GalleryError(f"{name}: stored vectors are not L2-normalised (metric {METRIC!r})")
    labels = rows[:, h.label_offset : h.label_offset + _LABEL_SIZE].copy().view("<u8").ravel()
    if (labels > np.iinfo(np.int64).max).any() or len(np.unique(labels)) != n:
        raise GalleryError(f"{name}: stored labels are not unique non-negative int64")
    deleted = (rows[:, 2] & _DELETE_MARK).astype(bool)

    # upper levels: per element u32 size + size bytes, levels = size / (4 + 4 * maxM)
    links_per_level = h.maxM * 4 + 4
    pos = level0_end
    top = -1
    top_of_entry = -1
    for i in range(n):
        if pos + 4 > len(data):
            raise GalleryError(f"{name}: truncated in the upper-level links of element {i}")
        (size,) = struct.unpack_from("<I", data, pos)
        pos += 4
        if size:
            levels, rem = divmod(size, links_per_level)
            if rem or levels > h.maxlevel or pos + size > len(data):
                raise GalleryError(
                    f"{name}: bad upper-level link block of element {i} ({size} bytes)"
                )
            block = np.frombuffer(data, "<u4", count=size // 4, offset=pos).reshape(
                levels, h.maxM + 1
            )
            counts = block[:, 0] & 0xFFFF
            if (counts > h.maxM).any():
                raise GalleryError(f"{name}: upper-level link count of element {i} exceeds maxM")
            mask = np.arange(h.maxM)[None, :] < counts[:, None]
            if (block[:, 1:][mask] >= n).any():
                raise GalleryError(
                    f"{name}: upper-level link of element {i} points past the elements"
                )
            pos += size
        else:
            levels = 0
        top = max(top, levels)
        if i == h.enterpoint_node:
            top_of_entry = levels
    if pos != len(data):
        raise GalleryError(f"{name}: {len(data) - pos} unexpected trailing bytes")
    if top != h.maxlevel or top_of_entry != h.maxlevel:
        raise GalleryError(f"{name}: maxlevel {h.maxlevel} does not match the stored levels")
    return labels.astype(np.int64), deleted


# --------------------------------------------------------------------------- verify / load


def _check_file(folder: Path, shard: ShardFiles, name: str) -> Path:
    """safe_join, existence and size of one shard file."""
    path = safe_join(folder, name)
    entry = shard.files.get(name)
    if entry is None:
        raise GalleryError(f"{name}: no size/sha256 entry in the manifest")
    if not path.is_file():
        raise GalleryError(f"{name}: listed in the manifest but missing from {folder}")
    size = path.stat().st_size
    if size != entry["bytes"]:
        raise GalleryError(f"{name}: size {size} bytes, manifest says {entry['bytes']}")
    return path


def _verify_shard(
    folder: Path,
    shard: ShardFiles,
    dim: int,
    M: int | None = None,
    ef_construction: int | None = None,
) -> ShardMeta:
    """Checksums, index header/structure and sidecar of one shard; returns the sidecar."""
    folder = Path(folder)
    index_path = _check_file(folder, shard, shard.index_file)
    meta_path = _check_file(folder, shard, shard.meta_file)
    data = index_path.read_bytes()
    want = shard.files[shard.index_file]
    got = hashlib.sha256(data).hexdigest()
    if len(data) != want["bytes"] or got != want["sha256"]:
        raise GalleryError(f"{shard.index_file}: sha256 {got}, manifest says {want['sha256']}")
    want = shard.files[shard.meta_file]
    got = sha256_file(meta_path)
    if got != want["sha256"]:
        raise GalleryError(f"{shard.meta_file}: sha256 {got}, manifest says {want['sha256']}")

    index_labels, index_deleted = _check_index(
        data, shard.index_file, dim, shard.count, M, ef_construction
    )
    del data
    meta = read_meta(meta_path)
    if len(meta) != shard.count:
        raise GalleryError(f"{shard.meta_file}: {len(meta)} items, manifest count is {shard.count}")
    if int(meta.deleted.sum()) != shard.deleted:
        raise GalleryError(
            f"{shard.meta_file}: {int(meta.deleted.sum())} deleted, manifest says {shard.deleted}"
        )
    a, b = np.argsort(index_labels), np.argsort(meta.labels)
    if not np.array_equal(index_labels[a], meta.labels[b]):
        raise GalleryError(f"{shard.meta_file}: labels differ from those in {shard.index_file}")
    if not np.array_equal(index_deleted[a], meta.deleted[b]):
        raise GalleryError(
            f"{shard.meta_file}: deleted flags differ from those in {shard.index_file}"
        )
    return meta


def verify_gallery(
    folder: Path, manifest: Manifest | None = None, shards: list[int] | None = None
) -> Manifest:
    """Check the (selected) shards of a gallery against its manifest; return the manifest.

    ``shards`` are positions in ``manifest.shards`` (default: all). Raises GalleryError naming
    the file and the problem. Labels must also be unique across the checked shards.
    """
    folder = Path(folder)
    if manifest is None:
        manifest = read_manifest(folder)
    selected = range(len(manifest.shards)) if shards is None else shards
    seen: dict[int, str] = {}
    for i in selected:
        if not _is_int(i) or not 0 <= i < len(manifest.shards):
            raise GalleryError(
                f"{MANIFEST_FILE}: no shard number {i!r} ({len(manifest.shards)} shards)"
            )
        shard = manifest.shards[i]
        meta = _verify_shard(
            folder, shard, manifest.dim, manifest.hnsw["M"], manifest.hnsw["ef_construction"]
        )
        for lab in meta.labels.tolist():
            if lab in seen:
                raise GalleryError(f"{shard.meta_file}: label {lab} also used in {seen[lab]}")
            seen[lab] = shard.meta_file
    return manifest


def load_shard(
    folder: Path, shard: ShardFiles, dim: int, ef_search: int, verify: bool = True
) -> tuple[hnswlib.Index, ShardMeta]:
    """Open one shard: verify it, load the index with hnswlib, set ef; ``(index, sidecar)``.

    ``verify=False`` skips checksums and the header check: only for files already verified
    in this process (hnswlib's loader trusts the file).
    """
    folder = Path(folder)
    if not _is_int(ef_search) or ef_search < 1:
        raise ValueError(f"ef_search must be a positive int, got {ef_search!r}")
    if verify:
        meta = _verify_shard(folder, shard, dim)
    else:
        meta = read_meta(safe_join(folder, shard.meta_file))
        if len(meta) != shard.count:
            raise GalleryError(
                f"{shard.meta_file}: {len(meta)} items, manifest count is {shard.count}"
            )
    index_path = safe_join(folder, shard.index_file)
    index = hnswlib.Index(space=HNSW_SPACE, dim=dim)
    try:
        index.load_index(str(index_path), max_elements=shard.count)
    except (RuntimeError, ValueError) as exc:
        raise GalleryError(f"{shard.index_file}: hnswlib could not load it: {exc}") from exc
    if index.element_count != shard.count:
        raise GalleryError(
            f"{shard.index_file}: {index.element_count} elements, manifest count is {shard.count}"
        )
    index.set_ef(ef_search)
    return index, meta
