"""cmce-build-gallery on scikit-learn's digits, with the models of the session's digits run."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from gallery_builder.cli.build import main
from gallery_builder.data.datasets import DataError, load_digits
from gallery_builder.data.sources import open_source
from gallery_builder.gallery import build as gallery_module
from gallery_builder.gallery import encode as encode_module
from gallery_builder.gallery.build import BuildSettings, Ensemble, add, build, remove, reproject
from gallery_builder.gallery.raw_store import list_parts, part_path, read_part
from gallery_builder.models.checkpoint import CheckpointError
from gallery_builder.training.heads import QUERY_MEMBER, HeadSettings, load_heads, save_heads
from query_sdk import errors
from query_sdk.fileio import staging_path
from query_sdk.gallery_format import (
    GalleryError,
    load_shard,
    read_manifest,
    verify_gallery,
)
from query_sdk.shards import search_shards

GALLERY_MODELS = ("resnet", "widecnn", "vit", "query")  # "query": the query model's own member


def models_and_heads(run_dir, mode="unified"):
    return [run_dir / "models" / n for n in GALLERY_MODELS], run_dir / "heads" / mode


def shard_contents(gallery, ef=None):
    """All live (label, id, vector, uncertainty) of a gallery, sorted by id."""
    manifest = read_manifest(gallery)
    rows = []
    for sh in manifest.shards:
        index, meta = load_shard(gallery, sh, manifest.dim, ef or manifest.hnsw["ef_search"])
        for lab, item_id, unc, dead in zip(
            meta.labels, meta.ids, meta.uncertainty, meta.deleted, strict=True
        ):
            if not dead:
                rows.append((item_id, int(lab), np.asarray(index.get_items([lab])[0]), float(unc)))
    return sorted(rows)


def search(gallery, queries, k=10, ef=None):
    manifest = read_manifest(gallery)
    loaded = [
        load_shard(gallery, sh, manifest.dim, ef or manifest.hnsw["ef_search"])
        for sh in manifest.shards
    ]
    labels, scores = search_shards([(ix, int((~m.deleted).sum())) for ix, m in loaded], queries, k)
    id_of = {int(lab): i for _, m in loaded for lab, i in zip(m.labels, m.ids, strict=True)}
    return [[id_of[int(lab)] for lab in row if lab >= 0] for row in labels], scores


@pytest.fixture(scope="module")
def built(digits_run, tmp_path_factory):
    _, _, run_dir = digits_run
    models, heads = models_and_heads(run_dir)
    out = tmp_path_factory.mktemp("g") / "gallery"
    summary = build(models, heads, "digits", out, BuildSettings(shard_size=500))
    return run_dir, out, summary


def test_vectors_equal_the_fused_embedding(built):
    run_dir, out, summary = built
    models, heads = models_and_heads(run_dir)
    assert summary.items == 1797 and summary.shards == 4 and summary.skipped == 0
    ensemble = Ensemble(models, heads)
    src = open_source("digits")
    part = ensemble.encode_raw(src, src.items)
    raw = {n: torch.from_numpy(part.raw[n].astype(np.float32)) for n in ensemble.names}
    vectors, unc = ensemble.heads.encode_gallery(raw)
    rows = shard_contents(out)
    assert [r[0] for r in rows] == sorted(part.ids)
    by_id = {i: k for k, i in enumerate(part.ids)}
    stored = np.stack([r[2] for r in rows])
    expected = vectors.numpy()[[by_id[r[0]] for r in rows]]
    cosine = (stored * expected).sum(1) / np.linalg.norm(stored, axis=1)
    assert cosine.min() >= 0.9999
    assert np.allclose([r[3] for r in rows], unc.numpy()[[by_id[r[0]] for r in rows]], atol=1e-3)


def test_a_member_of_weight_zero_needs_no_model(built, tmp_path):
    """An experiment may fit the query model's own member to weight 0: the gallery is then
    built without the query model, and its vectors are the weighted members' fusion."""
    run_dir, _, _ = built
    models, heads_dir = models_and_heads(run_dir)
    heads, config = load_heads(heads_dir)
    heads.set_weights({**dict.fromkeys(heads.names, 1.0), QUERY_MEMBER: 0.0})
    fps = {g["name"]: g["fingerprint"] for g in config["gallery_models"]}
    save_heads(tmp_path / "heads", heads, config["query_fingerprint"], fps, HeadSettings(), {})
    gallery_models = [m for m in models if m.name != "query"]
    with pytest.raises(CheckpointError, match=r"missing \['vit'\]"):
        Ensemble(gallery_models[:2], tmp_path / "heads")
    ensemble = Ensemble(gallery_models, tmp_path / "heads")
    assert ensemble.names == list(heads.names)
    out = tmp_path / "gallery"
    build(gallery_models, tmp_path / "heads", "digits", out, BuildSettings(shard_size=1000))
    src = open_source("digits")
    part = ensemble.encode_raw(src, src.items)
    raw = {n: torch.from_numpy(part.raw[n].astype(np.float32)) for n in heads.names}
    vectors, _ = heads.encode_gallery(raw, heads.names, dict.fromkeys(heads.names, 1.0))
    rows = shard_contents(out)
    by_id = {i: k for k, i in enumerate(part.ids)}
    stored = np.stack([r[2] for r in rows])
    expected = vectors.numpy()[[by_id[r[0]] for r in rows]]
    assert ((stored * expected).sum(1) / np.linalg.norm(stored, axis=1)).min() >= 0.9999


