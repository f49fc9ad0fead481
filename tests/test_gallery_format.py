"""The on-disk gallery format: round trip with real hnswlib, and refusal of damaged galleries."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from query_sdk import gallery_format as gf
from query_sdk.gallery_format import GalleryError, Manifest

DIM = 16
M = 8
EF_C = 40
N = 60  # items per shard


def unit_vectors(n: int, dim: int = DIM, seed: int = 0) -> np.ndarray:
    v = np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def make_gallery(folder: Path, n_shards: int = 2) -> tuple[Manifest, list[dict]]:
    """Write ``n_shards`` shards of N items and the manifest; return it and what went in."""
    shards, inputs = [], []
    for s in range(n_shards):
        vectors = unit_vectors(N, seed=s)
        labels = np.arange(s * 1000, s * 1000 + N, dtype=np.int64)
        ids = [f"img-{s}-{i}" for i in range(N)]
        uncertainty = np.linspace(0.0, 0.5, N, dtype=np.float32) + s
        payload = [
            {"path": f"/x/{s}/{i}.png", "class": i % 10} if i % 3 else None for i in range(N)
        ]
        shards.append(
            gf.write_shard(
                folder, s, vectors, labels, ids, uncertainty, payload, M=M, ef_construction=EF_C
            )
        )
        inputs.append(
            {
                "vectors": vectors,
                "labels": labels,
                "ids": ids,
                "unc": uncertainty,
                "payload": payload,
            }
        )
    manifest = Manifest(
        space_id="q-abc123",
        dim=DIM,
        metric=gf.METRIC,
        hnsw={"M": M, "ef_construction": EF_C, "ef_search": 50},
        gallery_models=[{"name": "g1", "fingerprint": "f1", "head_fingerprint": "h1"}],
        heads={"mode": "unified", "fingerprint": "hh"},
        uncertainty_quantiles={"0.5": 0.1, "0.9": 0.3, "0.95": 0.35, "0.99": 0.4},
        shards=shards,
        rejected=[{"id": "img-bad", "uncertainty": 0.9}],
        skipped=3,
        created="2024-05-01T12:00:00Z",
        tool_version="0.1.0",
        extra={"note": "test"},
    )
    gf.write_manifest(folder, manifest)
    return manifest, inputs


def edit_manifest(folder: Path, change) -> None:
    path = folder / gf.MANIFEST_FILE
    d = json.loads(path.read_text())
    change(d)
    path.write_text(json.dumps(d))


def refresh_checksums(folder: Path, shard_pos: int = 0) -> None:
    """Make the manifest agree with whatever the shard files now contain."""

    def change(d):
        for entry_name, entry in d["shards"][shard_pos]["files"].items():
            data = (folder / entry_name).read_bytes()
            entry["bytes"] = len(data)
            entry["sha256"] = hashlib.sha256(data).hexdigest()

    edit_manifest(folder, change)


@pytest.fixture()
def gallery(tmp_path):
    manifest, inputs = make_gallery(tmp_path)
    return tmp_path, manifest, inputs


def test_round_trip(gallery):
    folder, manifest, inputs = gallery
    assert sorted(p.name for p in folder.iterdir()) == [
        "manifest.json",
        "shard-00000.hnsw",
        "shard-00000.meta.npz",
        "shard-00001.hnsw",
        "shard-00001.meta.npz",
    ]
    read = gf.read_manifest(folder)
    assert read == manifest
    assert read.to_dict() == manifest.to_dict()
    assert Manifest.from_dict(manifest.to_dict()).to_dict() == manifest.to_dict()
    assert json.loads((folder / "manifest.json").read_text()) == manifest.to_dict()
    assert read.count == 2 * N
    assert gf.verify_gallery(folder) == manifest

    for shard, given in zip(read.shards, inputs, strict=True):
        assert (shard.count, shard.deleted) == (N, 0)
        index, meta = gf.load_shard(folder, shard, DIM, ef_search=50)
        found, dist = index.knn_query(given["vectors"], k=1)
        assert np.array_equal(found[:, 0].astype(np.int64), given["labels"])
        np.testing.assert_allclose(1.0 - dist[:, 0], 1.0, atol=1e-5)  # cosine with itself
        assert meta.ids == given["ids"]
        assert meta.labels.dtype == np.int64 and np.array_equal(meta.labels, given["labels"])
        assert meta.uncertainty.dtype == np.float32
        assert np.array_equal(meta.uncertainty, given["unc"])
        assert meta.payload == given["payload"]
        assert meta.payload[0] is None and meta.payload[1]["class"] == 1
        assert not meta.deleted.any()


def test_payload_and_ids_survive_unicode(tmp_path):
    v = unit_vectors(3)
    ids = ["ä/ö", "日本", "x y"]
    payload = [{"caption": "café ☕", "n": [1, 2.5, None]}, None, {}]
    shard = gf.write_shard(tmp_path, 7, v, np.array([5, 6, 7]), ids, np.zeros(3), payload, M, EF_C)
    assert shard.index_file == "shard-00007.hnsw" and shard.meta_file == "shard-00007.meta.npz"
    meta = gf.read_meta(tmp_path / shard.meta_file)
    assert meta.ids == ids and meta.payload == payload


def test_checksums_match_files(gallery):
    folder, manifest, _ = gallery
    for shard in manifest.shards:
        for name in (shard.index_file, shard.meta_file):
            data = (folder / name).read_bytes()
            assert shard.files[name] == {
                "bytes": len(data),
                "sha256": hashlib.sha256(data).hexdigest(),
            }
            assert gf.sha256_file(folder / name) == hashlib.sha256(data).hexdigest()


def test_header_layout(gallery):
    folder, manifest, _ = gallery
    h = gf.read_index_header((folder / manifest.shards[0].index_file).read_bytes())
    assert h.SIZE == 96
    assert (h.offset_level0, h.max_elements, h.cur_element_count) == (0, N, N)
    assert (h.M, h.maxM, h.maxM0, h.ef_construction) == (M, M, 2 * M, EF_C)
    assert h.offset_data == 2 * M * 4 + 4
    assert h.label_offset == h.offset_data + DIM * 4
    assert h.size_data_per_element == h.label_offset + 8
    assert h.implied_dim == DIM
    assert h.mult == pytest.approx(1 / np.log(M))
    assert 0 <= h.enterpoint_node < N and h.maxlevel >= 0


def test_no_pickle_in_meta(gallery):
    folder, manifest, _ = gallery
    with np.load(folder / manifest.shards[0].meta_file, allow_pickle=False) as z:
        assert sorted(z.files) == sorted(["ids", "labels", "uncertainty", "payload", "deleted"])
        assert all(z[k].dtype != object for k in z.files)
        assert z["ids"].dtype.kind == "U" and z["payload"].dtype.kind == "U"


# --------------------------------------------------------------------------- refusals


def test_truncated_index_refused(gallery):
    folder, manifest, _ = gallery
    path = folder / manifest.shards[0].index_file
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    with pytest.raises(GalleryError, match=r"shard-00000\.hnsw: size"):
        gf.verify_gallery(folder)
    # even when the manifest is made to agree, the structure check refuses it before hnswlib
    refresh_checksums(folder)
    with pytest.raises(GalleryError, match=r"shard-00000\.hnsw: .*(truncated|bad upper-level)"):
        gf.verify_gallery(folder)
    with pytest.raises(GalleryError):
        gf.load_shard(folder, gf.read_manifest(folder).shards[0], DIM, 50)
    path.write_bytes(data[:50])
    refresh_checksums(folder)
    with pytest.raises(GalleryError, match="shorter than the 96-byte"):
        gf.verify_gallery(folder)


def test_bit_flip_refused(gallery):
    folder, manifest, _ = gallery
    path = folder / manifest.shards[1].index_file
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))
    with pytest.raises(
        GalleryError, match=r"shard-00001\.hnsw: sha256 [0-9a-f]{64}, manifest says"
    ):
        gf.verify_gallery(folder)
    gf.verify_gallery(folder, shards=[0])  # the other shard is still fine
    with pytest.raises(GalleryError, match="sha256"):
        gf.load_shard(folder, manifest.shards[1], DIM, 50)


def test_missing_shard_refused(gallery):
    folder, manifest, _ = gallery
    (folder / manifest.shards[1].meta_file).unlink()
    with pytest.raises(
        GalleryError, match=r"shard-00001\.meta\.npz: listed in the manifest but missing"
    ):
        gf.verify_gallery(folder)


def test_wrong_dim_refused_by_header(gallery):
    folder, _, _ = gallery
    edit_manifest(folder, lambda d: d.update(dim=DIM * 2))
    manifest = gf.read_manifest(folder)  # checksums still match the files
    with pytest.raises(
        GalleryError, match=f"wrong dims: manifest dim is {DIM * 2}, the index implies dim {DIM}"
    ):
        gf.verify_gallery(folder)
    with pytest.raises(GalleryError, match="wrong dims"):
        gf.load_shard(folder, manifest.shards[0], manifest.dim, 50)


def test_wrong_M_refused_by_header(gallery):
    folder, _, _ = gallery
    edit_manifest(folder, lambda d: d["hnsw"].update(M=M + 4))
    with pytest.raises(GalleryError, match=f"header M is {M}, expected {M + 4}"):
        gf.verify_gallery(folder)


def test_count_mismatch_refused(gallery):
    folder, _, _ = gallery
    edit_manifest(folder, lambda d: d["shards"][0].update(count=N + 1))
    with pytest.raises(GalleryError, match=f"cur_element_count is {N}, expected {N + 1}"):
        gf.verify_gallery(folder)


@pytest.mark.parametrize(
    "bad_name", ["../escape.hnsw", "/etc/passwd", "a/b.hnsw", "a\\b.hnsw", ".."]
)
def test_unsafe_file_names_refused(gallery, bad_name):
    folder, _, _ = gallery

    def change(d):
        shard = d["shards"][0]
        shard["files"][bad_name] = shard["files"].pop(shard["index_file"])
        shard["index_file"] = bad_name

    edit_manifest(folder, change)
    with pytest.raises(GalleryError, match=r"shards\[0\]\.index_file' must be a plain file name"):
        gf.read_manifest(folder)
    with pytest.raises(GalleryError, match="manifest entry"):
        gf.safe_join(folder, bad_name)


def test_symlink_outside_refused(gallery, tmp_path_factory):
    folder, manifest, _ = gallery
    outside = tmp_path_factory.mktemp("outside") / "evil.hnsw"
    outside.write_bytes((folder / manifest.shards[0].index_file).read_bytes())
    (folder / manifest.shards[0].index_file).unlink()
    os.symlink(outside, folder / manifest.shards[0].index_file)
    with pytest.raises(GalleryError, match="outside the gallery folder"):
        gf.verify_gallery(folder)
    assert gf.safe_join(folder, "shard-00001.hnsw") == folder / "shard-00001.hnsw"


def test_missing_manifest(tmp_path):
    with pytest.raises(GalleryError, match="manifest.json: missing"):
        gf.read_manifest(tmp_path)
    with pytest.raises(GalleryError, match="manifest.json: missing"):
        gf.verify_gallery(tmp_path)


def test_non_json_manifest(gallery):
    folder, _, _ = gallery
    (folder / "manifest.json").write_text("{not json")
    with pytest.raises(GalleryError, match="not valid JSON"):
        gf.read_manifest(folder)
    (folder / "manifest.json").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(GalleryError, match="not valid JSON"):
        gf.read_manifest(folder)
    (folder / "manifest.json").write_text("[1, 2]")
    with pytest.raises(GalleryError, match="top level must be a JSON object"):
        gf.read_manifest(folder)


def test_unknown_format_version(gallery):
    folder, _, _ = gallery
    edit_manifest(folder, lambda d: d.update(format_version=3))
    with pytest.raises(
        GalleryError, match="unknown format_version 3; this reader supports format_version 1, 2"
    ):
        gf.read_manifest(folder)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d.pop("space_id"), "missing key 'space_id'"),
        (lambda d: d.update(dim="16"), r"key 'dim' must be an int in \[1, 65536\], got '16'"),
        (lambda d: d.update(metric="l2"), "key 'metric' must be 'cosine', got 'l2'"),
        (lambda d: d["hnsw"].pop("ef_search"), "missing key 'hnsw.ef_search'"),
        (lambda d: d["shards"][0].pop("count"), r"missing key 'shards\[0\]\.count'"),
        (
            lambda d: d["shards"][0]["files"]["shard-00000.hnsw"].update(sha256="xyz"),
            "64 lowercase hex",
        ),
        (lambda d: d.update(surprise=1), r"unknown key\(s\) \['surprise'\]"),
        (lambda d: d.update(created="yesterday"), "'created' must be an ISO 8601 UTC time"),
        (lambda d: d.update(created="2024-05-01T12:00:00+02:00"), "must be an ISO 8601 UTC"),
        (lambda d: d["shards"].append(d["shards"][0]), "listed more than once"),
    ],
)
def test_bad_manifest_keys(gallery, change, message):
    folder, _, _ = gallery
    edit_manifest(folder, change)
    with pytest.raises(GalleryError, match=message) as err:
        gf.read_manifest(folder)
    assert "manifest.json" in str(err.value)


def test_object_array_meta_refused(gallery):
    folder, manifest, _ = gallery
    shard = manifest.shards[0]
    meta_path = folder / shard.meta_file
    with np.load(meta_path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["payload"] = np.array([{"evil": 1}] * N, dtype=object)
    with open(meta_path, "wb") as f:
        np.savez(f, **arrays)
    refresh_checksums(folder)
    with pytest.raises(GalleryError, match=r"shard-00000\.meta\.npz: array 'payload' refused"):
        gf.read_meta(meta_path)
    with pytest.raises(GalleryError, match="refused"):
        gf.verify_gallery(folder)


def test_meta_inconsistent_with_index_refused(gallery):
    folder, manifest, _ = gallery
    meta_path = folder / manifest.shards[0].meta_file
    with np.load(meta_path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["labels"] = arrays["labels"] + 1
    with open(meta_path, "wb") as f:
        np.savez(f, **arrays)
    refresh_checksums(folder)
    with pytest.raises(GalleryError, match="labels differ from those in shard-00000.hnsw"):
        gf.verify_gallery(folder)
    (folder / manifest.shards[0].meta_file).write_bytes(b"not a zip")
    refresh_checksums(folder)
    with pytest.raises(GalleryError, match="not a readable .npz"):
        gf.verify_gallery(folder)


def test_duplicate_labels_across_shards_refused(tmp_path):
    v = unit_vectors(5)
    a = gf.write_shard(tmp_path, 0, v, np.arange(5), list("abcde"), np.zeros(5), None, M, EF_C)
    b = gf.write_shard(tmp_path, 1, v, np.arange(4, 9), list("fghij"), np.zeros(5), None, M, EF_C)
    manifest = Manifest.from_dict(
        {
            **make_gallery(tmp_path / "other", 1)[0].to_dict(),
            "shards": [a.to_dict(), b.to_dict()],
        }
    )
    with pytest.raises(GalleryError, match=r"label 4 also used in shard-00000\.meta\.npz"):
        gf.verify_gallery(tmp_path, manifest)


# --------------------------------------------------------------------------- deletions


def test_update_shard_deletions(gallery):
    folder, manifest, inputs = gallery
    shard = manifest.shards[0]
    gone = {int(inputs[0]["labels"][3]), int(inputs[0]["labels"][17])}
    new = gf.update_shard_deletions(folder, shard, gone | {999_999}, DIM)  # 999999: not here
    assert (new.count, new.deleted) == (N, 2)
    for name in (new.index_file, new.meta_file):
        data = (folder / name).read_bytes()
        assert new.files[name] == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert new.files[new.index_file]["sha256"] != shard.files[shard.index_file]["sha256"]

    with pytest.raises(GalleryError, match="sha256"):  # manifest not yet updated
        gf.verify_gallery(folder)
    manifest.shards[0] = new
    gf.write_manifest(folder, manifest)
    assert gf.verify_gallery(folder).count == 2 * N - 2

    index, meta = gf.load_shard(folder, new, DIM, ef_search=N)
    assert sorted(meta.labels[meta.deleted].tolist()) == sorted(gone)
    found, _ = index.knn_query(inputs[0]["vectors"], k=10)
    assert not set(found.ravel().tolist()) & gone
    live = ~np.isin(inputs[0]["labels"], list(gone))
    assert np.array_equal(found[live, 0].astype(np.int64), inputs[0]["labels"][live])

    again = gf.update_shard_deletions(folder, new, np.array(sorted(gone)), DIM)  # idempotent
    assert again == new


# --------------------------------------------------------------------------- input validation


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda a: a["vectors"].__setitem__((2, 0), a["vectors"][2, 0] + 0.5), "row 2 has norm"),
        (lambda a: a["vectors"].__setitem__((4, 1), np.nan), r"NaN/inf \(row 4\)"),
        (lambda a: a["ids"].__setitem__(3, a["ids"][0]), "'id-0' appears more than once"),
        (lambda a: a.update(vectors=a["vectors"].astype(np.float64)), "2-D float32"),
        (lambda a: a.update(labels=np.zeros(6, np.int64)), "labels must be unique"),
        (lambda a: a.update(labels=np.arange(5)), "length 6"),
        (lambda a: a.update(ids=a["ids"][:5]), "list of 6 strings"),
        (lambda a: a.update(payload=[{"x": object()}] + [None] * 5), r"payload\[0\] is not JSON"),
        (lambda a: a.update(uncertainty=np.full(6, np.inf)), "finite"),
    ],
)
def test_write_shard_validation(tmp_path, mutate, message):
    args = {
        "vectors": unit_vectors(6),
        "labels": np.arange(6),
        "ids": [f"id-{i}" for i in range(6)],
        "uncertainty": np.zeros(6),
        "payload": None,
    }
    mutate(args)
    with pytest.raises(ValueError, match=message):
        gf.write_shard(tmp_path, 0, M=M, ef_construction=EF_C, **args)
    assert list(tmp_path.iterdir()) == []  # nothing written, not even temp files


def test_no_torch_import():
    code = "import sys, query_sdk.gallery_format; print('torch' in sys.modules)"
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=root,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    assert out.stdout.strip() == "False"
