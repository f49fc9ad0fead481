"""The native check: a C++ program built on the stock hnswlib headers (from the hnswlib sdist
on PyPI) returns the same ids as the Python SDK on 1,000 queries over a multi-shard gallery."""

from __future__ import annotations

import subprocess

import numpy as np
import pytest
from test_gallery_format import make_gallery, unit_vectors

from query_sdk import Gallery
from query_sdk import gallery_format as gf
from query_sdk.native import build as native

DIM, PER_SHARD, SHARDS, EF, K = 24, 1500, 3, 12, 10
DELETED = np.arange(10_000, 10_200)


@pytest.fixture(scope="module")
def program():
    if native.compiler() is None:
        pytest.skip("no C++ compiler (g++ or $CXX) on this machine: the native check needs one")
    return native.build()


@pytest.fixture(scope="module")
def gallery(tmp_path_factory):
    """Three shards of clustered unit vectors, a few items deleted, and a small ef_search so
    that the search is really approximate (upper levels, early stops, deleted nodes)."""
    folder = tmp_path_factory.mktemp("native-gallery")
    rng = np.random.default_rng(3)
    centres = unit_vectors(40, DIM, seed=11)
    shards, stored = [], {}
    for s in range(SHARDS):
        v = centres[rng.integers(0, 40, PER_SHARD)] + 0.3 * unit_vectors(PER_SHARD, DIM, seed=s)
        v = (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)
        labels = np.arange(PER_SHARD, dtype=np.int64) + s * 10_000
        stored.update(zip(labels.tolist(), v, strict=True))
        shards.append(
            gf.write_shard(
                folder,
                s,
                v,
                labels,
                [f"s{s}-{i}" for i in labels],
                rng.random(PER_SHARD),
                None,
                M=8,
                ef_construction=40,
            )
        )
    template, _ = make_gallery(tmp_path_factory.mktemp("template"), 1)
    manifest = gf.Manifest.from_dict(
        {
            **template.to_dict(),
            "dim": DIM,
            "hnsw": {"M": 8, "ef_construction": 40, "ef_search": EF},
            "shards": [sh.to_dict() for sh in shards],
        }
    )
    manifest.shards[1] = gf.update_shard_deletions(
        folder, manifest.shards[1], set(DELETED.tolist()), DIM
    )
    gf.write_manifest(folder, manifest)
    for label in DELETED:
        del stored[label]
    return folder, stored


def run_native(program, g: Gallery, queries: np.ndarray, tmp_path) -> np.ndarray:
    path = tmp_path / "queries.f32"
    np.ascontiguousarray(queries, dtype="<f4").tofile(path)
    files = [str(g.folder / g.manifest.shards[i].index_file) for i in g.shards]
    out = subprocess.run(
        [
            str(program),
            str(g.manifest.dim),
            str(g.manifest.hnsw["ef_search"]),
            str(K),
            str(path),
            *files,
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    return np.array([[int(x) for x in line.split()] for line in out.stdout.splitlines()])


def test_native_and_python_return_identical_ids(program, gallery, tmp_path):
    folder, stored = gallery
    g = Gallery.open(folder)
    assert g.count == SHARDS * PER_SHARD - 200
    rng = np.random.default_rng(5)
    queries = unit_vectors(1000, DIM, seed=99) + rng.normal(size=(1000, DIM)).astype(np.float32)
    queries = (queries / np.linalg.norm(queries, axis=1, keepdims=True)).astype(np.float32)
    python, _ = g.search_labels(queries, k=K)
    cpp = run_native(program, g, queries, tmp_path)
    assert cpp.shape == (1000, K)
    assert (cpp == python).all(axis=1).sum() == 1000
    assert not np.isin(cpp, DELETED).any()  # deleted items stay out
    # the search is approximate at this ef: it differs from exact search somewhere
    labels = np.array(list(stored))
    exact = labels[np.argsort(-(queries @ np.stack(list(stored.values())).T), axis=1)[:, :K]]
    assert not np.array_equal(np.sort(exact, axis=1), np.sort(python, axis=1))


def test_native_subset_of_shards(program, gallery, tmp_path):
    g = Gallery.open(gallery[0], shards=[0, 2])
    queries = unit_vectors(50, DIM, seed=4)
    python, _ = g.search_labels(queries, k=K)
    assert np.array_equal(run_native(program, g, queries, tmp_path), python)
    assert ((python // 10_000) != 1).all()