def test_manifest_checksums_and_recall(built):
    _, out, summary = built
    manifest = verify_gallery(out)
    for sh in manifest.shards:
        for name, entry in sh.files.items():
            data = (out / name).read_bytes()
            assert hashlib.sha256(data).hexdigest() == entry["sha256"]
            assert len(data) == entry["bytes"]
    assert manifest.space_id.startswith("unified-") and manifest.metric == "cosine"
    assert [g["name"] for g in manifest.gallery_models] == list(GALLERY_MODELS)
    q = manifest.uncertainty_quantiles
    assert 0 <= q["0.5"] <= q["0.9"] <= q["0.99"] <= 2
    # recall@10 at the manifest's ef_search, against exact search, measured here again
    rows = shard_contents(out)
    vectors = np.stack([r[2] for r in rows])
    ids = [r[0] for r in rows]
    rng = np.random.default_rng(1)
    queries = vectors[rng.choice(len(vectors), 200, replace=False)]
    queries = queries + 0.05 * rng.standard_normal(queries.shape).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    exact = [[ids[j] for j in row] for row in np.argsort(-(queries @ vectors.T), axis=1)[:, :10]]
    found, _ = search(out, queries)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found, exact, strict=True)])
    assert recall >= 0.99
    assert summary.recall_at_10 >= 0.99
    assert summary.bytes_per_item > 4 * manifest.dim  # at least the float32 vector itself


def test_reproject_equals_a_full_build(built, tmp_path):
    run_dir, out, _ = built
    models, to_query = models_and_heads(run_dir, "to-query")
    fresh = tmp_path / "fresh"
    build(models, to_query, "digits", fresh, BuildSettings(shard_size=500))
    copy = tmp_path / "copy"
    import shutil

    shutil.copytree(out, copy)
    summary = reproject(copy, to_query)
    assert read_manifest(copy).space_id == read_manifest(fresh).space_id
    assert read_manifest(copy).space_id != read_manifest(out).space_id
    a, b = shard_contents(copy), shard_contents(fresh)
    assert [r[0] for r in a] == [r[0] for r in b]
    cos = np.array([float(x[2] @ y[2]) for x, y in zip(a, b, strict=True)])
    assert cos.min() >= 0.999
    assert summary.items == 1797
    verify_gallery(copy)


