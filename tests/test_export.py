"""cmce-export on the digits run: every target x quantization, checked against torch with the
SDK's runtimes (query_sdk.runtimes; Core ML structurally off macOS) and Recall@1 through the
SDK's Gallery with the sidecar's classes, the bundle format (strict manifest, checksums, atomic
--force), and bad inputs."""

from __future__ import annotations

import json
import os
import platform
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn

from export.bundle import OFFERED, ExportPlan, export_bundle, staged_folder
from export.calibration import calibration_and_validation
from export.cli import main as export_cli
from export.coreml import check_package, export_coreml
from export.errors import ExportError, UnsupportedOpError
from export.executorch import export_executorch
from export.graph import ModelIO, load_export_source, query_io
from export.onnx import export_onnx
from export.validate import GalleryCheck, cosine_stats
from gallery_builder.data.datasets import load_digits
from gallery_builder.data.sources import open_source
from gallery_builder.gallery.build import BuildSettings, build
from query_sdk import errors
from query_sdk.bundle_format import (
    MANIFEST_FILE,
    ORT_OPERATORS_FILE,
    Artifact,
    BundleError,
    BundleManifest,
    Validation,
    find_artifact,
    path_digest,
    read_bundle_manifest,
    verify_bundle,
    write_bundle_manifest,
)
from query_sdk.gallery_format import (
    load_shard,
    read_manifest,
    read_meta,
    write_manifest,
    write_shard,
)
from query_sdk.runtimes import open_runtime
from query_sdk.searcher import Searcher
from query_sdk.shards import Gallery
from query_sdk.spec import InputSpec

ALL_JOBS = [
    ("onnx", "fp32"),
    ("onnx", "int8"),
    ("executorch", "fp32"),
    ("executorch", "int8"),
    ("coreml", "fp32"),
    ("coreml", "fp16"),
    ("coreml", "int8"),
    ("coreml", "pal4"),
]
#: the artifacts of ALL_JOBS with ort_format: each ONNX one followed by its .ort copy
EXPORTED = [j for t, q in ALL_JOBS for j in ([(t, q), ("ort", q)] if t == "onnx" else [(t, q)])]
#: the SDK backend that runs (and validated) each target here
BACKENDS = {"onnx": "onnxruntime", "ort": "onnxruntime-ort", "executorch": "executorch"}


def _dirs(run_dir: Path) -> tuple[Path, Path, list[Path]]:
    models = run_dir / "models"
    return (
        models / "query",
        run_dir / "heads" / "unified",
        [models / n for n in ("resnet", "widecnn", "vit", "query")],  # query: its own member
    )


@pytest.fixture(scope="module")
def digits_gallery(digits_run, tmp_path_factory) -> Path:
    """The digits run's gallery of all 1797 digits (2 shards), classes in the sidecars."""
    _, _, run_dir = digits_run
    _, heads, gallery_models = _dirs(run_dir)
    gallery = tmp_path_factory.mktemp("gallery") / "gallery"
    build(gallery_models, heads, "digits", gallery, BuildSettings(shard_size=1000))
    return gallery


@pytest.fixture(scope="module")
def exported(digits_run, digits_gallery, tmp_path_factory):
    """A bundle with every target x quantization, validated against a digits gallery."""
    _, _, run_dir = digits_run
    query, heads, _ = _dirs(run_dir)
    root = tmp_path_factory.mktemp("export")
    gallery = digits_gallery
    plan = ExportPlan(
        model_dir=query,
        heads_dir=heads,
        jobs=ALL_JOBS,
        validation="digits",
        calibration="digits",
        n_calibration=256,
        n_validation=300,
        gallery=gallery,
        out=root / "bundle",
        ort_format=True,
    )
    result = export_bundle(plan, progress=False)
    return run_dir, root / "bundle", result, gallery


# ---------------------------------------------------------------------------- the bundle


