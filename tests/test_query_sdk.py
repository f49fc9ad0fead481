"""The query SDK: verified galleries, search by vector and by image through an exported ONNX
model, rejection, signatures, the cmce-query CLI, and the refusals."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from test_gallery_format import DIM, N, edit_manifest, make_gallery, refresh_checksums, unit_vectors

from gallery_builder.cli import build as build_cli
from query_sdk import Gallery, Hit, errors
from query_sdk import gallery_format as gf
from query_sdk.gallery_format import GalleryError
from query_sdk.signing import SignatureError, generate_keys, sign_manifest

# --------------------------------------------------------------------------- helpers


def exact_top(folder: Path, queries: np.ndarray, k: int, shards=None, limit=None):
    """Brute-force top-k ids over the live items (optionally those with uncertainty <= limit)."""
    manifest = gf.read_manifest(folder)
    ids, vectors, unc = [], [], []
    for i, sh in enumerate(manifest.shards):
        if shards is not None and i not in shards:
            continue
        index, meta = gf.load_shard(folder, sh, manifest.dim, 10)
        live = ~meta.deleted
        ids += [x for x, keep in zip(meta.ids, live, strict=True) if keep]
        vectors.append(np.asarray(index.get_items(meta.labels[live]), np.float32))
        unc.append(meta.uncertainty[live])
    vectors, unc = np.concatenate(vectors), np.concatenate(unc)
    sims = queries @ vectors.T
    if limit is not None:
        sims[:, unc > limit] = -np.inf
    order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return [[ids[j] for j in row if np.isfinite(sims[r, j])] for r, row in enumerate(order)]


@pytest.fixture()
def gallery(tmp_path):
    folder = tmp_path / "gallery"
    manifest, inputs = make_gallery(folder)
    return folder, manifest, inputs


def queries(n: int = 20, seed: int = 7) -> np.ndarray:
    return unit_vectors(n, DIM, seed=seed)


# --------------------------------------------------------------------------- search by vector


def test_search_merges_shards_exactly(gallery):
    folder, manifest, inputs = gallery
    g = Gallery.open(folder)
    assert (g.count, g.shards, g.manifest) == (2 * N, [0, 1], manifest)
    q = queries()
    hits = g.search(q, k=7)
    assert [[h.id for h in row] for row in hits] == exact_top(folder, q, 7)
    for row in hits:
        scores = [h.score for h in row]
        assert scores == sorted(scores, reverse=True) and len(row) == 7
    # the stored item itself comes back first, with its uncertainty and payload
    first = g.search(inputs[1]["vectors"][5], k=1)[0][0]
    assert first == Hit(
        "img-1-5",
        pytest.approx(1.0, abs=1e-5),
        pytest.approx(float(inputs[1]["unc"][5])),
        inputs[1]["payload"][5],
    )
    assert isinstance(first.score, float) and first.payload == {"path": "/x/1/5.png", "class": 5}


def test_open_a_subset_of_shards_and_memory(gallery):
    folder, manifest, _ = gallery
    full = Gallery.open(folder)
    one = Gallery.open(folder, shards=[1])
    index_bytes = manifest.shards[1].files[manifest.shards[1].index_file]["bytes"]
    assert index_bytes < one.memory_bytes < index_bytes + 4 * 2**20
    assert full.memory_bytes == one.memory_bytes + Gallery.open(folder, shards=[0]).memory_bytes
    assert one.count == N and "shards=1/2" in repr(one)
    q = queries()
    got = [[h.id for h in row] for row in one.search(q, k=5)]
    assert got == exact_top(folder, q, 5, shards=[1])
    assert all(i.startswith("img-1-") for row in got for i in row)
    (folder / manifest.shards[0].index_file).write_bytes(b"damaged")  # not opened: not checked
    assert Gallery.open(folder, shards=[1]).count == N
    with pytest.raises(GalleryError, match="no shard number 5"):
        Gallery.open(folder, shards=[5])


def test_k_beyond_the_gallery_and_deleted_items(gallery):
    folder, manifest, inputs = gallery
    gone = {int(inputs[0]["labels"][i]) for i in (0, 1, 2)}
    manifest.shards[0] = gf.update_shard_deletions(folder, manifest.shards[0], gone, DIM)
    gf.write_manifest(folder, manifest)
    g = Gallery.open(folder)
    assert g.count == 2 * N - 3
    hits = g.search(inputs[0]["vectors"][:3], k=500)
    for row in hits:
        assert len(row) == 2 * N - 3
        assert not {"img-0-0", "img-0-1", "img-0-2"} & {h.id for h in row}
    labels, scores = g.search_labels(queries(2), k=2 * N + 4)  # k is clamped to the live items
    assert labels.shape == (2, 2 * N - 3) and (labels >= 0).all() and np.isfinite(scores).all()


def test_rejection_by_value_and_by_quantile(gallery):
    folder, manifest, _ = gallery
    g = Gallery.open(folder)
    q = queries(30)
    # shard 0 holds uncertainties 0..0.5, shard 1 holds 1..1.5: 0.3 keeps 60% of shard 0
    hits = g.search(q, k=10, max_uncertainty=0.3)
    assert [[h.id for h in row] for row in hits] == exact_top(folder, q, 10, limit=0.3)
    assert all(h.uncertainty <= 0.3 and h.id.startswith("img-0-") for row in hits for h in row)
    assert all(len(row) == 10 for row in hits)
    # a quantile name from the manifest: q0.9 -> 0.3 in make_gallery's manifest
    by_name = g.search(q, k=10, max_uncertainty="q0.9")
    assert by_name == hits == g.search(q, k=10, max_uncertainty="0.9")
    assert g.uncertainty_limit("q0.99") == manifest.uncertainty_quantiles["0.99"]
    # a limit below every stored uncertainty leaves nothing
    assert g.search(q[:2], k=3, max_uncertainty=-1.0) == [[], []]
    # more than the accepted items: all accepted ones, no padding with rejected items
    assert len(g.search(q[:1], k=100, max_uncertainty=0.3)[0]) == int(0.6 * N)
    with pytest.raises(ValueError, match=r"no such uncertainty quantile; it has q0\.5, q0\.9"):
        g.search(q, max_uncertainty="q0.42")
    with pytest.raises(ValueError, match="finite number or a quantile name"):
        g.search(q, max_uncertainty=float("nan"))


def test_bad_query_vectors(gallery):
    folder, _, _ = gallery
    g = Gallery.open(folder)
    with pytest.raises(ValueError, match=rf"must be \(N, {DIM}\)"):
        g.search(np.ones((2, DIM + 1), np.float32))
    with pytest.raises(ValueError, match="L2-normalised.*row 1 has norm 2.0"):
        g.search(np.stack([queries(1)[0], 2 * queries(1)[0]]))
    with pytest.raises(ValueError, match="NaN"):
        g.search(np.full(DIM, np.nan, np.float32))
    with pytest.raises(ValueError, match="k must be a positive int"):
        g.search(queries(1), k=0)


# --------------------------------------------------------------------------- refusals


def test_refused_truncated_shard(gallery):
    folder, manifest, _ = gallery
    path = folder / manifest.shards[0].index_file
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(GalleryError, match=r"shard-00000\.hnsw: size \d+ bytes, manifest says"):
        Gallery.open(folder)
    refresh_checksums(folder)  # even with matching checksums, the structure check refuses it
    with pytest.raises(GalleryError, match=r"shard-00000\.hnsw: .*(truncated|bad upper-level)"):
        Gallery.open(folder)


def test_refused_bit_flipped_shard(gallery):
    folder, manifest, _ = gallery
    path = folder / manifest.shards[1].index_file
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0x04
    path.write_bytes(bytes(data))
    with pytest.raises(GalleryError, match=r"shard-00001\.hnsw: sha256 [0-9a-f]{64}, manifest"):
        Gallery.open(folder)


def test_refused_missing_shard(gallery):
    folder, manifest, _ = gallery
    (folder / manifest.shards[1].index_file).unlink()
    with pytest.raises(
        GalleryError,
        match=r"shard-00001\.hnsw: listed in the manifest but "
        "missing",
    ):
        Gallery.open(folder)


def test_refused_other_query_space(gallery):
    folder, _, _ = gallery
    with pytest.raises(
        GalleryError,
        match=r"embedding space 'q-abc123', the query model is in "
        r"space 'q-other'",
    ):
        Gallery.open(folder, space_id="q-other")
    assert Gallery.open(folder, space_id="q-abc123").count == 2 * N


def test_refused_wrong_dims(gallery):
    folder, _, _ = gallery
    with pytest.raises(GalleryError, match=f"dim {DIM}, the query model gives {DIM * 2}"):
        Gallery.open(folder, dim=DIM * 2)
    edit_manifest(folder, lambda d: d.update(dim=DIM * 2))  # the manifest lies about dims
    with pytest.raises(GalleryError, match=f"wrong dims: manifest dim is {DIM * 2}"):
        Gallery.open(folder)


def test_refused_path_escape(gallery):
    folder, manifest, _ = gallery
    name = manifest.shards[0].index_file
    (folder.parent / name).write_bytes((folder / name).read_bytes())  # a real file outside

    def change(d):
        shard = d["shards"][0]
        shard["files"]["../" + name] = shard["files"].pop(name)
        shard["index_file"] = "../" + name

    edit_manifest(folder, change)
    with pytest.raises(GalleryError, match=r"must be a plain file name.*'\.\./shard-00000\.hnsw'"):
        Gallery.open(folder)


def test_refused_bad_format_version(gallery):
    folder, _, _ = gallery
    edit_manifest(folder, lambda d: d.update(format_version=99))
    with pytest.raises(GalleryError, match="unknown format_version 99"):
        Gallery.open(folder)


# --------------------------------------------------------------------------- signatures


@pytest.fixture()
def keys(tmp_path):
    return generate_keys(tmp_path / "signing")


def test_signed_gallery_opens_with_its_key(gallery, keys):
    folder, _, _ = gallery
    secret, public = keys
    assert oct(secret.stat().st_mode & 0o777) == "0o600"
    sign_manifest(folder, secret.read_text())
    record = json.loads((folder / "manifest.sig").read_text())
    assert record["algorithm"] == "ed25519" and record["public_key"] == public.read_text().strip()
    for key in (public, str(public), public.read_text().strip(), bytes.fromhex(public.read_text())):
        assert Gallery.open(folder, public_key=key).count == 2 * N


def test_refused_tampered_signed_manifest(gallery, keys):
    folder, _, _ = gallery
    secret, public = keys
    sign_manifest(folder, secret.read_text())
    edit_manifest(folder, lambda d: d["extra"].update(note="changed after signing"))
    gf.read_manifest(folder)  # still a valid manifest, and its checksums still match
    with pytest.raises(SignatureError, match="signature does not match manifest.json"):
        Gallery.open(folder, public_key=public)
    assert Gallery.open(folder).count == 2 * N  # without a key, signatures are not required


def test_refused_unsigned_or_other_key(gallery, keys, tmp_path):
    folder, _, _ = gallery
    secret, public = keys
    with pytest.raises(
        SignatureError, match="manifest.sig: missing.*unsigned galleries are refused"
    ):
        Gallery.open(folder, public_key=public)
    _, other_public = generate_keys(tmp_path / "other")
    sign_manifest(folder, secret.read_text())
    with pytest.raises(SignatureError, match=r"does not match.*signed with key"):
        Gallery.open(folder, public_key=other_public)
    (folder / "manifest.sig").write_text("{not json")
    with pytest.raises(SignatureError, match="manifest.sig: not valid JSON"):
        Gallery.open(folder, public_key=public)
    with pytest.raises(SignatureError, match="public key 'abc'"):
        Gallery.open(folder, public_key="abc")


def test_builder_cli_keygen_sign_verify(gallery, tmp_path):
    folder, _, _ = gallery
    runner = CliRunner()
    base = tmp_path / "k"
    result = runner.invoke(build_cli.main, ["keygen", "--out", str(base)])
    assert result.exit_code == 0, result.output
    result = runner.invoke(
        build_cli.main, ["sign", "--gallery", str(folder), "--key", f"{base}.key"]
    )
    assert result.exit_code == 0, result.output
    ok = runner.invoke(
        build_cli.main, ["verify", "--gallery", str(folder), "--public-key", f"{base}.pub"]
    )
    assert ok.exit_code == 0 and "ok: 120 items" in ok.output
    edit_manifest(folder, lambda d: d.update(skipped=0))
    bad = runner.invoke(
        build_cli.main, ["verify", "--gallery", str(folder), "--public-key", f"{base}.pub"]
    )
    assert (
        bad.exit_code == errors.SignatureError.exit_code
        and "signature does not match" in bad.output
    )
    again = runner.invoke(build_cli.main, ["keygen", "--out", str(base)])
    assert again.exit_code == errors.CmceError.exit_code and "exists" in again.output


# --------------------------------------------------------------------------- with a real bundle


def make_bundle(
    model_dir: Path, heads_dir: Path | None, out: Path, jobs=(("onnx", "fp32"),)
) -> Path:
    """Export the query graph with the export package (cmce-export's API) into a bundle."""
    from export.bundle import ExportPlan, export_bundle

    export_bundle(
        ExportPlan(model_dir, heads_dir, list(jobs), "digits", out, n_validation=256),
        progress=False,
    )
    return out


@pytest.fixture(scope="module")
def digits_setup(digits_run, tmp_path_factory):
    """(bundle, gallery, images, reference vectors from the torch graph) on digits."""
    import torch

    from export.graph import load_export_source
    from gallery_builder.data.datasets import load_digits
    from gallery_builder.gallery.build import BuildSettings, build

    _, _, run = digits_run
    root = tmp_path_factory.mktemp("sdk-digits")
    models = [run / "models" / n for n in ("resnet", "widecnn", "vit", "query")]
    build(
        models, run / "heads" / "unified", "digits", root / "gallery", BuildSettings(shard_size=700)
    )
    bundle = make_bundle(run / "models" / "query", run / "heads" / "unified", root / "bundle")
    images = load_digits().images[::9][:150]
    graph = load_export_source(run / "models" / "query", run / "heads" / "unified").graph
    with torch.no_grad():
        reference = graph(torch.from_numpy(images)).numpy()
    return bundle, root / "gallery", images, reference


def test_searcher_matches_the_torch_model(digits_setup):
    from query_sdk import Searcher

    bundle, gallery_dir, images, reference = digits_setup
    s = Searcher.open(bundle=bundle, gallery=gallery_dir)
    assert "query.onnx" in repr(s) and s.gallery.count == 1797 and len(s.gallery.shards) == 3
    vectors = np.stack([s.embed(im) for im in images])
    cosines = (vectors * reference).sum(axis=1)
    assert cosines.min() > 0.9999
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    got = s.search_batch(list(images), k=5)
    want = s.gallery.search(reference, k=5)
    same_top1 = np.mean([g[0].id == w[0].id for g, w in zip(got, want, strict=True)])
    assert same_top1 >= 0.98
    assert all(len(row) == 5 and row[0].score >= row[-1].score for row in got)
    assert s.search(images[3], k=5) == got[3]


def test_paths_pil_and_arrays_give_the_same_hits(digits_setup, tmp_path):
    from PIL import Image

    from query_sdk import Searcher

    bundle, gallery_dir, images, _ = digits_setup
    s = Searcher.open(bundle=bundle, gallery=gallery_dir, threads=2)
    array = images[7]
    Image.fromarray(array[..., 0]).save(tmp_path / "seven.png")
    pil = Image.fromarray(array[..., 0]).convert("RGB")  # RGB is converted to the model's grey
    by_array = s.search(array, k=4)
    assert s.search(tmp_path / "seven.png", k=4) == by_array
    assert s.search(str(tmp_path / "seven.png"), k=4) == by_array
    assert s.search(pil, k=4) == by_array
    assert np.array_equal(s.embed(array[..., 0]), s.embed(array))  # (H, W) grey too
    bigger = np.asarray(Image.fromarray(array[..., 0]).resize((32, 32)))
    assert s.embed(bigger).shape == (s.bundle.embedding_dim,)  # resized to the input spec


def test_undecodable_image_in_a_batch(digits_setup, tmp_path):
    from query_sdk import Searcher
    from query_sdk.images import ImageError

    bundle, gallery_dir, images, _ = digits_setup
    s = Searcher.open(bundle=bundle, gallery=gallery_dir)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    results = s.search_batch([images[0], broken, tmp_path / "absent.png", images[1]], k=3)
    assert isinstance(results[1], ImageError) and "broken.png" in str(results[1])
    assert isinstance(results[2], ImageError) and "absent.png" in str(results[2])
    assert results[0] == s.search(images[0], k=3) and results[3] == s.search(images[1], k=3)
    with pytest.raises(ImageError, match="broken.png: cannot use this image"):
        s.search(broken)
    with pytest.raises(ImageError, match="arrays must be uint8"):
        s.embed(images[0].astype(np.float32))


def test_searcher_refuses_other_space_and_damaged_model(digits_setup, digits_run, tmp_path):
    import shutil

    from query_sdk import Searcher
    from query_sdk.bundle_format import BundleError
    from query_sdk.runtimes import BackendError

    bundle, gallery_dir, _, _ = digits_setup
    _, _, run = digits_run
    # the query model's own space (no unified heads): not the gallery's space
    own = make_bundle(run / "models" / "query", None, tmp_path / "own-space")
    own_space = json.loads((own / "manifest.json").read_text())["space_id"]
    gallery_space = gf.read_manifest(gallery_dir).space_id
    with pytest.raises(GalleryError) as err:
        Searcher.open(bundle=own, gallery=gallery_dir)
    assert repr(gallery_space) in str(err.value) and repr(own_space) in str(err.value)
    # a bit flip in the model is caught by its sha256 before onnxruntime sees it
    damaged = tmp_path / "damaged"
    shutil.copytree(bundle, damaged)
    model = damaged / "query.onnx"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0x01
    model.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"query.onnx: sha256 [0-9a-f]{64}, manifest says"):
        Searcher.open(bundle=damaged, gallery=gallery_dir)
    with pytest.raises(BundleError, match="no onnx/int8 artifact"):
        Searcher.open(bundle=bundle, gallery=gallery_dir, quantization="int8")
    with pytest.raises(BackendError, match="unknown backend 'tflite'"):
        Searcher.open(bundle=bundle, gallery=gallery_dir, backend="tflite")
    if sys.platform != "darwin":
        with pytest.raises(BackendError, match="coreml backend runs only on macOS"):
            Searcher.open(bundle=bundle, gallery=gallery_dir, backend="coreml")