def test_add_and_remove_search_like_a_fresh_build(digits_run, tmp_path):
    _, _, run_dir = digits_run
    models, heads = models_and_heads(run_dir)
    digits = load_digits()
    lists = {}
    for name, rows in (("a", range(0, 600)), ("b", range(600, 900)), ("all", range(0, 900))):
        lines = []
        for i in rows:
            path = tmp_path / "img" / f"{i}.png"
            path.parent.mkdir(exist_ok=True)
            if not path.exists():
                Image.fromarray(digits.images[i, :, :, 0]).save(path)
            lines.append(f"img/{i}.png,item-{i},{json.dumps({'label': int(digits.labels[i])})}")
        lists[name] = tmp_path / f"{name}.txt"
        lists[name].write_text("\n".join(lines) + "\n")
    s = BuildSettings(shard_size=250)
    grown = tmp_path / "grown"
    build(models, heads, str(lists["a"]), grown, s)
    add(grown, str(lists["b"]))
    gone = [f"item-{i}" for i in (3, 250, 640, 899)]
    assert remove(grown, gone + ["no-such-id"])["not_found"] == ["no-such-id"]
    fresh = tmp_path / "fresh"
    build(models, heads, str(lists["all"]), fresh, s)
    remove(fresh, gone)
    a, b = shard_contents(grown), shard_contents(fresh)
    assert [r[0] for r in a] == [r[0] for r in b] and len(a) == 896
    assert all(np.allclose(x[2], y[2], atol=1e-6) for x, y in zip(a, b, strict=True))
    queries = np.stack([r[2] for r in a[::7]])
    found_a, scores_a = search(grown, queries, ef=900)
    found_b, scores_b = search(fresh, queries, ef=900)
    assert found_a == found_b
    assert np.allclose(scores_a, scores_b, atol=1e-6)
    assert not set(gone) & {i for row in found_a for i in row}
    verify_gallery(grown)
    _, meta = load_shard(grown, read_manifest(grown).shards[0], read_manifest(grown).dim, 10)
    assert meta.payload[0] == {"label": int(digits.labels[0])}


def test_interrupted_build_resumes_to_the_same_gallery(digits_run, tmp_path, monkeypatch):
    _, _, run_dir = digits_run
    models, heads = models_and_heads(run_dir)
    s = BuildSettings(shard_size=400)
    reference = tmp_path / "reference"
    build(models, heads, "digits", reference, s)

    real_write = encode_module.write_part
    calls = []

    def failing_write(path, part):
        calls.append(path)
        if len(calls) == 3:
            raise OSError(28, "No space left on device (injected)")
        real_write(path, part)

    monkeypatch.setattr(encode_module, "write_part", failing_write)
    out = tmp_path / "resumed"
    with pytest.raises(errors.StorageError, match="injected"):
        build(models, heads, "digits", out, s)
    assert not out.exists()  # the unfinished build stays in the staging folder
    stage = staging_path(out)
    assert list_parts(stage) == [0, 1]
    with pytest.raises(GalleryError, match="--resume"):
        build(models, heads, "digits", out, s)
    monkeypatch.setattr(encode_module, "write_part", real_write)
    before = part_path(stage, 0).stat().st_mtime_ns
    leftover = stage / "raw" / ".part-00002.npz.x1y2.tmp"  # what a kill during a write leaves
    leftover.write_bytes(b"half a part")
    build(models, heads, "digits", out, s, resume=True)
    assert part_path(out, 0).stat().st_mtime_ns == before  # finished parts were kept
    assert not list(out.rglob("*.tmp")) and not stage.exists()
    a, b = shard_contents(out), shard_contents(reference)
    assert [r[:2] for r in a] == [r[:2] for r in b]
    assert all(np.array_equal(x[2], y[2]) for x, y in zip(a, b, strict=True))
    m1, m2 = read_manifest(out), read_manifest(reference)
    assert [sh.files for sh in m1.shards] == [sh.files for sh in m2.shards]


