"""The on-disk gallery format: the single definition, for the builder (writes) and the SDK (reads).

A gallery is a folder::

    manifest.json            written last (temp file + os.replace); describes everything below
    shard-00000.hnsw         stock hnswlib 0.8 index (space "ip", float32, little-endian)
    shard-00000.meta.npz     sidecar: arrays ids (U), labels (int64), uncertainty (float32),
                             payload (U, one JSON object per item, "" for none), deleted (bool)
    shard-00001.hnsw ...
    raw/, skipped.jsonl ...  server-side only, listed in the manifest's ``files``

Vectors are L2-normalised, so the hnswlib inner-product space gives cosine similarity
(``score = 1 - hnswlib distance``). hnswlib labels are int64, unique across the whole gallery;
``ids`` are the user's string ids. Deleted items stay in the index, flagged with hnswlib's
``mark_deleted`` and in the sidecar's ``deleted`` array.

``manifest.json`` (sorted keys, indent 2) holds ``format_version``, ``space_id``, ``dim``,
``metric`` ("cosine"), ``hnsw`` {M, ef_construction, ef_search}, ``gallery_models``
[{name, fingerprint, head_fingerprint}], ``heads`` (free-form), ``uncertainty_quantiles``
{"0.5": ..}, ``shards`` [{index_file, meta_file, count, deleted, files {name: {bytes, sha256}}}],
``rejected`` [{id, uncertainty}], ``skipped``, ``created`` (ISO 8601 UTC), ``tool_version``,
``extra`` (free-form) and ``files`` {relative name: {bytes, sha256}}: the server-side files
outside the shards that matter (``skipped.jsonl``, the build record, ``raw/part-*``), checked
by :func:`verify_gallery`. Unknown keys are refused: additions go into ``extra`` or bump
``FORMAT_VERSION``; version 1 (no ``files``) is still read, writers write version 2. Every
field and its bounds are declared once (``MANIFEST_SPEC``, see :mod:`query_sdk.manifest`), which
is also the published JSON Schema ``query_sdk/schemas/gallery-manifest.schema.json``.

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
import tokenize
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any

import hnswlib
import numpy as np

from .errors import FormatError
from .fileio import (
    MAX_JSON_BYTES,
    atomic_path,
    atomic_write,
    check_regular_file,
    parse_json,
    read_regular_file,
    write_json_atomic,
)
from .manifest import (
    MAX_COUNT,
    MAX_DIM,
    UTC_TIME,
    Arr,
    Enum,
    FreeObj,
    Int,
    Map,
    Num,
    Obj,
    Spec,
    Str,
    Versions,
    file_entry,
    file_name,
    json_schema,
    validate,
)

__all__ = [
    "check_unit_rows",
    "FORMAT_VERSION",
    "READABLE_VERSIONS",
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
    "describe_files",
    "write_manifest",
    "write_json_atomic",
    "read_manifest",
    "read_manifest_bytes",
    "parse_manifest",
    "verify_gallery",
    "verify_files",
    "load_shard",
    "read_meta",
    "read_index_header",
    "shard_file_names",
    "utc_now_iso",
]

FORMAT_VERSION = 2
#: version 1 had no top-level ``files``
READABLE_VERSIONS = (1, 2)
MANIFEST_FILE = "manifest.json"
SIGNATURE_FILE = "manifest.sig"  # see query_sdk.signing
METRIC = "cosine"
HNSW_SPACE = "ip"

NORM_TOLERANCE = 1e-3
_META_ARRAYS = ("ids", "labels", "uncertainty", "payload", "deleted")
_META_OPTIONAL = ("classes",)
_MAX_ID_CHARS = 1024  # ids and class labels
_MAX_PAYLOAD_CHARS = 65536  # one item's payload JSON
# sidecar arrays: allowed dtype kinds and the largest item in bytes (numpy "U": 4 a character)
_META_DTYPES = {
    "ids": ("U", 4 * _MAX_ID_CHARS),
    "labels": ("iu", 8),
    "uncertainty": ("f", 8),
    "payload": ("U", 4 * _MAX_PAYLOAD_CHARS),
    "deleted": ("b", 1),
    "classes": ("U", 4 * _MAX_ID_CHARS),
}
_MAX_LEVELS = 64  # hnswlib draws levels as -ln(U) / ln(M): far below this for any double U
_MAX_M = 10000  # hnswlib caps M here; maxM0 = 2 M must fit the u16 link count
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


def safe_join(
    folder: Path,
    name: str,
    subfolder: bool = False,
    error: Callable[[str], Exception] = GalleryError,
    what: str = "gallery folder",
) -> Path:
    """``folder / name`` for a plain file name from a manifest; refuses anything that escapes.

    Refused (``error`` naming the entry): non-strings, empty, ``.``/``..``, absolute paths,
    path separators (``/``, ``\\``), drive colons, NUL, and symlinks resolving outside
    ``folder`` (the ``what``). With ``subfolder``, one ``/`` is allowed
    (``raw/part-00000.npz``: exactly one sub-folder level), each part a plain name.
    """
    folder = Path(folder)
    if not isinstance(name, str) or not name:
        raise error(f"manifest entry {name!r}: file name must be a non-empty string")
    parts = name.split("/", 1) if subfolder else [name]
    if os.path.isabs(name) or any(
        p in ("", ".", "..") or any(c in p for c in "/\\:\x00") for p in parts
    ):
        raise error(
            f"manifest entry {name!r}: not a plain file name inside the {what} "
            f"(absolute paths, '..' and path separators{' beyond one sub-folder' * subfolder} "
            "are refused)"
        )
    path = folder.joinpath(*parts)
    try:
        resolved = path.resolve()
        root = folder.resolve()
    except (OSError, RuntimeError) as exc:
        raise error(f"manifest entry {name!r}: cannot resolve path: {exc}") from exc
    if resolved.parents[len(parts) - 1] != root:
        raise error(f"manifest entry {name!r}: resolves to {resolved}, outside the {what} {root}")
    return path


def _file_entry(path: Path) -> dict[str, Any]:
    return {"bytes": path.stat().st_size, "sha256": sha256_file(path)}


def describe_files(folder: Path, names: Iterable[str]) -> dict[str, dict[str, Any]]:
    """``{name: {"bytes", "sha256"}}`` of files in ``folder`` (names as in ``Manifest.files``:
    relative, at most one sub-folder level), for the manifest's top-level ``files``."""
    folder = Path(folder)
    return {name: _file_entry(safe_join(folder, name, subfolder=True)) for name in names}