def test_manifest_names_the_space_and_the_input(exported):
    run_dir, bundle, result, gallery = exported
    query, heads, _ = _dirs(run_dir)
    manifest = verify_bundle(bundle)  # sizes + sha256 of every artifact
    assert manifest == result.manifest
    heads_cfg = json.loads((heads / "config.json").read_text())
    query_cfg = json.loads((query / "config.json").read_text())
    gallery_manifest = json.loads((gallery / MANIFEST_FILE).read_text())
    assert manifest.space_id == heads_cfg["space_id"] == gallery_manifest["space_id"]
    assert manifest.mode == "unified"
    assert manifest.query_fingerprint == query_cfg["fingerprint"]
    assert manifest.input_spec == InputSpec.from_dict(query_cfg["input_spec"])
    assert manifest.embedding_dim == heads_cfg["identity"]["dim"]
    assert [(a.target, a.quantization) for a in manifest.artifacts] == EXPORTED
    for a in manifest.artifacts:
        assert a.input_shape == [-1, 8, 8, 1] and a.output_shape == [-1, manifest.embedding_dim]
        assert a.input_dtype == ("float32" if a.target == "coreml" else "uint8")
        assert a.deployment_target == ("iOS17" if a.target == "coreml" else None)
        assert (a.bytes, a.sha256) == path_digest(bundle / a.file)
    assert not [p for p in bundle.parent.iterdir() if p.name.startswith(".")]  # no temp left


def test_fp32_and_int8_match_torch(exported):
    """Figures in the manifest, and a fresh run of each file on other digits."""
    run_dir, bundle, result, _ = exported
    query, heads, _ = _dirs(run_dir)
    manifest = result.manifest
    source = load_export_source(query, heads)
    images = load_digits().images[:200]
    with torch.no_grad():
        reference = source.graph(torch.from_numpy(images)).numpy()
    for target, quant in [(t, q) for t, q in EXPORTED if t in BACKENDS]:
        a = find_artifact(manifest, target, quant)
        v = a.validation
        assert v.images == 300 and v.runtime == BACKENDS[target]
        out = open_runtime(BACKENDS[target], bundle / a.file, a).run(images)
        cos = (out * reference).sum(1)
        np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-3)
        if quant == "fp32":
            assert v.cosine_mean >= 0.9999 and v.cosine_min >= 0.999, a.file
            assert cos.min() >= 0.999, a.file
        else:
            assert v.cosine_mean >= 0.98 and v.cosine_min > 0.8, (a.file, v)
            assert cos.mean() >= 0.98, a.file
        assert v.gallery_space_id == manifest.space_id
        assert abs(v.recall_at_1_delta) <= (0.01 if quant == "fp32" else 0.05), (a.file, v)
    assert 0.5 < result.recall_at_1_torch <= 1.0


def test_int8_is_smaller(exported):
    _, bundle, result, _ = exported
    for target in ("onnx", "executorch", "coreml"):
        fp32 = find_artifact(result.manifest, target, "fp32").bytes
        int8 = find_artifact(result.manifest, target, "int8").bytes
        # the digits model is tiny: fixed overheads keep the ratio above the 0.35 of real models
        assert int8 < 0.75 * fp32, (target, int8, fp32)
    files = {
        q: find_artifact(result.manifest, "coreml", q).file
        for q in OFFERED["coreml"]
        if q != "pal6"
    }
    packages = {q: path_digest(bundle / f)[0] for q, f in files.items()}
    assert packages["pal4"] < packages["int8"] < packages["fp16"] < packages["fp32"]
    # the weights alone: 4-bit indices (+ 16-entry tables, 64-byte alignment per tensor) are
    # 0.20 of fp32 and 0.62 of int8 on this tiny model; the program text is the same in all
    weights = {
        q: (bundle / f / "Data/com.apple.CoreML/weights/weight.bin").stat().st_size
        for q, f in files.items()
    }
    assert weights["pal4"] < 0.22 * weights["fp32"] and weights["pal4"] < 0.65 * weights["int8"]