def test_failed_change_leaves_the_gallery_intact(built, tmp_path, monkeypatch):
    _, out, _ = built
    before = (out / "manifest.json").read_bytes()

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(gallery_module, "write_manifest", full_disk)
    with pytest.raises(errors.StorageError, match="No space left"):
        remove(out, ["digits/5"])
    assert (out / "manifest.json").read_bytes() == before
    verify_gallery(out)
    assert not list(out.parent.glob(".gallery.staging*"))


def test_bad_inputs_get_clear_errors(digits_run, tmp_path):
    _, _, run_dir = digits_run
    models, heads = models_and_heads(run_dir)
    img = tmp_path / "x.png"
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(img)
    dup = tmp_path / "dup.txt"
    dup.write_text("x.png,a\nx.png,b\nx.png,a\n")
    with pytest.raises(DataError, match="duplicate ids.*'a'"):
        build(models, heads, str(dup), tmp_path / "g1", BuildSettings())
    assert not (tmp_path / "g1").exists()
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n")
    with pytest.raises(DataError, match="no images"):
        build(models, heads, str(empty), tmp_path / "g2", BuildSettings())
    # heads for other gallery models: name both fingerprints
    other = run_dir / "models" / "kd-resnet"
    renamed = tmp_path / "resnet"
    import shutil

    shutil.copytree(other, renamed)
    with pytest.raises(CheckpointError, match="head 'resnet'"):
        build([renamed, *models[1:]], heads, "digits", tmp_path / "g3", BuildSettings())


def test_corrupt_images_are_skipped_and_listed(digits_run, tmp_path):
    _, _, run_dir = digits_run
    models, heads = models_and_heads(run_dir)
    digits = load_digits()
    lines = []
    for i in range(40):
        Image.fromarray(digits.images[i, :, :, 0]).save(tmp_path / f"{i}.png")
        lines.append(f"{i}.png")
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (tmp_path / "list.txt").write_text("\n".join(lines + ["bad.png", "missing.png"]) + "\n")
    summary = build(
        models, heads, str(tmp_path / "list.txt"), tmp_path / "g", BuildSettings(shard_size=16)
    )
    assert summary.items == 40 and summary.skipped == 2
    skipped = [json.loads(x) for x in (tmp_path / "g" / "skipped.jsonl").read_text().splitlines()]
    assert sorted(s["id"] for s in skipped) == ["bad.png", "missing.png"]
    assert all(s["reason"] for s in skipped)
    assert read_manifest(tmp_path / "g").skipped == 2


def test_reject_quantile_leaves_out_the_most_uncertain(digits_run, tmp_path):
    _, _, run_dir = digits_run
    models, heads = models_and_heads(run_dir)
    out = tmp_path / "g"
    summary = build(models, heads, "digits", out, BuildSettings(reject_quantile=0.1))
    manifest = read_manifest(out)
    assert summary.rejected == len(manifest.rejected) == pytest.approx(180, abs=2)
    kept = [r[3] for r in shard_contents(out)]
    assert min(r["uncertainty"] for r in manifest.rejected) >= max(kept)
    assert summary.items == 1797 - len(manifest.rejected)


def test_cli_build_json_and_verify(digits_run, tmp_path):
    _, _, run_dir = digits_run
    models, heads = models_and_heads(run_dir)
    args = [
        "build",
        "--heads",
        str(heads),
        "--images",
        "digits",
        "--out",
        str(tmp_path / "g"),
        "--shard-size",
        "1000",
        "--json",
    ]
    for m in models:
        args += ["--models", str(m)]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["items"] == 1797 and out["shards"] == 2
    r = CliRunner().invoke(main, ["verify", "--gallery", str(tmp_path / "g")])
    assert r.exit_code == 0 and "1,797 items" in r.output
    (tmp_path / "g" / "shard-00001.hnsw").write_bytes(b"truncated")
    r = CliRunner().invoke(main, ["verify", "--gallery", str(tmp_path / "g")])
    assert r.exit_code == errors.FormatError.exit_code and "shard-00001.hnsw" in r.output
    r = CliRunner().invoke(main, args)
    assert r.exit_code == errors.FormatError.exit_code and "already holds a gallery" in r.output


