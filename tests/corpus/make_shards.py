"""Make the crafted-shard corpus (issue 12): a stock gallery, and crafted variants of it.

    .venv/bin/python tests/corpus/make_shards.py    # rewrites base/, cases/, accepted/, cases.json

``base/`` is a stock gallery written by ``query_sdk.gallery_format.write_shard``: one shard of
64 unit vectors, dim 4, M 4 (so upper levels exist), 4 of them with a payload; small, to keep
the checked-in corpus small. Each crafted
gallery holds only the files that differ from ``base/``, always with a ``manifest.json``
re-hashed so that every checksum passes: a loader has to refuse it by its structure. A tool
(the tests, the native SDK) copies ``base/`` and lays the case over it.

- ``cases/<name>/``: hostile files every loader must refuse with an error naming the file
  ``cases.json`` gives (and never crash); ``cases.json`` also says what was crafted.
- ``accepted/<name>/``: crafted but harmless files (a self-link, stale link slots, an optional
  ``classes`` array, a deleted item) that must load and search.

Manifests are ``format_version`` 1, which every gallery reader since the format began reads.
The functions here are also what the tests use to craft more cases at run time.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import struct
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))

from query_sdk.gallery_format import write_shard  # noqa: E402

N, DIM, M, EF_CONSTRUCTION, SEED = 64, 4, 4, 40, 7
INDEX, META = "shard-00000.hnsw", "shard-00000.meta.npz"
HEADER = struct.Struct("<6QiI3QdQ")
FIELDS = (
    *("offset_level0", "max_elements", "cur_element_count", "size_data_per_element"),
    *("label_offset", "offset_data", "maxlevel", "enterpoint_node", "maxM", "maxM0", "M"),
    *("mult", "ef_construction"),
)


@dataclass
class Index:
    """An hnswlib 0.8 index file, parsed: header fields, level-0 rows, upper-level blocks."""

    header: dict
    rows: np.ndarray  # (n, size_data_per_element) uint8
    blocks: list[np.ndarray | None]  # per element: (levels, 1 + maxM) uint32, or None
    tail: bytes = b""  # bytes after the last block (none in a stock file)

    @classmethod
    def parse(cls, data: bytes) -> Index:
        header = dict(zip(FIELDS, HEADER.unpack_from(data), strict=True))
        n, size = header["cur_element_count"], header["size_data_per_element"]
        rows = np.frombuffer(data, np.uint8, n * size, HEADER.size).reshape(n, size).copy()
        pos, blocks = HEADER.size + n * size, []
        for _ in range(n):
            (length,) = struct.unpack_from("<I", data, pos)
            pos += 4
            block = np.frombuffer(data, "<u4", length // 4, pos).copy() if length else None
            blocks.append(None if block is None else block.reshape(-1, 1 + header["maxM"]))
            pos += length
        return cls(header, rows, blocks, data[pos:])

    def to_bytes(self) -> bytes:
        out = [HEADER.pack(*(self.header[f] for f in FIELDS)), self.rows.tobytes()]
        for block in self.blocks:
            raw = b"" if block is None else block.astype("<u4").tobytes()
            out += [struct.pack("<I", len(raw)), raw]
        return b"".join(out) + self.tail

    def copy(self) -> Index:
        blocks = [None if b is None else b.copy() for b in self.blocks]
        return Index(dict(self.header), self.rows.copy(), blocks, self.tail)

    def levels(self) -> np.ndarray:
        return np.array([0 if b is None else len(b) for b in self.blocks])

    def upper_offset(self) -> int:
        """Where the upper-level area (after level 0) starts in the file."""
        h = self.header
        return HEADER.size + h["cur_element_count"] * h["size_data_per_element"]

    def set_link0(self, element: int, slot: int, target: int) -> None:
        self.rows[element, 4 + 4 * slot : 8 + 4 * slot] = np.frombuffer(
            struct.pack("<I", target), np.uint8
        )

    def set_flags(self, element: int, flags: int) -> None:
        self.rows[element, 2] = flags

    def set_link0_count(self, element: int, count: int) -> None:
        self.rows[element, 0:2] = np.frombuffer(struct.pack("<H", count), np.uint8)

    def link0_count(self, element: int) -> int:
        return int(self.rows[element, 0:2].view("<u2")[0])

    def set_vector(self, element: int, vector: np.ndarray) -> None:
        start = 4 + 4 * self.header["maxM0"]
        self.rows[element, start : start + 4 * DIM] = np.frombuffer(
            np.asarray(vector, "<f4").tobytes(), np.uint8
        )

    def set_label(self, element: int, label: int) -> None:
        start = self.header["label_offset"]
        self.rows[element, start : start + 8] = np.frombuffer(struct.pack("<Q", label), np.uint8)


def npy_bytes(array: np.ndarray | None = None, *, descr: str = "", shape: tuple = (), data=b""):
    """A ``.npy`` file: of ``array``, or a crafted header (``descr``, ``shape``) + ``data``."""
    f = io.BytesIO()
    if array is not None:
        np.lib.format.write_array(f, array, allow_pickle=array.dtype.hasobject)
        return f.getvalue()
    header = {"descr": descr, "fortran_order": False, "shape": shape}
    np.lib.format.write_array_header_1_0(f, header)
    return f.getvalue() + data


def npz_bytes(members: dict[str, bytes]) -> bytes:
    """A zip of ``{name: bytes}`` members, stored (as numpy.savez writes them)."""
    f = io.BytesIO()
    with zipfile.ZipFile(f, "w") as z:
        for name, data in members.items():
            z.writestr(zipfile.ZipInfo(name, (1980, 1, 1, 0, 0, 0)), data)
    return f.getvalue()


def deflated_bomb(meta: bytes, key: str, nbytes: int) -> bytes:
    """``meta`` with array ``key`` replaced by ``nbytes`` of zeros (int64), deflated: a zip
    bomb of about nbytes / 1000 bytes, made in constant memory."""
    f = io.BytesIO()
    with zipfile.ZipFile(f, "w") as out, zipfile.ZipFile(io.BytesIO(meta)) as src:
        for info in src.infolist():
            if info.filename != f"{key}.npy":
                out.writestr(info, src.read(info))
                continue
            bomb = zipfile.ZipInfo(info.filename, (1980, 1, 1, 0, 0, 0))
            bomb.compress_type = zipfile.ZIP_DEFLATED
            with out.open(bomb, "w", force_zip64=True) as member:
                member.write(npy_bytes(descr="<i8", shape=(nbytes // 8,)))
                chunk = bytes(1 << 20)
                for _ in range(nbytes // len(chunk)):
                    member.write(chunk)
    return f.getvalue()


def read_arrays(meta: bytes) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(meta), allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def sidecar(arrays: dict[str, np.ndarray]) -> bytes:
    return npz_bytes({f"{k}.npy": npy_bytes(v) for k, v in arrays.items()})


def manifest(index: bytes, meta: bytes, count: int = N, deleted: int = 0, **shard) -> bytes:
    """A format_version 1 manifest describing ``index`` and ``meta`` with their checksums."""
    files = {
        name: {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        for name, data in ((INDEX, index), (META, meta))
    }
    entry = {"index_file": INDEX, "meta_file": META, "count": count, "deleted": deleted}
    entry.update(files=files, **shard)
    d = {
        "format_version": 1,
        "space_id": "corpus-space",
        "dim": DIM,
        "metric": "cosine",
        "hnsw": {"M": M, "ef_construction": EF_CONSTRUCTION, "ef_search": 20},
        "gallery_models": [{"name": "corpus", "fingerprint": "0" * 16, "head_fingerprint": ""}],
        "heads": {},
        "uncertainty_quantiles": {"0.5": 0.25, "0.9": 0.45},
        "shards": [entry],
        "rejected": [],
        "skipped": 0,
        "created": "2026-01-01T00:00:00Z",
        "tool_version": "corpus",
        "extra": {},
    }
    return (json.dumps(d, sort_keys=True) + "\n").encode()


def make_base(folder: Path) -> tuple[bytes, bytes]:
    """Write the stock gallery into ``folder``; ``(index bytes, sidecar bytes)``."""
    rng = np.random.default_rng(SEED)
    vectors = rng.standard_normal((N, DIM)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    folder.mkdir(parents=True, exist_ok=True)
    write_shard(
        folder,
        0,
        vectors,
        np.arange(N) + 1000,
        [f"i{i:02d}" for i in range(N)],
        rng.uniform(0, 0.5, N),
        [{"n": i % 10} if i % 16 == 0 else None for i in range(N)],
        M,
        EF_CONSTRUCTION,
        seed=SEED,
    )
    index, meta = (folder / INDEX).read_bytes(), (folder / META).read_bytes()
    (folder / "manifest.json").write_bytes(manifest(index, meta))
    return index, meta


def crafted(index: bytes, meta: bytes) -> tuple[dict, dict]:
    """``(cases, accepted)``: ``{name: (file named by the refusal, what, {file: bytes})}``."""
    base = Index.parse(index)
    levels = base.levels()
    maxlevel = base.header["maxlevel"]
    at1 = [int(i) for i in np.flatnonzero(levels >= 1)]
    only1 = [int(i) for i in np.flatnonzero(levels == 1)]
    at2 = [int(i) for i in np.flatnonzero(levels >= 2)]
    ground = [int(i) for i in np.flatnonzero(levels == 0)]
    assert maxlevel >= 2 and only1 and at2 and ground, "the stock index needs levels 0, 1 and 2"
    arrays = read_arrays(meta)
    cases: dict[str, tuple[str, str, dict[str, bytes]]] = {}

    def index_case(name: str, what: str, edit, *, count: int = N, deleted=None, named=INDEX):
        ix = base.copy()
        data = edit(ix)
        data = ix.to_bytes() if data is None else data
        m = meta
        if deleted is not None:  # keep the sidecar and manifest in step with the index
            a = dict(arrays)
            a["deleted"] = np.zeros(N, bool)
            a["deleted"][deleted] = True
            m = sidecar(a)
        files = {INDEX: data, META: m}
        files["manifest.json"] = manifest(data, m, count, 0 if deleted is None else 1)
        cases[name] = (named, what, files)

    def link_at(ix: Index, element: int, level: int, slot: int, target: int) -> None:
        block = ix.blocks[element]
        block[level - 1, 0] = max(int(block[level - 1, 0]), slot + 1)
        block[level - 1, 1 + slot] = target

    # the probe's crash: upper-level links to elements that do not have that level
    def entry_to_ground(ix: Index) -> None:
        for slot in range(M):
            link_at(ix, base.header["enterpoint_node"], maxlevel, slot, ground[slot])

    index_case(
        "upper_link_to_level0_element",
        "the entry point's top-level links point at elements with no upper levels (hnswlib "
        "follows their NULL link lists)",
        entry_to_ground,
    )
    index_case(
        "upper_link_level1_to_level0_element",
        "one level-1 link points at an element with no upper levels",
        lambda ix: link_at(ix, at1[0], 1, 0, ground[0]),
    )
    index_case(
        "upper_link_level2_to_level1_element",
        "a level-2 link points at an element whose top level is 1",
        lambda ix: link_at(ix, at2[0], 2, 0, only1[0]),
    )

    def all_to_ground(ix: Index) -> None:
        for block in ix.blocks:
            if block is not None:
                block[:, 1:] = ground[0]

    index_case(
        "upper_links_all_to_level0",
        "every upper-level link of every element points at a level-0 element",
        all_to_ground,
    )
    index_case(
        "upper_link_past_n",
        "a level-1 link points past the last element",
        lambda ix: link_at(ix, at1[0], 1, 0, N + 5),
    )
    index_case(
        "upper_count_over_maxM",
        "a level-1 link count of maxM + 1",
        lambda ix: ix.blocks[at1[0]].__setitem__((0, 0), M + 1),
    )
    index_case(
        "upper_count_high_bits",
        "a level-1 link count word with bits above the u16 count set",
        lambda ix: ix.blocks[at1[0]].__setitem__((0, 0), int(ix.blocks[at1[0]][0, 0]) | 1 << 16),
    )

    def block_size(ix: Index, element: int, size: int) -> bytes:
        data = bytearray(ix.to_bytes())
        pos = ix.upper_offset()
        for i in range(element):
            pos += 4 + (0 if ix.blocks[i] is None else ix.blocks[i].nbytes)
        struct.pack_into("<I", data, pos, size)
        return bytes(data)

    index_case(
        "upper_block_not_whole_levels",
        "an upper-level block size that is not a whole number of levels",
        lambda ix: block_size(ix, at1[0], ix.blocks[at1[0]].nbytes + 4),
    )
    index_case(
        "upper_block_huge",
        "an upper-level block size of 4 GiB - 4",
        lambda ix: block_size(ix, at1[0], 0xFFFFFFFC),
    )

    def add_levels(ix: Index) -> None:
        ix.blocks[ground[0]] = np.zeros((maxlevel + 1, 1 + M), np.uint32)

    index_case(
        "upper_levels_above_maxlevel",
        "an element with maxlevel + 1 levels",
        add_levels,
    )
    index_case(
        "entry_point_at_level0",
        "the entry point is an element without upper levels",
        lambda ix: ix.header.update(enterpoint_node=ground[0]),
    )
    index_case(
        "entry_point_past_n",
        "the entry point is past the last element",
        lambda ix: ix.header.update(enterpoint_node=N),
    )
    index_case(
        "maxlevel_above_levels",
        "maxlevel is one above every stored level",
        lambda ix: ix.header.update(maxlevel=maxlevel + 1),
    )
    index_case(
        "maxlevel_below_levels",
        "maxlevel is one below the entry point's level",
        lambda ix: ix.header.update(maxlevel=maxlevel - 1),
    )
    index_case(
        "maxlevel_negative",
        "maxlevel -5",
        lambda ix: ix.header.update(maxlevel=-5),
    )
    index_case(
        "level0_count_over_maxM0",
        "a level-0 link count of maxM0 + 1",
        lambda ix: ix.set_link0_count(3, 2 * M + 1),
    )
    index_case(
        "level0_count_0xffff",
        "a level-0 link count of 65535",
        lambda ix: ix.set_link0_count(3, 0xFFFF),
    )
    index_case(
        "level0_link_past_n",
        "a level-0 link points past the last element",
        lambda ix: ix.set_link0(3, 0, N),
    )

    def deleted_link(ix: Index) -> None:
        ix.rows[5, 2] = 1
        ix.set_link0(5, 0, 0x7FFFFFFF)

    index_case(
        "level0_link_past_n_of_deleted",
        "a deleted element (flag, sidecar and manifest agree) whose level-0 link points past n",
        deleted_link,
        deleted=5,
    )
    index_case(
        "level0_flag_bits",
        "a level-0 flag byte with a bit hnswlib never sets",
        lambda ix: ix.set_flags(7, 0x02),
    )
    index_case(
        "deleted_flag_not_in_sidecar",
        "an element flagged deleted in the index only",
        lambda ix: ix.set_flags(7, 0x01),
        named=META,  # the sidecar is what disagrees with the index
    )
    index_case(
        "duplicate_label",
        "two elements with the same label",
        lambda ix: ix.set_label(1, 1000),
    )
    index_case(
        "nan_vector",
        "a stored vector with NaN",
        lambda ix: ix.set_vector(2, np.full(DIM, np.nan)),
    )
    index_case(
        "unnormalised_vector",
        "a stored vector of norm 2",
        lambda ix: ix.set_vector(2, np.full(DIM, 2 / np.sqrt(DIM))),
    )
    for field, value, what in (
        (
            "size_data_per_element",
            base.header["size_data_per_element"] + 4,
            "an element size one word longer",
        ),
        ("offset_data", 0, "offsetData 0"),
        ("label_offset", 4, "label_offset inside the links"),
        ("offset_level0", 8, "offsetLevel0 8"),
        ("maxM0", 2 * M + 2, "maxM0 2 M + 2"),
        ("maxM", 1 << 20, "maxM 2**20"),
        ("M", 1 << 40, "M 2**40"),
        ("max_elements", 1 << 40, "max_elements 2**40 (hnswlib would allocate for them)"),
        ("cur_element_count", N + 1, "one element more than the manifest's count"),
        ("mult", 0.0, "mult 0"),
        ("ef_construction", 1 << 62, "ef_construction 2**62"),
    ):
        index_case(f"header_{field}", what, lambda ix, f=field, v=value: ix.header.update({f: v}))
    huge = 2**31 - 1  # the most a manifest allows
    index_case(
        "count_huge_in_header_and_manifest",
        "2**31 - 1 elements claimed by the header and the manifest",
        lambda ix: ix.header.update(cur_element_count=huge, max_elements=huge),
        count=huge,
    )
    cut = base.upper_offset()
    index_case("truncated_header", "the first 50 bytes", lambda ix: ix.to_bytes()[:50])
    index_case("truncated_level0", "cut inside level 0", lambda ix: ix.to_bytes()[: cut - 500])
    index_case("truncated_upper", "the last 10 bytes cut", lambda ix: ix.to_bytes()[:-10])
    index_case(
        "truncated_after_level0", "no upper-level area at all", lambda ix: ix.to_bytes()[:cut]
    )
    index_case("trailing_bytes", "8 zero bytes appended", lambda ix: ix.to_bytes() + bytes(8))
    index_case("empty_file", "0 bytes", lambda ix: b"")

    def meta_case(name: str, what: str, data: bytes, count: int = N) -> None:
        cases[name] = (META, what, {META: data, "manifest.json": manifest(index, data, count)})

    def with_member(key: str, member: bytes) -> bytes:
        members = {f"{k}.npy": npy_bytes(v) for k, v in arrays.items()}
        members[f"{key}.npy"] = member
        return npz_bytes(members)

    meta_case(
        "sidecar_deflated_bomb",
        "labels.npy deflated: 8 KB that inflate to an 8 MiB int64 array (the probe's: 2 GB)",
        deflated_bomb(meta, "labels", 8 << 20),
    )
    meta_case(
        "sidecar_shape_lie",
        "ids.npy whose header claims 10**12 items",
        with_member("ids", npy_bytes(descr="<U8", shape=(10**12,), data=bytes(64))),
    )
    meta_case(
        "sidecar_huge_itemsize",
        "ids.npy of dtype <U1000000 (4 MB an item)",
        with_member("ids", npy_bytes(descr="<U1000000", shape=(N,), data=bytes(64))),
    )
    meta_case(
        "sidecar_wrong_dtype",
        "labels.npy of float64",
        with_member("labels", npy_bytes(arrays["labels"].astype(np.float64))),
    )
    meta_case(
        "sidecar_object_dtype",
        "payload.npy of dtype object (reading it would unpickle)",
        with_member("payload", npy_bytes(np.array([{"evil": 1}] * N, dtype=object))),
    )
    meta_case(
        "sidecar_structured_dtype",
        "uncertainty.npy of a structured dtype",
        with_member("uncertainty", npy_bytes(np.zeros(N, [("a", "<f4"), ("b", "<f4")]))),
    )
    meta_case(
        "sidecar_2d",
        "deleted.npy of shape (N, 2)",
        with_member("deleted", npy_bytes(np.zeros((N, 2), bool))),
    )
    meta_case(
        "sidecar_size_lie",
        "labels.npy with 8 bytes more than its header implies",
        with_member("labels", npy_bytes(arrays["labels"]) + bytes(8)),
    )
    meta_case(
        "sidecar_bad_header",
        "ids.npy with a header that is not a Python literal",
        with_member("ids", b"\x93NUMPY\x01\x00\x10\x00{'descr': (((( \n"),
    )
    short = {k: v[:-1] for k, v in arrays.items()}
    meta_case("sidecar_count_mismatch", f"{N - 1} items for a count of {N}", sidecar(short))
    meta_case(
        "sidecar_missing_array",
        "no uncertainty array",
        sidecar({k: v for k, v in arrays.items() if k != "uncertainty"}),
    )
    meta_case(
        "sidecar_unknown_array",
        "an extra array 'script'",
        sidecar({**arrays, "script": np.array(["rm -rf /"])}),
    )
    members = {f"{k}.npy": npy_bytes(v) for k, v in arrays.items()}
    duplicate = npz_bytes(members)
    with zipfile.ZipFile(buffer := io.BytesIO(duplicate), "a") as z:
        z.writestr("ids.npy", npy_bytes(np.array([f"x{i}" for i in range(N)])))
    meta_case("sidecar_duplicate_member", "two ids.npy members", buffer.getvalue())
    meta_case(
        "sidecar_payload_not_object",
        "a payload that is a JSON array",
        sidecar({**arrays, "payload": np.array(["[1]"] + [""] * (N - 1))}),
    )
    meta_case(
        "sidecar_payload_nan",
        "a payload with NaN",
        sidecar({**arrays, "payload": np.array(['{"a": NaN}'] + [""] * (N - 1))}),
    )
    meta_case(
        "sidecar_uncertainty_nan",
        "an uncertainty of NaN",
        sidecar(
            {
                **arrays,
                "uncertainty": np.where(np.arange(N) == 4, np.nan, arrays["uncertainty"]).astype(
                    np.float32
                ),
            }
        ),
    )
    meta_case(
        "sidecar_negative_label",
        "a label of -1",
        sidecar({**arrays, "labels": np.where(np.arange(N) == 4, -1, arrays["labels"])}),
    )
    meta_case("sidecar_not_a_zip", "not a zip at all", b"PK\x03\x04 not really")

    accepted: dict[str, tuple[str, str, dict[str, bytes]]] = {}

    def accept(name: str, what: str, ix: Index, m: bytes = meta, deleted: int = 0) -> None:
        data = ix.to_bytes()
        files = {INDEX: data, META: m, "manifest.json": manifest(data, m, N, deleted)}
        accepted[name] = ("", what, files)

    ix = base.copy()
    link_at(ix, at1[0], 1, 0, at1[0])
    accept("upper_self_link", "a level-1 link of an element to itself", ix)
    ix = base.copy()
    for e in range(N):  # stale slots past the count, as hnswlib's pruning leaves them
        for slot in range(ix.link0_count(e), 2 * M):
            ix.set_link0(e, slot, 0xFFFFFFFF)
    accept("level0_stale_slots", "every unused level-0 link slot holds 0xFFFFFFFF", ix)
    classes = np.array([f"class-{i % 3}" if i % 4 else "" for i in range(N)])
    accept(
        "with_classes",
        "the optional classes array",
        base.copy(),
        sidecar({**arrays, "classes": classes}),
    )
    ix = base.copy()
    ix.rows[9, 2] = 1
    deleted = dict(arrays)
    deleted["deleted"] = np.arange(N) == 9
    accept(
        "one_deleted", "element 9 deleted in index, sidecar and manifest", ix, sidecar(deleted), 1
    )
    return cases, accepted


def materialise(kind: str, name: str, dest: Path, root: Path = HERE) -> Path:
    """A complete gallery folder ``dest``: ``base/`` with ``<kind>/<name>/`` laid over it."""
    dest.mkdir(parents=True, exist_ok=True)
    for folder in (root / "base", root / kind / name):
        for file in folder.iterdir():
            shutil.copyfile(file, dest / file.name)
    return dest


def write_corpus(root: Path = HERE) -> None:
    base = root / "base"
    shutil.rmtree(base, ignore_errors=True)
    index, meta = make_base(base)
    cases, accepted = crafted(index, meta)
    listing = {}
    for kind, group in (("cases", cases), ("accepted", accepted)):
        shutil.rmtree(root / kind, ignore_errors=True)
        for name, (named, what, files) in group.items():
            folder = root / kind / name
            folder.mkdir(parents=True)
            for file, data in files.items():
                if file == "manifest.json" or data != (base / file).read_bytes():
                    (folder / file).write_bytes(data)
            listing.setdefault(kind, {})[name] = {"file": named, "what": what}
    (root / "cases.json").write_text(json.dumps(listing, indent=2, sort_keys=True) + "\n")


if __name__ == "__main__":
    write_corpus()
    size = sum(p.stat().st_size for p in HERE.rglob("*") if p.is_file())
    print(f"{len(json.loads((HERE / 'cases.json').read_text())['cases'])} cases, {size} bytes")