def test_coreml_packages_check_out(exported):
    _, bundle, result, _ = exported
    io = query_io(result.manifest.input_spec, result.manifest.embedding_dim, "float32")
    for quant in ("fp32", "fp16", "int8", "pal4"):
        a = find_artifact(result.manifest, "coreml", quant)
        assert check_package(bundle / a.file, io, quant)
        if platform.system() != "Darwin":
            assert a.validation.runtime == "spec-only" and a.validation.cosine_mean is None
    # a package is compared with what it claims to be: the fp16 one is not int8
    with pytest.raises(ExportError, match="not int8"):
        check_package(bundle / find_artifact(result.manifest, "coreml", "fp16").file, io, "int8")
    with pytest.raises(ExportError, match="not pal6"):
        check_package(bundle / find_artifact(result.manifest, "coreml", "pal4").file, io, "pal6")


def _luts(package: Path) -> list[tuple[str, tuple[int, ...]]]:
    """(dtype, shape) of every look-up table a constexpr_lut_to_dense op expands."""
    import coremltools as ct
    from coremltools.optimize.coreml import get_weights_metadata

    model = ct.models.MLModel(str(package), skip_model_load=True)
    return [
        (w.val.dtype.name, w.val.shape)
        for name, w in get_weights_metadata(model, weight_threshold=1).items()
        for op in w.child_ops
        if op.op_type == "constexpr_lut_to_dense" and op.params_name_mapping["lut"] == name
    ]


def _spec_version(package: Path) -> int:
    import coremltools as ct

    return ct.models.MLModel(str(package), skip_model_load=True).get_spec().specificationVersion


def test_coreml_palettized_weights_are_16_entry_fp16_tables(exported):
    _, bundle, result, _ = exported
    pal4 = find_artifact(result.manifest, "coreml", "pal4")
    luts = _luts(bundle / pal4.file)
    # every conv/linear weight of the digits query graph (and T_q) is a 16-entry fp16 palette
    assert len(luts) >= 3 and set(luts) == {("float16", (16,))}, luts
    assert not _luts(bundle / find_artifact(result.manifest, "coreml", "int8").file)
    assert _spec_version(bundle / pal4.file) == 8  # iOS17 / macOS14, the default


def test_ort_format_copies_run_like_the_onnx_files(exported):
    """The .ort files give the .onnx outputs, list their operators, and the SDK runs them."""
    _, bundle, result, gallery = exported
    manifest = result.manifest
    images = load_digits().images[:100]
    for quant in ("fp32", "int8"):
        onnx_a, ort_a = (find_artifact(manifest, t, quant) for t in ("onnx", "ort"))
        assert ort_a.file == onnx_a.file.replace(".onnx", ".ort") and ort_a.bytes > 0
        assert ort_a.validation.runtime == "onnxruntime-ort" and ort_a.validation.images == 300
        assert abs(ort_a.validation.cosine_mean - onnx_a.validation.cosine_mean) < 1e-4
        out = open_runtime("onnxruntime-ort", bundle / ort_a.file, ort_a).run(images)
        onnx_out = open_runtime("onnxruntime", bundle / onnx_a.file, onnx_a).run(images)
        assert (out * onnx_out).sum(1).min() >= 0.9999
    assert manifest.extra["ort_required_operators"] == ORT_OPERATORS_FILE
    config = (bundle / ORT_OPERATORS_FILE).read_text()
    assert "# - query.int8.ort" in config and "ai.onnx;18;" in config
    assert "QuantizeLinear" in config  # the int8 graph's operators are listed too
    # the SDK keeps the .onnx for "onnxruntime" and runs the .ort with "onnxruntime-ort"
    default = Searcher.open(bundle=bundle, gallery=gallery)
    ort_searcher = Searcher.open(
        bundle=bundle, gallery=gallery, backend="onnxruntime-ort", quantization="int8"
    )
    assert default.artifact.file == "query.onnx" and ort_searcher.artifact.file == "query.int8.ort"
    int8 = find_artifact(manifest, "onnx", "int8")
    np.testing.assert_allclose(
        ort_searcher.embed(images[0]),
        open_runtime("onnxruntime", bundle / int8.file, int8).run(images[:1])[0],
        atol=1e-5,
    )