# --------------------------------------------------------------------------- manifest spec

#: hnswlib M (links per element and level; level 0 keeps 2 M, as a u16 count)
MAX_M = 1024
#: ef_construction and ef_search: candidates hnswlib keeps per insertion / query
MAX_EF = 1 << 16
MAX_SHARDS = 1 << 16


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


_SHARD_NAME = file_name(exclude=(MANIFEST_FILE, SIGNATURE_FILE))
_SHARD = Obj(
    {
        "index_file": _SHARD_NAME,
        "meta_file": _SHARD_NAME,
        "count": Int(0, MAX_COUNT, doc="items in the index, deleted ones included"),
        "deleted": Int(0, MAX_COUNT, doc="items flagged deleted (at most count)"),
        "files": Map(
            _SHARD_NAME,
            file_entry(),
            min_items=2,
            max_items=2,
            doc="size and sha256 of index_file and meta_file (exactly those two)",
        ),
    }
)
_V1_FIELDS: dict[str, Spec] = {
    "format_version": Enum([1]),
    "space_id": Str(min_len=1, doc="the embedding space; a searcher refuses another one"),
    "dim": Int(1, MAX_DIM),
    "metric": Enum([METRIC]),
    "hnsw": Obj(
        {
            "M": Int(2, MAX_M),
            "ef_construction": Int(1, MAX_EF),
            "ef_search": Int(1, MAX_EF),
        },
        doc="hnswlib parameters (M, efConstruction, ef)",
    ),
    "gallery_models": Arr(
        Obj({"name": Str(), "fingerprint": Str(), "head_fingerprint": Str()}, open=True)
    ),
    "heads": FreeObj(doc="free-form: mode, fingerprint, ..."),
    "uncertainty_quantiles": Map(
        Str(pattern=r"^(0(\.[0-9]+)?|1(\.0+)?)$", what="a quantile in [0, 1] like '0.9'"),
        Num(),
    ),
    "shards": Arr(_SHARD, max_items=MAX_SHARDS),
    "rejected": Arr(Obj({"id": Str(), "uncertainty": Num()}, open=True)),
    "skipped": Int(0, 2**53 - 1),
    "created": UTC_TIME,
    "tool_version": Str(),
    "extra": FreeObj(doc="free-form additions"),
}
_FILES = Map(
    file_name(exclude=(MANIFEST_FILE, SIGNATURE_FILE), subfolder=True),
    file_entry(),
    doc="files outside the shards that matter (skipped.jsonl, build record, raw parts)",
)
MANIFEST_SPEC = Versions(
    {
        1: Obj(_V1_FIELDS, optional=("extra",)),
        2: Obj(_V1_FIELDS | {"format_version": Enum([2]), "files": _FILES}, optional=("extra",)),
    }
)
_CROSS_CHECKS = (
    "Readers also check what JSON Schema cannot say: a shard's deleted <= count, its "
    "index_file and meta_file differ and are the two names in its files, every file name is "
    "listed once over all shards and 'files', 'created' is a real date; and, against the "
    "files, sizes, sha256, the hnswlib header (count, dim, M, ef_construction) and sidecar."
)