def test_raw_store_is_fp16_and_complete(built):
    _, out, _ = built
    parts = [read_part(part_path(out, k)) for k in list_parts(out)]
    assert sum(len(p) for p in parts) == 1797
    assert all(v.dtype == np.float16 for p in parts for v in p.raw.values())
    assert set(parts[0].raw) == set(GALLERY_MODELS)


def test_ray_engine_matches_local(digits_run, tmp_path):
    """A local 2-CPU Ray: same parts, ids and vectors (within fp32 tolerance) as the local
    engine."""
    ray = pytest.importorskip("ray", reason="ray[data] is in the dev extra")
    _, _, run_dir = digits_run
    models, heads = models_and_heads(run_dir)
    s = BuildSettings(shard_size=300)
    src = tmp_path / "list.txt"
    digits = load_digits()
    lines = []
    for i in range(500):
        Image.fromarray(digits.images[i, :, :, 0]).save(tmp_path / f"{i}.png")
        lines.append(f"{i}.png,d{i}")
    src.write_text("\n".join(lines + ["nope.png,broken"]) + "\n")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        build(models, heads, str(src), tmp_path / "ray", s, engine="ray")
    finally:
        ray.shutdown()
    build(models, heads, str(src), tmp_path / "local", s)
    a, b = shard_contents(tmp_path / "ray"), shard_contents(tmp_path / "local")
    assert [r[:2] for r in a] == [r[:2] for r in b] and len(a) == 500
    assert all(np.allclose(x[2], y[2], atol=1e-5) for x, y in zip(a, b, strict=True))
    assert read_manifest(tmp_path / "ray").skipped == 1