def test_validation_figures_are_the_sdk_runtimes_outputs(exported):
    """Each artifact's figures are exactly those of the SDK's runtime (the code an app runs) on
    the same held-out images, and the batch bound the manifest records is the runtime's."""
    run_dir, bundle, result, _ = exported
    query, heads, _ = _dirs(run_dir)
    manifest = result.manifest
    _, val = calibration_and_validation("digits", "digits", manifest.input_spec, 256, 300)
    with torch.no_grad():
        reference = load_export_source(query, heads).graph(torch.from_numpy(val.images)).numpy()
    checked = []
    for a in manifest.artifacts:
        if a.validation.runtime == "spec-only":
            continue
        runtime = open_runtime(a.validation.runtime, bundle / a.file, a)
        stats = cosine_stats(reference, runtime.run(val.images))
        assert stats == (a.validation.cosine_min, a.validation.cosine_mean), a.file
        assert a.max_batch == runtime.max_batch, a.file
        checked.append(a.target)
    assert set(checked) >= set(BACKENDS)
    assert 1 <= find_artifact(manifest, "executorch", "int8").max_batch <= 64


def _regallery(gallery: Path, out: Path, ids, classes) -> None:
    """A copy of ``gallery`` whose shards keep the vectors and labels, with ``ids(meta)`` as
    item ids and ``classes(meta)`` as sidecar classes (None: no classes)."""
    shutil.copytree(gallery, out)
    manifest = read_manifest(gallery)
    shards = []
    for number, shard in enumerate(manifest.shards):
        index, meta = load_shard(gallery, shard, manifest.dim, manifest.hnsw["ef_search"])
        vectors = np.asarray(index.get_items(meta.labels), np.float32)
        shards.append(
            write_shard(
                out,
                number,
                vectors,
                meta.labels,
                ids(meta),
                meta.uncertainty,
                meta.payload,
                manifest.hnsw["M"],
                manifest.hnsw["ef_construction"],
                classes=classes(meta),
            )
        )
    write_manifest(out, replace(manifest, shards=shards))


def test_gallery_items_carry_their_source_class(tmp_path):
    """What the builder stores in the sidecar: the class folder, the dataset's class, or none."""
    from PIL import Image

    for name in ("cat", "dog"):
        (tmp_path / "images" / name / "sub").mkdir(parents=True)
        Image.new("L", (8, 8)).save(tmp_path / "images" / name / "sub" / "1.png")
    items = open_source(str(tmp_path / "images")).items
    assert [(i.id, i.class_name) for i in items] == [
        ("cat/sub/1.png", "cat"),
        ("dog/sub/1.png", "dog"),
    ]
    digits = load_digits()
    assert [i.class_name for i in open_source("digits").items] == [
        digits.classes[i] for i in digits.labels
    ]
    (tmp_path / "list.txt").write_text("images/cat/sub/1.png,dog/7\n")
    assert [(i.id, i.class_name) for i in open_source(str(tmp_path / "list.txt")).items] == [
        ("dog/7", "")
    ]


def test_recall_at_1_counts_the_sidecar_class_not_the_id(digits_run, digits_gallery, tmp_path):
    _, _, run_dir = digits_run
    query, heads, _ = _dirs(run_dir)
    digits = load_digits()
    manifest = read_manifest(digits_gallery)
    # the builder stored each item's class: item digits/i is of digit digits.labels[i]
    for shard in manifest.shards:
        meta = read_meta(digits_gallery / shard.meta_file)
        truth = [digits.classes[digits.labels[int(i.rsplit("/", 1)[1])]] for i in meta.ids]
        assert meta.classes == truth
    with torch.no_grad():
        vectors = load_export_source(query, heads).graph(torch.from_numpy(digits.images)).numpy()
    classes = [digits.classes[i] for i in digits.labels]
    recall = GalleryCheck(digits_gallery, manifest.space_id).recall_at_1(vectors, classes)
    assert recall > 0.5  # far above chance (10 classes)
    # ids that look like "<class>/<n>" but name the next digit: the sidecar class still counts
    wrong = tmp_path / "wrong-ids"
    _regallery(
        digits_gallery,
        wrong,
        ids=lambda meta: [
            f"{(int(c) + 1) % 10}/{n}" for n, c in zip(meta.labels, meta.classes, strict=True)
        ],
        classes=lambda meta: meta.classes,
    )
    hit = Gallery.open(wrong).search(vectors[:1], k=1)[0][0]
    assert hit.class_name == classes[0] and not hit.id.startswith(f"{classes[0]}/")
    assert GalleryCheck(wrong, manifest.space_id).recall_at_1(vectors, classes) == recall