#: the published JSON Schema of a gallery's ``manifest.json``
MANIFEST_SCHEMA = json_schema(
    MANIFEST_SPEC,
    name="gallery-manifest.schema.json",
    title="cmce gallery manifest.json",
    description=f"A gallery folder's manifest (format_version 1 and 2). {_CROSS_CHECKS}",
)


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
        """Parse and validate; GalleryError naming ``where``, the key and the value."""
        d = validate(_SHARD, d, where, GalleryError)
        return cls._checked(d, where)

    @classmethod
    def _checked(cls, d: dict, where: str) -> ShardFiles:
        """From a dict ``_SHARD`` accepted: the checks between its values."""
        index_file, meta_file, files = d["index_file"], d["meta_file"], d["files"]
        if index_file == meta_file:
            raise GalleryError(f"{where}: index_file and meta_file are the same ({index_file!r})")
        if d["deleted"] > d["count"]:
            raise GalleryError(f"{where}: deleted ({d['deleted']}) exceeds count ({d['count']})")
        if set(files) != {index_file, meta_file}:
            raise GalleryError(
                f"{where}: 'files' must describe exactly {sorted({index_file, meta_file})}, "
                f"got {sorted(files)}"
            )
        return cls(index_file, meta_file, d["count"], d["deleted"], files)