def test_import_and_search_leave_torch_unloaded(digits_setup):
    bundle, gallery_dir, images, _ = digits_setup
    code = (
        "import sys, numpy as np, query_sdk\n"
        "assert 'torch' not in sys.modules, 'import query_sdk loaded torch'\n"
        f"s = query_sdk.Searcher.open(bundle={str(bundle)!r}, gallery={str(gallery_dir)!r})\n"
        f"hits = s.search(np.array({images[0].tolist()}, dtype=np.uint8), k=3)\n"
        "assert len(hits) == 3\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'executorch')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_cmce_query_cli(digits_setup, tmp_path):
    from PIL import Image

    from query_sdk import Searcher

    bundle, gallery_dir, images, _ = digits_setup
    Image.fromarray(images[5][..., 0]).save(tmp_path / "five.png")
    (tmp_path / "bad.png").write_text("not an image")
    cmd = [
        sys.executable,
        "-m",
        "query_sdk.cli",
        "--bundle",
        str(bundle),
        "--gallery",
        str(gallery_dir),
        "--k",
        "3",
        "--threads",
        "2",
    ]
    out = subprocess.run(
        [*cmd, "--json", str(tmp_path / "five.png"), str(tmp_path / "bad.png")],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 1, out.stderr  # one image failed; the other is answered
    records = json.loads(out.stdout)
    want = Searcher.open(bundle=bundle, gallery=gallery_dir).search(images[5], k=3)
    assert [h["id"] for h in records[0]["hits"]] == [h.id for h in want]
    assert records[0]["hits"][0]["score"] == pytest.approx(want[0].score, abs=1e-6)
    assert "bad.png" in records[1]["error"] and "hits" not in records[1]

    limit = gf.read_manifest(gallery_dir).uncertainty_quantiles["0.5"]
    out = subprocess.run(
        [*cmd, "--json", "--max-uncertainty", "q0.5", str(tmp_path / "five.png")],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    assert all(h["uncertainty"] <= limit for h in json.loads(out.stdout)[0]["hits"])

    text = subprocess.run([*cmd, str(tmp_path / "five.png")], capture_output=True, text=True)
    assert text.returncode == 0 and f"1. {want[0].id}  score" in text.stdout
    missing = subprocess.run(
        [*cmd, "--gallery", str(tmp_path), str(tmp_path / "five.png")],
        capture_output=True,
        text=True,
    )
    assert missing.returncode == 2
    assert missing.stderr.startswith("error: manifest.json: missing in")


def test_executorch_backend(digits_setup, digits_run, tmp_path):
    pytest.importorskip("executorch.runtime", reason="the executorch extra is not installed")
    from query_sdk import Searcher

    bundle, gallery_dir, images, reference = digits_setup
    _, _, run = digits_run
    et = make_bundle(
        run / "models" / "query",
        run / "heads" / "unified",
        tmp_path / "et",
        jobs=(("executorch", "fp32"),),
    )
    s = Searcher.open(bundle=et, gallery=gallery_dir, backend="executorch")
    assert s.artifact.file == "query.pte" and s.runtime.max_batch >= 1
    images = images[: 2 * s.runtime.max_batch + 3]  # more than one call's worth
    got = s.search_batch(list(images), k=3)
    vectors = np.stack([s.embed(im) for im in images])
    assert ((vectors * reference[: len(images)]).sum(axis=1)).min() > 0.9999
    onnx = Searcher.open(bundle=bundle, gallery=gallery_dir).search_batch(list(images), k=3)
    assert np.mean([a[0].id == b[0].id for a, b in zip(got, onnx, strict=True)]) >= 0.98


def test_builder_signs_changes_and_stale_signatures_are_refused(digits_setup, tmp_path):
    import shutil

    bundle, gallery_dir, _, _ = digits_setup
    folder = tmp_path / "gallery"
    shutil.copytree(gallery_dir, folder)
    runner = CliRunner()
    assert runner.invoke(build_cli.main, ["keygen", "--out", str(tmp_path / "k")]).exit_code == 0
    public = tmp_path / "k.pub"
    signed = runner.invoke(
        build_cli.main,
        [
            "remove",
            "--gallery",
            str(folder),
            "--ids",
            "digits/3",
            "--yes",
            "--sign-key",
            str(tmp_path / "k.key"),
        ],
    )
    assert signed.exit_code == 0, signed.output
    g = Gallery.open(folder, public_key=public)
    assert g.count == 1796
    stale = runner.invoke(
        build_cli.main, ["remove", "--gallery", str(folder), "--ids", "digits/4", "--yes"]
    )
    assert stale.exit_code == 0 and "manifest.sig no longer matches" in stale.output
    with pytest.raises(SignatureError, match="does not match"):
        Gallery.open(folder, public_key=public)