def test_gallery_without_classes_cannot_check_recall(digits_run, digits_gallery, tmp_path):
    _, _, run_dir = digits_run
    query, heads, _ = _dirs(run_dir)
    bare = tmp_path / "no-classes"
    _regallery(digits_gallery, bare, ids=lambda meta: meta.ids, classes=lambda meta: None)
    query_vector = np.eye(1, read_manifest(bare).dim, dtype=np.float32)
    assert Gallery.open(bare).search(query_vector, k=1)[0][0].class_name is None
    plan = ExportPlan(
        model_dir=query,
        heads_dir=heads,
        jobs=[("onnx", "fp32")],
        validation="digits",
        n_validation=256,
        gallery=bare,
        out=tmp_path / "bundle",
    )
    with pytest.raises(ExportError, match=r"has no class label .*: rebuild the gallery") as err:
        export_bundle(plan, progress=False)
    assert str(bare) in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "bundle").exists()  # refused before anything was exported


@pytest.mark.skipif(platform.system() != "Darwin", reason="Core ML predictions need macOS")
def test_coreml_predictions_match_torch(exported):
    run_dir, bundle, result, _ = exported
    query, heads, _ = _dirs(run_dir)
    source = load_export_source(query, heads)
    images = load_digits().images[:100]
    with torch.no_grad():
        reference = source.graph(torch.from_numpy(images)).numpy()
    for quant, floor in (("fp32", 0.9999), ("fp16", 0.999), ("int8", 0.98)):
        a = find_artifact(result.manifest, "coreml", quant)
        out = open_runtime("coreml", bundle / a.file, a).run(images)
        assert (out * reference).sum(1).mean() >= floor