@pytest.fixture(scope="module")
def old_query_gallery(digits_run, tmp_path_factory):
    """A gallery built for the run's old query model (its own heads), from copies of the
    gallery models' folders: (run folder, gallery, the copies' folder, heads folder)."""
    import shutil

    from gallery_builder.cli.main import main as cmce

    _, _, run_dir = digits_run
    root = tmp_path_factory.mktemp("old-query")
    copies = root / "models"
    for name in GALLERY_MODELS[:-1]:
        shutil.copytree(run_dir / "models" / name, copies / name)
    args = ["train", "heads", "--query", run_dir / "models" / "query-old", "--data", "digits"]
    for name in GALLERY_MODELS[:-1]:
        args += ["--gallery-model", copies / name]
    args += ["--steps", 200, "--out", root / "heads-old"]
    r = CliRunner().invoke(cmce, [str(a) for a in args], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    models = [copies / n for n in GALLERY_MODELS[:-1]] + [run_dir / "models" / "query-old"]
    gallery = root / "gallery"
    build(models, root / "heads-old", "digits", gallery, BuildSettings(shard_size=700))
    return run_dir, gallery, copies, root / "heads-old"


def test_refresh_equals_a_build_for_the_new_query_model(built, old_query_gallery, tmp_path):
    """`refresh` re-encodes only the query model's member: with the gallery models' folders
    gone it reaches the gallery a full build with the new query model and heads makes."""
    import shutil

    _, fresh, _ = built
    run_dir, old, copies, _ = old_query_gallery
    gallery = tmp_path / "gallery"
    shutil.copytree(old, gallery)
    shutil.rmtree(copies)  # no gallery model can run
    r = CliRunner().invoke(
        main,
        [
            "refresh",
            "--gallery",
            str(gallery),
            "--query",
            str(run_dir / "models" / "query"),
            "--heads",
            str(run_dir / "heads" / "unified"),
            "--json",
        ],
        catch_exceptions=False,
    )
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["items"] == 1797
    assert read_manifest(gallery).space_id == read_manifest(fresh).space_id
    assert read_manifest(gallery).space_id != read_manifest(old).space_id
    a, b = shard_contents(gallery), shard_contents(fresh)
    assert [x[0] for x in a] == [y[0] for y in b]
    assert min(float(x[2] @ y[2]) for x, y in zip(a, b, strict=True)) >= 0.9999
    verify_gallery(gallery)
    info = json.loads((gallery / "build.json").read_text())
    assert info["models"][-1] == str((run_dir / "models" / "query").resolve())
    assert (
        info["job"]["models"][QUERY_MEMBER]
        == read_manifest(fresh).gallery_models[-1]["fingerprint"]
    )


def test_refresh_refuses_what_it_cannot_do(old_query_gallery, tmp_path):
    import shutil

    from gallery_builder.gallery.build import refresh

    run_dir, old, _, heads_old = old_query_gallery
    query = run_dir / "models" / "query"
    gallery = tmp_path / "gallery"
    shutil.copytree(old, gallery)
    before = (gallery / "manifest.json").read_bytes()
    # heads of another query model
    with pytest.raises(CheckpointError, match="heads belong to query model"):
        refresh(gallery, query, heads_old)
    # heads without the query model's own member: nothing to refresh
    heads, config = load_heads(run_dir / "heads" / "unified")
    heads.set_weights({**dict.fromkeys(heads.names, 1.0), QUERY_MEMBER: 0.0})
    fps = {g["name"]: g["fingerprint"] for g in config["gallery_models"]}
    save_heads(tmp_path / "no-own", heads, config["query_fingerprint"], fps, HeadSettings(), {})
    with pytest.raises(CheckpointError, match="no query-model member"):
        refresh(gallery, query, tmp_path / "no-own")
    # heads for another resnet
    heads, _ = load_heads(run_dir / "heads" / "unified")
    other = {**fps, "resnet": "0" * 16}
    save_heads(tmp_path / "other", heads, config["query_fingerprint"], other, HeadSettings(), {})
    with pytest.raises(CheckpointError, match="this gallery was encoded by"):
        refresh(gallery, query, tmp_path / "other")
    assert (gallery / "manifest.json").read_bytes() == before


def test_refresh_needs_every_item_from_its_source(digits_run, old_query_gallery, tmp_path):
    """An item whose file is gone or broken: a clear error naming it, the gallery as it was."""
    from gallery_builder.gallery.build import refresh

    run_dir, _, _, heads_old = old_query_gallery
    digits = load_digits()
    folder = tmp_path / "images"
    for i in range(30):
        (folder / str(digits.labels[i])).mkdir(parents=True, exist_ok=True)
        Image.fromarray(digits.images[i, :, :, 0]).save(folder / str(digits.labels[i]) / f"{i}.png")
    models = [run_dir / "models" / n for n in GALLERY_MODELS[:-1]]
    gallery = tmp_path / "gallery"
    build(
        [*models, run_dir / "models" / "query-old"],
        heads_old,
        str(folder),
        gallery,
        BuildSettings(),
    )
    before = (gallery / "manifest.json").read_bytes()
    gone = next(folder.glob("*/7.png"))
    gone.unlink()
    with pytest.raises(GalleryError, match=r"no longer in its sources.*7\.png"):
        refresh(gallery, run_dir / "models" / "query", run_dir / "heads" / "unified")
    Image.fromarray(digits.images[7, :, :, 0]).save(gone)
    next(folder.glob("*/3.png")).write_bytes(b"not an image")
    with pytest.raises(GalleryError, match=r"no longer decode.*3\.png"):
        refresh(gallery, run_dir / "models" / "query", run_dir / "heads" / "unified")
    assert (gallery / "manifest.json").read_bytes() == before
    verify_gallery(gallery)


@pytest.fixture(scope="module")
def neighbour_heads(digits_run, tmp_path_factory):
    """The run's unified heads with the query model's own member averaged over 3 neighbours."""
    _, _, run_dir = digits_run
    heads, config = load_heads(run_dir / "heads" / "unified")
    heads.set_weights({n: float(n == QUERY_MEMBER) for n in heads.members})
    heads.set_neighbours({"k": 3, "alpha": 3.0, "graph": dict.fromkeys(heads.names, 1.0)})
    out = tmp_path_factory.mktemp("nb") / "heads"
    fps = {g["name"]: g["fingerprint"] for g in config["gallery_models"]}
    save_heads(out, heads, config["query_fingerprint"], fps, HeadSettings(), {})
    return out


def _png_list(folder, numbers, name):
    digits = load_digits()
    for i in numbers:
        if not (folder / f"{i}.png").exists():
            Image.fromarray(digits.images[i, :, :, 0]).save(folder / f"{i}.png")
    (folder / name).write_text("".join(f"{i}.png\n" for i in numbers))
    return str(folder / name)


def _same_vectors(a, b):
    a, b = shard_contents(a), shard_contents(b)
    assert [x[0] for x in a] == [y[0] for y in b]
    assert min(float(x[2] @ y[2]) for x, y in zip(a, b, strict=True)) >= 0.9999
    assert np.allclose([x[3] for x in a], [y[3] for y in b], atol=1e-3)


def test_neighbour_averaged_vectors_are_the_cores(digits_run, neighbour_heads, tmp_path):
    """Each stored vector is the heads' gallery_vectors over the whole gallery: the query
    model's own member averaged over neighbours found across shards."""
    _, _, run_dir = digits_run
    models, _ = models_and_heads(run_dir)
    out = tmp_path / "g"
    build(models, neighbour_heads, "digits", out, BuildSettings(shard_size=500))
    ensemble = Ensemble(models, neighbour_heads)
    assert ensemble.names == ensemble.heads.members  # the graph's models run too
    src = open_source("digits")
    part = ensemble.encode_raw(src, src.items)
    raw = {n: torch.from_numpy(part.raw[n].astype(np.float32)) for n in ensemble.names}
    vectors, unc = ensemble.heads.gallery_vectors(raw)
    plain, _ = ensemble.heads.encode_gallery(raw)
    rows = shard_contents(out)
    order = [{i: k for k, i in enumerate(part.ids)}[r[0]] for r in rows]
    stored = np.stack([r[2] for r in rows])
    assert (stored * vectors.numpy()[order]).sum(1).min() >= 0.9999
    assert (stored * plain.numpy()[order]).sum(1).mean() < 0.99  # averaging moved them
    assert np.allclose([r[3] for r in rows], unc.numpy()[order], atol=1e-3)
    assert json.loads((out / "build.json").read_text())["neighbours"]["k"] == 3


def test_neighbour_galleries_add_and_remove_like_a_fresh_build(
    digits_run, neighbour_heads, tmp_path
):
    """New items are old items' neighbours and removed ones were: both re-average every
    vector, so the gallery equals one built from scratch with the items it holds."""
    _, _, run_dir = digits_run
    models, _ = models_and_heads(run_dir)
    first = _png_list(tmp_path, range(60), "first.txt")
    more = _png_list(tmp_path, range(60, 90), "more.txt")
    gallery = tmp_path / "g"
    build(models, neighbour_heads, first, gallery, BuildSettings(shard_size=25))
    add(gallery, more)
    fresh = tmp_path / "fresh"
    build(
        models,
        neighbour_heads,
        _png_list(tmp_path, range(90), "all.txt"),
        fresh,
        BuildSettings(shard_size=25),
    )
    _same_vectors(gallery, fresh)
    gone = [f"{i}.png" for i in (3, 31, 75)]
    assert remove(gallery, gone)["removed"] == 3
    kept = [i for i in range(90) if f"{i}.png" not in gone]
    fresh_kept = tmp_path / "fresh-kept"
    build(
        models,
        neighbour_heads,
        _png_list(tmp_path, kept, "kept.txt"),
        fresh_kept,
        BuildSettings(shard_size=25),
    )
    _same_vectors(gallery, fresh_kept)
    verify_gallery(gallery)