@dataclass
class ShardMeta:
    """The sidecar of one shard: per-item string id, label, uncertainty, payload, deleted flag,
    and optionally the item's class label ("" for none; ``None`` if the sidecar has none)."""

    ids: list[str]
    labels: np.ndarray  # int64
    uncertainty: np.ndarray  # float32
    payload: list[dict | None]
    deleted: np.ndarray  # bool
    classes: list[str] | None = None

    def __len__(self) -> int:
        return len(self.ids)


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
    #: files outside the shards that matter (skipped.jsonl, build record, raw parts):
    #: {relative name (at most one sub-folder level): {"bytes", "sha256"}}; since version 2
    files: dict[str, dict] = field(default_factory=dict)

    @property
    def count(self) -> int:
        """Live (not deleted) items over all shards."""
        return sum(s.count - s.deleted for s in self.shards)

    def to_dict(self) -> dict[str, Any]:
        d = {
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
        if self.format_version > 1:
            d["files"] = {k: dict(v) for k, v in self.files.items()}
        return d

    @classmethod
    def from_dict(cls, d: Any, where: str = MANIFEST_FILE) -> Manifest:
        """Parse and validate; GalleryError naming ``where``, the key and the value."""
        d = validate(MANIFEST_SPEC, d, where, GalleryError)
        shards = [
            ShardFiles._checked(s, f"{where}: shards[{i}]") for i, s in enumerate(d["shards"])
        ]
        files = d.get("files", {})
        seen: set[str] = set()
        for name in [n for s in shards for n in (s.index_file, s.meta_file)] + list(files):
            if name in seen:
                raise GalleryError(f"{where}: file {name!r} is listed more than once")
            seen.add(name)
        return cls(
            space_id=d["space_id"],
            dim=d["dim"],
            metric=d["metric"],
            hnsw=d["hnsw"],
            gallery_models=d["gallery_models"],
            heads=d["heads"],
            uncertainty_quantiles={k: float(v) for k, v in d["uncertainty_quantiles"].items()},
            shards=shards,
            rejected=d["rejected"],
            skipped=d["skipped"],
            created=d["created"],
            tool_version=d["tool_version"],
            format_version=d["format_version"],
            extra=d.get("extra", {}),
            files=files,
        )


# --------------------------------------------------------------------------- meta sidecar


def _payload_json(p: Any, i: int) -> str:
    if p is None:
        return ""
    if not isinstance(p, dict):
        raise ValueError(f"payload[{i}] must be a dict or None, got {type(p).__name__}")
    try:
        text = json.dumps(
            p, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
        )
    except (TypeError, ValueError, RecursionError) as exc:
        raise ValueError(f"payload[{i}] is not JSON-serialisable: {exc}") from exc
    if len(text) > _MAX_PAYLOAD_CHARS:
        raise ValueError(
            f"payload[{i}] is {len(text)} characters as JSON, more than the "
            f"{_MAX_PAYLOAD_CHARS} a sidecar holds per item (store large data elsewhere)"
        )
    return text


def _write_meta_file(f: IO[bytes], meta: ShardMeta) -> None:
    payload = [_payload_json(p, i) for i, p in enumerate(meta.payload)]
    optional = {} if meta.classes is None else {"classes": np.asarray(meta.classes, np.str_)}
    np.savez(
        f,
        ids=np.asarray(meta.ids, dtype=np.str_),
        labels=np.asarray(meta.labels, dtype=np.int64),
        uncertainty=np.asarray(meta.uncertainty, dtype=np.float32),
        payload=np.asarray(payload, dtype=np.str_),
        deleted=np.asarray(meta.deleted, dtype=bool),
        **optional,
    )


# what zipfile and numpy's .npy header parser (ast, tokenize) raise on damaged or crafted bytes
_NPZ_ERRORS = (
    OSError,
    EOFError,
    ValueError,
    TypeError,
    SyntaxError,
    RecursionError,
    tokenize.TokenError,
    zipfile.BadZipFile,
)


def _read_member(
    z: zipfile.ZipFile, info: zipfile.ZipInfo, key: str, name: str, count: int | None
) -> np.ndarray:
    """One array of a sidecar; its header is checked before a byte of its data is inflated."""
    where = f"{name}: array {key!r}"
    if info.flag_bits & 0x1:
        raise GalleryError(f"{where} is encrypted; sidecars are plain numpy.savez archives")
    if info.compress_type != zipfile.ZIP_STORED:
        raise GalleryError(
            f"{where} is compressed (zip method {info.compress_type}); sidecars are stored "
            "uncompressed (numpy.savez), so that reading one takes no more memory than its size"
        )
    if info.compress_size != info.file_size:
        raise GalleryError(
            f"{where}: stored uncompressed, yet the zip directory gives {info.compress_size} "
            f"bytes on disk and {info.file_size} unpacked"
        )
    kinds, max_item = _META_DTYPES[key]
    with z.open(info) as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, _, dtype = np.lib.format.read_array_header_2_0(f)
        else:
            raise GalleryError(f"{where}: .npy format version {version} is not supported")
        if dtype.hasobject:
            raise GalleryError(
                f"{where} refused: dtype {dtype} holds Python objects (reading it would unpickle)"
            )
        if dtype.kind not in kinds or dtype.itemsize > max_item or dtype.shape:
            raise GalleryError(
                f"{where} refused: dtype {dtype} is not of kind {kinds!r} with items of at most "
                f"{max_item} bytes"
            )
        want = len(shape) == 1 and shape[0] >= 0 and (count is None or shape[0] == count)
        if not want:
            expect = f"({count},) from the manifest's count" if count is not None else "1-D"
            raise GalleryError(f"{where} refused: shape {shape}, expected {expect}")
        nbytes = shape[0] * dtype.itemsize
        if info.file_size != f.tell() + nbytes:
            raise GalleryError(
                f"{where}: the zip directory gives {info.file_size} bytes, its header implies "
                f"{f.tell() + nbytes} ({shape[0]} x {dtype})"
            )
        data = f.read(nbytes)
        if len(data) != nbytes or f.read(1):  # reading to the end also checks the CRC
            raise GalleryError(f"{where}: {len(data)} data bytes, its header implies {nbytes}")
    return np.frombuffer(data, dtype)


def read_meta(path: str | os.PathLike[str], count: int | None = None) -> ShardMeta:
    """Load a ``.meta.npz`` sidecar; GalleryError naming it if malformed.

    Nothing is unpickled, and no array is inflated before its ``.npy`` header (dtype, item
    size, shape) has been checked against ``count`` (the manifest's; default: the length of
    ``ids``) and the zip directory's sizes against that header: time and memory are bounded by
    the file size and ``count``, so a zip bomb is refused before it is unpacked.
    """
    path = Path(path)
    name = path.name
    if not path.exists():
        raise GalleryError(f"{name}: missing ({path})")
    check_regular_file(path, "sidecar", GalleryError)
    arrays: dict[str, np.ndarray] = {}
    try:
        with zipfile.ZipFile(path) as z:
            infos = z.infolist()
            members = [i.filename for i in infos]
            keys = [m.removesuffix(".npy") for m in members]
            missing = [k for k in _META_ARRAYS if k not in keys]
            if missing:
                raise GalleryError(f"{name}: missing array(s) {missing}")
            extra = sorted(set(members) - {f"{k}.npy" for k in _META_ARRAYS + _META_OPTIONAL})
            if extra or len(set(members)) != len(members):
                raise GalleryError(
                    f"{name}: unknown or repeated member(s) {extra or sorted(members)}"
                )
            by_key = dict(zip(keys, infos, strict=True))
            for key in _META_ARRAYS + _META_OPTIONAL:  # ids first: it fixes count if not given
                if key in by_key:
                    arrays[key] = _read_member(z, by_key[key], key, name, count)
                    count = len(arrays[key]) if count is None else count
    except GalleryError:
        raise
    except _NPZ_ERRORS as exc:
        raise GalleryError(f"{name}: not a readable .npz archive: {exc}") from exc

    labels = arrays["labels"]
    if labels.size and (labels.min() < 0 or labels.max() > np.iinfo(np.int64).max):
        raise GalleryError(f"{name}: labels must be non-negative int64")
    labels = labels.astype(np.int64)
    if len(np.unique(labels)) != len(labels):
        raise GalleryError(f"{name}: labels are not unique")
    ids = arrays["ids"].tolist()
    if len(set(ids)) != len(ids):
        raise GalleryError(f"{name}: ids are not unique")
    uncertainty = arrays["uncertainty"].astype(np.float32)
    if not np.isfinite(uncertainty).all():
        raise GalleryError(f"{name}: uncertainty contains NaN/inf")
    payload: list[dict | None] = []
    for i, s in enumerate(arrays["payload"].tolist()):
        p = parse_json(s, f"{name}: payload[{i}]", GalleryError) if s else None
        if s and not isinstance(p, dict):
            raise GalleryError(f"{name}: payload[{i}] must be a JSON object")
        payload.append(p)
    return ShardMeta(
        ids=ids,
        labels=labels,
        uncertainty=uncertainty,
        payload=payload,
        deleted=arrays["deleted"].astype(bool),
        classes=arrays["classes"].tolist() if "classes" in arrays else None,
    )


# --------------------------------------------------------------------------- writing shards


def check_unit_rows(vectors: np.ndarray, what: str) -> None:
    """ValueError unless every row of ``vectors`` is finite and L2-normalised (metric cosine),
    naming the first row that is not."""
    bad = ~np.isfinite(vectors).all(axis=1)
    if bad.any():
        raise ValueError(f"{what} contain NaN/inf (row {int(np.flatnonzero(bad)[0])})")
    norms = np.linalg.norm(vectors.astype(np.float64), axis=1)
    off = np.abs(norms - 1.0) > NORM_TOLERANCE
    if off.any():
        i = int(np.flatnonzero(off)[0])
        raise ValueError(
            f"{what} must be L2-normalised (metric cosine, within {NORM_TOLERANCE}); "
            f"row {i} has norm {norms[i]:.6f}"
        )


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
    classes: list[str] | None = None,
) -> ShardFiles:
    """Build an hnswlib index over ``vectors`` and write it plus its sidecar into ``folder``.

    Files are ``shard-{number:05d}.hnsw`` and ``shard-{number:05d}.meta.npz``, each written to
    a temporary name and ``os.replace``d into place. ``classes`` (optional) is each item's class
    label ("" for none), kept in the sidecar. ValueError on bad input.
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
    check_unit_rows(vectors, "vectors")
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
        if not isinstance(s, str) or not s or "\x00" in s or len(s) > _MAX_ID_CHARS:
            raise ValueError(
                f"ids[{i}] must be a non-empty string without NUL of at most {_MAX_ID_CHARS} "
                f"characters, got {s!r:.80}"
            )
    if classes is not None:
        if not isinstance(classes, (list, tuple)) or len(classes) != n:
            raise ValueError(f'classes must be a list of {n} strings ("" for none) or None')
        for i, c in enumerate(classes):
            if not isinstance(c, str) or "\x00" in c or len(c) > _MAX_ID_CHARS:
                raise ValueError(
                    f"classes[{i}] must be a string without NUL of at most {_MAX_ID_CHARS} "
                    f"characters, got {c!r:.80}"
                )
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
        classes=None if classes is None else list(classes),
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


def verify_files(folder: Path, manifest: Manifest) -> None:
    """Check every entry of ``manifest.files`` (present, regular file, size, sha256)."""
    folder = Path(folder)
    for name, want in manifest.files.items():
        path = safe_join(folder, name, subfolder=True)
        size = check_regular_file(path, f"file listed in {MANIFEST_FILE}", GalleryError).st_size
        if size != want["bytes"]:
            raise GalleryError(
                f"{path}: {size} bytes, {MANIFEST_FILE} says {want['bytes']}: it was changed "
                "after the gallery was written (rebuild, or restore the file)"
            )
        got = sha256_file(path)
        if got != want["sha256"]:
            raise GalleryError(
                f"{path}: sha256 {got}, {MANIFEST_FILE} says {want['sha256']}: it was changed "
                "after the gallery was written (rebuild, or restore the file)"
            )


def write_manifest(folder: Path, manifest: Manifest) -> None:
    """Write ``manifest.json`` (sorted keys, indent 2) via temp file + os.replace. Write it last."""
    d = replace(manifest, format_version=FORMAT_VERSION).to_dict()  # the current version
    Manifest.from_dict(d, where=f"{MANIFEST_FILE} (about to be written)")  # never write junk
    write_json_atomic(Path(folder) / MANIFEST_FILE, d)


def read_manifest_bytes(folder: Path) -> bytes:
    """The exact bytes of ``folder/manifest.json`` (what a signature covers)."""
    path = Path(folder) / MANIFEST_FILE
    if not path.exists():
        raise GalleryError(f"{MANIFEST_FILE}: missing in {Path(folder)}")
    return read_regular_file(path, MAX_JSON_BYTES, "gallery manifest", GalleryError)


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


def _check_index_header(
    h: IndexHeader,
    size: int,
    name: str,
    dim: int,
    count: int,
    M: int | None,
    ef_construction: int | None,
) -> None:
    """The header against the manifest (count, dim, M) and the file ``size`` against what the
    header allows: all before the body of the file is read or anything is allocated."""
    if not 2 <= h.M <= _MAX_M or h.maxM != h.M or h.maxM0 != 2 * h.M:
        raise GalleryError(
            f"{name}: implausible header (M {h.M}, maxM {h.maxM}, maxM0 {h.maxM0}; hnswlib "
            f"writes maxM = M and maxM0 = 2 M with 2 <= M <= {_MAX_M})"
        )
    links0 = h.maxM0 * 4 + 4
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
        "max_elements": (h.max_elements, count),  # cmce writes indexes without spare room
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
    if not math.isclose(h.mult, 1 / math.log(h.M), rel_tol=1e-9):
        raise GalleryError(f"{name}: header mult is {h.mult}, hnswlib writes 1 / ln(M) for M {h.M}")
    if count == 0:
        if h.maxlevel != -1 or size != _HEADER.size:
            raise GalleryError(
                f"{name}: an empty index is the {_HEADER.size}-byte header with maxlevel -1, "
                f"got {size} bytes and maxlevel {h.maxlevel}"
            )
        return
    if not 0 <= h.maxlevel < _MAX_LEVELS or h.enterpoint_node >= count:
        raise GalleryError(
            f"{name}: bad entry point {h.enterpoint_node} / maxlevel {h.maxlevel} "
            f"for {count} elements"
        )
    need = _HEADER.size + count * (h.size_data_per_element + 4)
    most = need + count * h.maxlevel * (4 + 4 * h.maxM)
    if size < need:
        raise GalleryError(
            f"{name}: truncated: {size} bytes, the header and {count} elements need at least {need}"
        )
    if size > most:
        raise GalleryError(
            f"{name}: {size} bytes, more than the {most} that {count} elements of at most "
            f"{h.maxlevel} levels can take (trailing bytes)"
        )


def _check_index(
    data: bytes, name: str, dim: int, count: int, M: int | None, ef_construction: int | None
) -> tuple[np.ndarray, np.ndarray]:
    """Prove what hnswlib 0.8's ``loadIndex`` and ``searchKnn`` trust about an index file.

    Besides the header (:func:`_check_index_header`), for every element, deleted ones too (the
    search walks their links): level-0 link count <= maxM0 and targets < n, flag bytes as
    hnswlib writes them, a finite unit vector, a unique label; and the upper levels
    (:func:`_check_upper_levels`). Vectorised: time and memory are linear in the file size.
    Returns ``(labels, deleted)`` per internal id, for comparison with the sidecar.
    """
    h = read_index_header(data, name)
    _check_index_header(h, len(data), name, dim, count, M, ef_construction)
    n = count
    if n == 0:
        return np.zeros(0, np.int64), np.zeros(0, bool)
    links0 = h.maxM0 * 4 + 4
    rows = np.frombuffer(data, np.uint8, count=n * h.size_data_per_element, offset=_HEADER.size)
    rows = rows.reshape(n, h.size_data_per_element)
    n_links = rows[:, 0:2].copy().view("<u2").ravel()
    neighbours = rows[:, 4:links0].copy().view("<u4").reshape(n, h.maxM0)
    used = np.arange(h.maxM0)[None, :] < n_links[:, None]
    for bad, problem in (
        (n_links > h.maxM0, f"has more than maxM0 ({h.maxM0}) level-0 links"),
        (((neighbours >= n) & used).any(axis=1), f"has a level-0 link past the {n} elements"),
        ((rows[:, 2] > _DELETE_MARK) | (rows[:, 3] != 0), "has flag bits hnswlib never sets"),
    ):
        if bad.any():
            raise GalleryError(f"{name}: element {int(np.flatnonzero(bad)[0])} {problem}")
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
    _check_upper_levels(data, h, name, n)
    return labels.astype(np.int64), deleted


def _check_upper_levels(data: bytes, h: IndexHeader, name: str, n: int) -> None:
    """The per-element upper-level blocks after level 0 (u32 size, then size bytes: levels x
    [u32 count, maxM x u32 links]): whole levels <= maxlevel, counts <= maxM, every link at
    level l pointing at an element that has level l (else hnswlib follows a missing link
    list), the entry point at maxlevel, no trailing bytes."""
    start = _HEADER.size + n * h.size_data_per_element
    if (len(data) - start) % 4:
        raise GalleryError(
            f"{name}: truncated or padded: the upper-level links are not whole u32 words"
        )
    words = memoryview(data)[start:].cast("I")  # native = little-endian, see module docstring
    per_level = 1 + h.maxM  # words of one level: count + maxM links
    sizes: list[int] = []
    offsets: list[int] = []
    w = 0
    while len(sizes) < n and w < len(words):  # sequential: a block's place needs the last size
        sizes.append(words[w])
        offsets.append(w)
        w += 1 + (words[w] >> 2)
    size = np.asarray(sizes, np.int64)
    levels = size // (4 * per_level)
    bad = (size % (4 * per_level) != 0) | (levels > h.maxlevel)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise GalleryError(
            f"{name}: bad upper-level link block of element {i} ({sizes[i]} bytes; a block is "
            f"at most maxlevel {h.maxlevel} levels of {4 * per_level} bytes)"
        )
    if len(sizes) < n or w > len(words):
        i = len(sizes) - 1 if w > len(words) else len(sizes)
        raise GalleryError(f"{name}: truncated in the upper-level links of element {i}")
    if w < len(words):
        raise GalleryError(f"{name}: {4 * (len(words) - w)} unexpected trailing bytes")
    entry = h.enterpoint_node
    if levels.max() != h.maxlevel or levels[entry] != h.maxlevel:
        raise GalleryError(
            f"{name}: maxlevel {h.maxlevel} does not match the stored levels (highest "
            f"{int(levels.max())}; the entry point {entry} has {int(levels[entry])})"
        )
    owners = np.flatnonzero(levels)
    if not owners.size:
        return
    k = levels[owners]
    owner = np.repeat(owners, k)
    level = np.arange(int(k.sum())) - np.repeat(np.cumsum(k) - k, k) + 1
    first = np.repeat(np.asarray(offsets, np.int64)[owners] + 1, k) + (level - 1) * per_level
    all_words = np.frombuffer(data, "<u4", offset=start)
    counts = all_words[first]
    bad = counts > h.maxM
    if bad.any():
        b = int(np.flatnonzero(bad)[0])
        raise GalleryError(
            f"{name}: element {owner[b]} has {counts[b]} links at level {level[b]}, "
            f"maxM is {h.maxM}"
        )
    targets = all_words[first[:, None] + 1 + np.arange(h.maxM)]
    used = np.arange(h.maxM)[None, :] < counts[:, None]
    target_level = np.where(targets < n, levels[np.minimum(targets, n - 1)], -1)
    bad = used & (target_level < level[:, None])
    if bad.any():
        b, j = (int(x) for x in np.argwhere(bad)[0])
        t = int(targets[b, j])
        at = (
            f"past the {n} elements (hnswlib would read outside the index)"
            if t >= n
            else f"at element {t}, which has only level {levels[t]} (hnswlib would follow a "
            "link list that does not exist)"
        )
        raise GalleryError(
            f"{name}: the link of element {owner[b]} at level {level[b]} points {at}"
        )


# --------------------------------------------------------------------------- verify / load


def _check_file(folder: Path, shard: ShardFiles, name: str) -> Path:
    """safe_join, existence, kind (a regular file) and size of one shard file."""
    path = safe_join(folder, name)
    entry = shard.files.get(name)
    if entry is None:
        raise GalleryError(f"{name}: no size/sha256 entry in the manifest")
    if not path.exists():
        raise GalleryError(f"{name}: listed in the manifest but missing from {folder}")
    size = check_regular_file(path, "shard file", GalleryError).st_size
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
    """Checksums, index header/structure and sidecar of one shard; returns the sidecar.

    The index header is checked against the manifest before the rest of the file is read.
    A GalleryError names the file, the problem and the fix.
    """
    try:
        return _check_shard(Path(folder), shard, dim, M, ef_construction)
    except GalleryError as exc:
        raise GalleryError(f"{exc}; rebuild the gallery or download it again") from exc


def _check_shard(
    folder: Path, shard: ShardFiles, dim: int, M: int | None, ef_construction: int | None
) -> ShardMeta:
    index_path = _check_file(folder, shard, shard.index_file)
    meta_path = _check_file(folder, shard, shard.meta_file)
    want = shard.files[shard.index_file]
    with open(index_path, "rb") as f:
        data = f.read(_HEADER.size)
        header = read_index_header(data, shard.index_file)
        _check_index_header(
            header, want["bytes"], shard.index_file, dim, shard.count, M, ef_construction
        )
        data += f.read(want["bytes"] + 1 - len(data))  # + 1: a file that grew is refused
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
    meta = read_meta(meta_path, shard.count)
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

    ``shards`` are positions in ``manifest.shards`` (default: all, and then also the
    server-side ``manifest.files``: present, size, sha256). Raises GalleryError naming the file
    and the problem. Labels must also be unique across the checked shards.
    """
    folder = Path(folder)
    if manifest is None:
        manifest = read_manifest(folder)
    if shards is None:
        verify_files(folder, manifest)
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
        meta = read_meta(safe_join(folder, shard.meta_file), shard.count)
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