def test_tampered_artifact_is_refused(exported, tmp_path):
    _, bundle, result, _ = exported
    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    verify_bundle(copy)
    onnx = find_artifact(result.manifest, "onnx", "int8")
    data = bytearray((copy / onnx.file).read_bytes())
    data[len(data) // 2] ^= 1
    (copy / onnx.file).write_bytes(bytes(data))
    with pytest.raises(BundleError, match=f"{onnx.file}: sha256"):
        verify_bundle(copy)
    # only the artifacts asked for are checked
    verify_bundle(copy, [find_artifact(result.manifest, "onnx", "fp32")])
    package = find_artifact(result.manifest, "coreml", "fp16").file
    weights = next(p for p in (copy / package).rglob("*") if p.is_file() and p.stat().st_size > 0)
    weights.write_bytes(weights.read_bytes() + b"x")
    with pytest.raises(BundleError, match=package):
        verify_bundle(copy, [find_artifact(result.manifest, "coreml", "fp16")])


# ---------------------------------------------------------------------------- the format


def _manifest(files: dict[str, str]) -> BundleManifest:
    return BundleManifest(
        space_id="space-1",
        mode="unified",
        input_spec=InputSpec(8, 8, 1),
        embedding_dim=4,
        query_fingerprint="fp",
        artifacts=[
            Artifact(
                target,
                "fp32",
                file,
                1,
                "0" * 64,
                "query",
                "images",
                [-1, 8, 8, 1],
                "uint8",
                "embedding",
                [-1, 4],
                Validation("onnxruntime", 256, 0.99, 0.999),
            )
            for file, target in files.items()
        ],
    )


def test_bundle_manifest_round_trip_and_strict_reading(tmp_path):
    m = _manifest({"query.onnx": "onnx"})
    write_bundle_manifest(tmp_path, m)
    assert read_bundle_manifest(tmp_path) == m
    d = json.loads((tmp_path / MANIFEST_FILE).read_text())
    v1 = json.loads(json.dumps(d))  # a version 1 manifest: no deployment_target
    v1["format_version"] = 1
    del v1["artifacts"][0]["deployment_target"]
    (tmp_path / MANIFEST_FILE).write_text(json.dumps(v1))
    assert read_bundle_manifest(tmp_path).artifacts == m.artifacts
    cases = [
        (lambda d: d.pop("space_id"), "missing key 'space_id'"),
        (lambda d: d.update(colour="red"), r"unknown key\(s\) \['colour'\]"),
        (lambda d: d.update(format_version=99), "unknown format_version 99"),
        (lambda d: d["artifacts"][0].update(deployment_target="iOS17"), "deployment_target'"),
        (lambda d: d["artifacts"][0].update(file="../query.onnx"), "must be a plain file name"),
        (lambda d: d["artifacts"][0].update(file="query.pte"), "must be a file name ending in"),
        (lambda d: d["artifacts"][0].update(sha256="xyz"), "sha256' must be a hex sha256"),
        (lambda d: d["artifacts"][0].update(input_shape=[-1, 9, 9, 1]), "does not match"),
        (lambda d: d["artifacts"][0]["validation"].update(cosine_min=2.0), "cosine_min'"),
        (lambda d: d["input_spec"].update(channels=2), r"input_spec.channels' must be one of"),
        (lambda d: d.update(created="yesterday"), "must be an ISO 8601 UTC time"),
    ]
    for change, message in cases:
        bad = json.loads(json.dumps(d))
        change(bad)
        (tmp_path / MANIFEST_FILE).write_text(json.dumps(bad))
        with pytest.raises(BundleError, match=message):
            read_bundle_manifest(tmp_path)
    with pytest.raises(BundleError, match="missing in"):
        read_bundle_manifest(tmp_path / "nowhere")
    with pytest.raises(BundleError, match="no executorch/int8 artifact for 'query'"):
        find_artifact(m, "executorch", "int8")


def test_directory_digest_is_deterministic_and_refuses_symlinks(tmp_path):
    pkg = tmp_path / "query.fp16.mlpackage"
    (pkg / "Data" / "w").mkdir(parents=True)
    (pkg / "Manifest.json").write_text("{}")
    (pkg / "Data" / "w" / "weight.bin").write_bytes(b"abc")
    first = path_digest(pkg)
    assert first[0] == 5 and path_digest(pkg) == first
    (pkg / "Data" / "w" / "weight.bin").rename(pkg / "Data" / "weight.bin")  # same bytes, moved
    assert path_digest(pkg)[1] != first[1]
    os.symlink("/etc/hostname", pkg / "Data" / "link")
    with pytest.raises(BundleError, match="not a regular file"):
        path_digest(pkg)


# ---------------------------------------------------------------------------- the CLI


def test_cli_refuses_existing_out_without_force(digits_run, tmp_path):
    _, _, run_dir = digits_run
    query, heads, _ = _dirs(run_dir)
    out = tmp_path / "bundle"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    args = [
        "--model",
        str(query),
        "--heads",
        str(heads),
        "--target",
        "onnx",
        "--validation",
        "digits",
        "--validation-images",
        "256",
        "--out",
        str(out),
    ]
    result = CliRunner().invoke(export_cli, args)
    assert (
        result.exit_code == errors.ExportError.exit_code and "exists; pass --force" in result.output
    )
    assert (out / "keep.txt").read_text() == "mine"
    result = CliRunner().invoke(export_cli, [*args, "--force", "--json"])
    assert result.exit_code == 0, result.output
    manifest = json.loads(result.output[result.output.index("{") :])
    assert [a["file"] for a in manifest["artifacts"]] == ["query.onnx"]
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST_FILE, "query.onnx"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]  # nothing staged left


def test_cli_coreml_target_and_palettization(digits_run, tmp_path):
    """--coreml-target reaches the package and the manifest; iOS18 palettes are checked too."""
    _, _, run_dir = digits_run
    query, heads, _ = _dirs(run_dir)
    out = tmp_path / "bundle"
    args = [
        "--model",
        str(query),
        "--heads",
        str(heads),
        "--target",
        "coreml",
        "--target",
        "onnx",
        "--quantize",
        "pal6",
        "--coreml-target",
        "iOS18",
        "--validation",
        "digits",
        "--validation-images",
        "256",
        "--out",
        str(out),
    ]
    result = CliRunner().invoke(export_cli, args)
    assert result.exit_code == 0, result.output
    assert "note: onnx does not offer pal6; left out" in result.output
    assert "query.pal6.mlpackage" in result.output and "[iOS18]" in result.output
    (a,) = read_bundle_manifest(out).artifacts
    assert (a.target, a.file, a.deployment_target) == ("coreml", "query.pal6.mlpackage", "iOS18")
    assert _spec_version(out / a.file) == 9  # iOS18 / macOS15
    luts = _luts(out / a.file)  # iOS18 tables: (..., 64 entries, vector size 1)
    assert luts and {(dtype, shape[-2:]) for dtype, shape in luts} == {("float16", (64, 1))}


def test_cli_refuses_options_without_their_target(digits_run, tmp_path):
    _, _, run_dir = digits_run
    query, heads, _ = _dirs(run_dir)
    args = [
        "--model",
        str(query),
        "--heads",
        str(heads),
        "--validation",
        "digits",
        "--out",
        str(tmp_path / "b"),
    ]
    result = CliRunner().invoke(export_cli, [*args, "--target", "onnx", "--quantize", "pal4"])
    assert result.exit_code == errors.ExportError.exit_code
    assert "onnx does not offer pal4; left out" in result.output
    assert "nothing to export" in result.output
    result = CliRunner().invoke(export_cli, [*args, "--target", "coreml", "--ort-format"])
    assert (
        result.exit_code == errors.ExportError.exit_code
        and "--ort-format converts the ONNX artifacts" in result.output
    )
    result = CliRunner().invoke(export_cli, [*args, "--coreml-target", "iOS15"])
    assert result.exit_code == 2 and "'iOS15' is not one of" in result.output
    assert not (tmp_path / "b").exists()


def test_failed_export_leaves_nothing(tmp_path):
    out = tmp_path / "bundle"
    with pytest.raises(RuntimeError, match="boom"), staged_folder(out, force=False) as folder:
        (folder / "query.onnx").write_bytes(b"half")
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------- bad input


def test_checkpoint_without_input_spec(digits_run, tmp_path):
    _, _, run_dir = digits_run
    query, _, _ = _dirs(run_dir)
    bad = tmp_path / "query"
    shutil.copytree(query, bad)
    config = json.loads((bad / "config.json").read_text())
    del config["input_spec"], config["identity"]["input_spec"]
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(errors.CheckpointError, match=r"missing key '(identity\.)?input_spec'"):
        load_export_source(bad, None)


def test_heads_of_another_query_model_are_refused(digits_run):
    _, _, run_dir = digits_run
    _, heads, _ = _dirs(run_dir)
    with pytest.raises(ExportError, match="do not belong together"):
        load_export_source(run_dir / "models" / "query-old", heads)


def test_calibration_of_wrong_shape_or_too_few_images(digits_run, tmp_path):
    _, _, run_dir = digits_run
    query, heads, _ = _dirs(run_dir)
    plan = dict(
        model_dir=query,
        heads_dir=heads,
        jobs=[("onnx", "int8")],
        validation="digits",
        n_calibration=64,
        n_validation=256,
        out=tmp_path / "b",
    )
    wrong = tmp_path / "wrong.npy"
    np.save(wrong, np.zeros((100, 9, 9, 1), np.uint8))
    with pytest.raises(ExportError, match=r"takes uint8 \(N, 8, 8, 1\)"):
        export_bundle(ExportPlan(**plan, calibration=str(wrong)), progress=False)
    few = tmp_path / "few.npy"
    np.save(few, load_digits().images[:10])
    with pytest.raises(ExportError, match=r"10 images of uint8 \(N, 8, 8, 1\).*at least 64"):
        export_bundle(ExportPlan(**plan, calibration=str(few)), progress=False)
    with pytest.raises(ExportError, match="needs --calibration"):
        export_bundle(ExportPlan(**plan), progress=False)
    # a header that claims 10**10 images in a 6 KB file: refused, nothing allocated for it
    claims = tmp_path / "claims.npy"
    np.save(claims, load_digits().images[:100])
    claims.write_bytes(claims.read_bytes().replace(b"(100, 8, 8, 1)", b"(10000000000, 8, 8, 1)"))
    with pytest.raises(ExportError, match=r"claims.npy: not a plain .npy array"):
        export_bundle(ExportPlan(**plan, calibration=str(claims)), progress=False)
    with pytest.raises(ExportError, match="calibration needs at least 1 image, asked for 0"):
        export_bundle(
            ExportPlan(**{**plan, "n_calibration": 0}, calibration="digits"), progress=False
        )
    with pytest.raises(ExportError, match="onnx does not offer fp16"):
        export_bundle(ExportPlan(**{**plan, "jobs": [("onnx", "fp16")]}), progress=False)
    assert not (tmp_path / "b").exists()


class _Bessel(nn.Module):
    """An op no target takes: torch.special.i0."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.special.i0(images.float() / 255.0).flatten(1)


@pytest.mark.parametrize("target", ["onnx", "executorch", "coreml"])
def test_an_op_a_target_cannot_take_is_named(target, tmp_path):
    exporter = {"onnx": export_onnx, "executorch": export_executorch, "coreml": export_coreml}
    dtype = "float32" if target == "coreml" else "uint8"
    io = ModelIO("images", (-1, 4, 4, 1), dtype, "embedding", (-1, 16))
    with pytest.raises(UnsupportedOpError, match=rf"^{target} cannot take op\(s\) .*i0") as err:
        exporter[target](_Bessel(), io, "fp32", None, tmp_path / "m")
    assert err.value.target == target and err.value.ops and "\n" not in str(err.value)


def test_gallery_head_is_its_own_artifact(digits_run, tmp_path):
    _, _, run_dir = digits_run
    query, heads, gallery_models = _dirs(run_dir)
    plan = ExportPlan(
        model_dir=query,
        heads_dir=heads,
        jobs=[("onnx", "fp32"), ("onnx", "int8")],
        validation="digits",
        calibration="digits",
        n_calibration=256,
        n_validation=256,
        gallery_models=[gallery_models[0]],
        out=tmp_path / "b",
    )
    manifest = export_bundle(plan, progress=False).manifest
    assert [a.role for a in manifest.artifacts] == ["query", "query", "head:resnet", "head:resnet"]
    head = find_artifact(manifest, "onnx", "int8", "head:resnet")
    assert head.file == "head-resnet.int8.onnx" and head.input_dtype == "float32"
    assert head.input_shape == [-1, 32] and head.output_shape == [-1, manifest.embedding_dim]
    assert find_artifact(manifest, "onnx", "fp32", "head:resnet").validation.cosine_min >= 0.999
    assert head.validation.cosine_mean >= 0.98 and head.validation.recall_at_1_delta is None
    verify_bundle(tmp_path / "b")
    with pytest.raises(ExportError, match="no head for gallery model 'query-old'"):
        export_bundle(
            ExportPlan(
                **{
                    **plan.__dict__,
                    "out": tmp_path / "c",
                    "gallery_models": [run_dir / "models" / "query-old"],
                }
            )
        )
