"""One manifest layer: gallery manifest, bundle manifest and manifest.sig are validated by one
field spec each, bounded, depth-limited, and published as JSON Schemas that refuse and accept
exactly what the readers do (the native SDK is held to the same vectors)."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import jsonschema
import pytest
from test_gallery_format import N, edit_manifest, make_gallery

from query_sdk import Gallery
from query_sdk import bundle_format as bf
from query_sdk import gallery_format as gf
from query_sdk.errors import FormatError, SignatureError
from query_sdk.gallery_format import GalleryError, Manifest
from query_sdk.manifest import SCHEMA_DIR, published_schemas, validate
from query_sdk.signing import SIGNATURE_SPEC, generate_keys, sign_manifest, verify_manifest
from query_sdk.spec import InputSpec

SHA = "ab" * 32


def _schema(name: str) -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(json.loads((SCHEMA_DIR / name).read_text()))


GALLERY_SCHEMA = _schema("gallery-manifest.schema.json")
BUNDLE_SCHEMA = _schema("bundle-manifest.schema.json")
SIG_SCHEMA = _schema("manifest-sig.schema.json")


def _read_gallery(d):
    return Manifest.from_dict(d)


def _read_bundle(d):
    return bf.BundleManifest.from_dict(d)


def _read_sig(d):
    return validate(SIGNATURE_SPEC, d, "manifest.sig", SignatureError)


@pytest.fixture()
def gallery(tmp_path):
    folder = tmp_path / "gallery"
    folder.mkdir()
    manifest, inputs = make_gallery(folder)
    return folder, manifest, inputs


def _with_files(folder: Path, manifest: Manifest) -> Manifest:
    """Add a skipped list and a raw part, listed in ``files``, and rewrite the manifest."""
    (folder / "skipped.jsonl").write_text('{"path": "a.png", "reason": "unreadable"}\n')
    (folder / "raw").mkdir()
    (folder / "raw" / "part-00000.npz").write_bytes(b"raw embeddings")
    manifest.files = gf.describe_files(folder, ["skipped.jsonl", "raw/part-00000.npz"])
    gf.write_manifest(folder, manifest)
    return manifest


def _bundle_manifest() -> bf.BundleManifest:
    validation = bf.Validation("onnxruntime", 256, 0.99, 0.999, 0.0, "space-1")
    common = dict(
        sha256=SHA,
        input_name="images",
        input_shape=[-1, 8, 8, 1],
        input_dtype="uint8",
        output_name="embedding",
        output_shape=[-1, 4],
        validation=validation,
    )
    return bf.BundleManifest(
        space_id="space-1",
        mode="unified",
        input_spec=InputSpec(8, 8, 1),
        embedding_dim=4,
        query_fingerprint="fp",
        artifacts=[
            bf.Artifact("onnx", "fp32", "query.onnx", 10, role="query", max_batch=64, **common),
            bf.Artifact(
                "coreml",
                "fp16",
                "query.fp16.mlpackage",
                20,
                role="query",
                deployment_target="iOS17",
                **common,
            ),
            bf.Artifact(
                "onnx",
                "fp32",
                "head-g1.onnx",
                5,
                role="head:g1",
                **common | {"input_shape": [-1, 32], "input_dtype": "float32"},
            ),
        ],
        tool_version="0.1.0",
    )


# ------------------------------------------------------------------- the probe's cases


@pytest.mark.parametrize("which", ["manifest", "manifest.sig", "bundle manifest"])
def test_deep_json_is_one_line_error(tmp_path, gallery, which):
    """JSON nested 100k deep gave RecursionError (manifest.sig still did): now one line.

    manifest.sig is at most 4096 bytes: 100k deep is refused by size, 2000 deep (still a
    RecursionError for the json module) by depth."""
    folder, _, _ = gallery
    depth = 2000 if which == "manifest.sig" else 100_000
    deep = "[" * depth + "]" * depth
    if which == "manifest":
        (folder / "manifest.json").write_text(deep)
        call, error = (lambda: Gallery.open(folder)), GalleryError
    elif which == "manifest.sig":
        secret, public = generate_keys(tmp_path / "k")
        sign_manifest(folder, secret)
        (folder / "manifest.sig").write_text("[" * 100_000 + "]" * 100_000)
        with pytest.raises(SignatureError, match="200000 bytes, more than the 4096"):
            Gallery.open(folder, public_key=public)
        (folder / "manifest.sig").write_text(deep)
        call, error = (lambda: Gallery.open(folder, public_key=public)), SignatureError
    else:
        write_dir = tmp_path / "bundle"
        write_dir.mkdir()
        (write_dir / "manifest.json").write_text(deep)
        call, error = (lambda: bf.read_bundle_manifest(write_dir)), bf.BundleError
    with pytest.raises(error) as err:
        call()
    text = str(err.value)
    assert "\n" not in text and "nested deeper than 64 levels" in text
    assert ("manifest.sig" if which == "manifest.sig" else "manifest.json") in text


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("ef_search", 2**64),
        ("ef_search", 0),
        ("ef_construction", 2**40),
        ("M", 1),
        ("M", 10**6),
    ],
)
def test_hnsw_numbers_beyond_bounds_refused_by_verify(gallery, key, value):
    """ef_search = 2**64 passed verify and then TypeErrored inside hnswlib."""
    folder, _, _ = gallery
    edit_manifest(folder, lambda d: d["hnsw"].update({key: value}))
    with pytest.raises(GalleryError, match=rf"key 'hnsw\.{key}' must be an int in \[") as err:
        gf.verify_gallery(folder)
    assert str(value) in str(err.value) and "manifest.json" in str(err.value)
    with pytest.raises(GalleryError, match=f"hnsw.{key}"):
        Gallery.open(folder)


@pytest.mark.parametrize(
    ("change", "path"),
    [
        (lambda d: d.update(dim=10**9), "dim"),
        (lambda d: d["shards"][0].update(count=2**40), r"shards\[0\]\.count"),
        (lambda d: d["shards"][0].update(deleted=-1), r"shards\[0\]\.deleted"),
        (
            lambda d: d["shards"][0]["files"]["shard-00000.hnsw"].update(bytes=2**62),
            r'shards\[0\]\.files\["shard-00000\.hnsw"\]\.bytes',
        ),
        (lambda d: d.update(skipped=2**64), "skipped"),
    ],
)
def test_sizes_beyond_bounds_refused(gallery, change, path):
    folder, _, _ = gallery
    edit_manifest(folder, change)
    with pytest.raises(GalleryError, match=rf"key '{path}' must be an int in \["):
        gf.read_manifest(folder)


def test_input_spec_too_large_is_one_line_bundle_error(tmp_path):
    """input_spec 20000 x 20000 gave a traceback; the bundle reader names the key."""
    bf.write_bundle_manifest(tmp_path, _bundle_manifest())
    d = json.loads((tmp_path / "manifest.json").read_text())
    d["input_spec"].update(height=20000, width=20000)
    (tmp_path / "manifest.json").write_text(json.dumps(d))
    with pytest.raises(bf.BundleError) as err:
        bf.read_bundle_manifest(tmp_path)
    assert "\n" not in str(err.value)
    assert "key 'input_spec.height' must be an int in [1, 4096], got 20000" in str(err.value)


# ------------------------------------------------------------------- files outside shards


def test_files_outside_shards_are_verified(gallery):
    folder, manifest, _ = gallery
    manifest = _with_files(folder, manifest)
    read = gf.verify_gallery(folder)
    assert read.format_version == 2
    assert set(read.files) == {"skipped.jsonl", "raw/part-00000.npz"}
    assert read.files["raw/part-00000.npz"]["bytes"] == len(b"raw embeddings")

    skipped = folder / "skipped.jsonl"
    original = skipped.read_bytes()
    skipped.write_bytes(original.replace(b"a.png", b"b.png"))  # same size, other content
    with pytest.raises(GalleryError, match=r"skipped\.jsonl: sha256 .* manifest\.json says"):
        gf.verify_gallery(folder)
    skipped.write_bytes(original + b"{}\n")
    with pytest.raises(GalleryError, match=r"skipped\.jsonl: \d+ bytes, manifest\.json says"):
        gf.verify_gallery(folder)
    skipped.unlink()
    with pytest.raises(GalleryError, match=r"skipped\.jsonl: file listed in manifest.json missing"):
        gf.verify_gallery(folder)
    os.mkfifo(skipped)  # a FIFO must not hang the check
    with pytest.raises(GalleryError, match="not a regular file"):
        gf.verify_gallery(folder)
    skipped.unlink()
    skipped.write_bytes(original)
    gf.verify_gallery(folder)
    # a phone that downloaded only the shards still opens them
    (folder / "raw" / "part-00000.npz").unlink()
    assert Gallery.open(folder).count == 2 * N


@pytest.mark.parametrize(
    "name",
    ["../x", "raw/../x", "a/b/c", "/etc/passwd", ".hidden", "raw/", "a\\b", "manifest.sig", ""],
)
def test_bad_names_in_files_refused(gallery, name):
    folder, _, _ = gallery
    edit_manifest(folder, lambda d: d["files"].update({name: {"bytes": 1, "sha256": SHA}}))
    with pytest.raises(GalleryError, match="relative file name with at most one sub-folder"):
        gf.read_manifest(folder)


def test_files_symlinked_outside_refused(gallery, tmp_path):
    folder, manifest, _ = gallery
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "part-00000.npz").write_bytes(b"x")
    (folder / "raw").symlink_to(outside)
    manifest.files = {"raw/part-00000.npz": {"bytes": 1, "sha256": SHA}}
    gf.write_manifest(folder, manifest)
    with pytest.raises(GalleryError, match="outside the gallery folder"):
        gf.verify_gallery(folder)


def test_file_listed_twice_refused(gallery):
    folder, _, _ = gallery
    entry = {"bytes": 1, "sha256": SHA}
    edit_manifest(folder, lambda d: d["files"].update({"shard-00000.hnsw": entry}))
    with pytest.raises(GalleryError, match="'shard-00000.hnsw' is listed more than once"):
        gf.read_manifest(folder)


def test_version_1_gallery_still_opens(gallery):
    folder, manifest, inputs = gallery

    def to_v1(d):
        d["format_version"] = 1
        del d["files"]

    edit_manifest(folder, to_v1)
    read = gf.verify_gallery(folder)
    assert (read.format_version, read.files) == (1, {})
    assert "files" not in read.to_dict()
    assert Manifest.from_dict(read.to_dict()) == read
    hits = Gallery.open(folder).search(inputs[0]["vectors"][:1], k=1)
    assert hits[0][0].id == inputs[0]["ids"][0]
    # version 1 has no 'files'; a writer always writes the current version
    edit_manifest(folder, lambda d: d.update(files={}))
    with pytest.raises(GalleryError, match=r"unknown key\(s\) \['files'\]"):
        gf.read_manifest(folder)
    gf.write_manifest(folder, read)
    assert json.loads((folder / "manifest.json").read_text())["format_version"] == 2


def test_signature_file_checked_through_one_spec(gallery, tmp_path):
    folder, _, _ = gallery
    secret, public = generate_keys(tmp_path / "k")
    path = sign_manifest(folder, secret)
    assert sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp")) == []
    data = gf.read_manifest_bytes(folder)
    verify_manifest(folder, data, public)
    record = json.loads(path.read_text())
    for change, message in [
        ({"algorithm": "rsa"}, "key 'algorithm' must be 'ed25519', got 'rsa'"),
        ({"signature": "zz" * 64}, "key 'signature' must be 128 lowercase hex digits"),
        ({"signed_by": "me"}, r"unknown key\(s\) \['signed_by'\]"),
    ]:
        path.write_text(json.dumps(record | change))
        with pytest.raises(SignatureError, match=message):
            verify_manifest(folder, data, public)
    path.write_text(" " * 5000)
    with pytest.raises(SignatureError, match="more than the 4096"):
        verify_manifest(folder, data, public)


# ------------------------------------------------------------------- schemas


def test_shipped_schemas_are_generated_from_the_specs():
    """The published files are exactly what the readers' field specs say (no drift)."""
    generated = published_schemas()
    shipped = {p.name: json.loads(p.read_text()) for p in SCHEMA_DIR.glob("*.schema.json")}
    assert shipped == generated, "regenerate them: python -m query_sdk.manifest"
    for schema in shipped.values():
        jsonschema.Draft202012Validator.check_schema(schema)


def test_writers_output_validates(gallery, tmp_path):
    folder, manifest, _ = gallery
    _with_files(folder, manifest)
    GALLERY_SCHEMA.validate(json.loads((folder / "manifest.json").read_text()))
    secret, _ = generate_keys(tmp_path / "k")
    SIG_SCHEMA.validate(json.loads(sign_manifest(folder, secret).read_text()))
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    bf.write_bundle_manifest(bundle, _bundle_manifest())
    BUNDLE_SCHEMA.validate(json.loads((bundle / "manifest.json").read_text()))


def _gallery_dict(tmp_path: Path) -> dict:
    folder = tmp_path / "g"
    folder.mkdir()
    manifest, _ = make_gallery(folder, n_shards=1)
    _with_files(folder, manifest)
    return json.loads((folder / "manifest.json").read_text())


def _bundle_dict() -> dict:
    return _bundle_manifest().to_dict()


def _sig_dict() -> dict:
    return {"algorithm": "ed25519", "public_key": "cd" * 32, "signature": "ef" * 64}


def _set(path: tuple, value):
    """A change that sets (or with ``_DELETE`` removes) the value at ``path``."""

    def change(d):
        *parents, last = path
        for p in parents:
            d = d[p]
        if value is _DELETE:
            del d[last]
        else:
            d[last] = value

    return change


_DELETE = object()
_F = ("shards", 0, "files", "shard-00000.hnsw")
GALLERY_BAD = {
    "version 0": _set(("format_version",), 0),
    "version true": _set(("format_version",), True),
    "version as text": _set(("format_version",), "2"),
    "no version": _set(("format_version",), _DELETE),
    "no space_id": _set(("space_id",), _DELETE),
    "empty space_id": _set(("space_id",), ""),
    "dim 0": _set(("dim",), 0),
    "dim 2**16+1": _set(("dim",), 2**16 + 1),
    "dim 16.5": _set(("dim",), 16.5),
    "dim true": _set(("dim",), True),
    "metric l2": _set(("metric",), "l2"),
    "M 1": _set(
        (
            "hnsw",
            "M",
        ),
        1,
    ),
    "ef_search 2**64": _set(
        (
            "hnsw",
            "ef_search",
        ),
        2**64,
    ),
    "ef_search null": _set(
        (
            "hnsw",
            "ef_search",
        ),
        None,
    ),
    "hnsw extra key": _set(
        (
            "hnsw",
            "ef",
        ),
        10,
    ),
    "no ef_construction": _set(
        (
            "hnsw",
            "ef_construction",
        ),
        _DELETE,
    ),
    "model name not str": _set(
        (
            "gallery_models",
            0,
            "name",
        ),
        3,
    ),
    "heads a list": _set(("heads",), []),
    "quantile key 1.5": _set(
        (
            "uncertainty_quantiles",
            "1.5",
        ),
        0.2,
    ),
    "quantile key nan": _set(
        (
            "uncertainty_quantiles",
            "nan",
        ),
        0.2,
    ),
    "quantile value text": _set(
        (
            "uncertainty_quantiles",
            "0.5",
        ),
        "0.2",
    ),
    "shards not a list": _set(("shards",), {}),
    "count negative": _set(
        (
            "shards",
            0,
            "count",
        ),
        -1,
    ),
    "count 2**31": _set(
        (
            "shards",
            0,
            "count",
        ),
        2**31,
    ),
    "index_file with path": _set(
        (
            "shards",
            0,
            "index_file",
        ),
        "x/shard.hnsw",
    ),
    "index_file hidden": _set(
        (
            "shards",
            0,
            "index_file",
        ),
        ".shard.hnsw",
    ),
    "index_file manifest": _set(
        (
            "shards",
            0,
            "index_file",
        ),
        "manifest.json",
    ),
    "shard extra key": _set(
        (
            "shards",
            0,
            "level",
        ),
        3,
    ),
    "three shard files": _set(
        (
            "shards",
            0,
            "files",
            "extra.hnsw",
        ),
        {"bytes": 1, "sha256": SHA},
    ),
    "sha256 upper case": _set((*_F, "sha256"), SHA.upper()),
    "sha256 short": _set((*_F, "sha256"), "ab"),
    "bytes negative": _set((*_F, "bytes"), -1),
    "bytes 2**40+1": _set((*_F, "bytes"), 2**40 + 1),
    "file entry extra key": _set((*_F, "mtime"), 0),
    "rejected id not str": _set(
        (
            "rejected",
            0,
            "id",
        ),
        1,
    ),
    "rejected without uncertainty": _set(
        (
            "rejected",
            0,
            "uncertainty",
        ),
        _DELETE,
    ),
    "skipped negative": _set(("skipped",), -3),
    "created not a time": _set(("created",), "yesterday"),
    "created not UTC": _set(("created",), "2024-05-01T12:00:00+02:00"),
    "created month 13": _set(("created",), "2024-13-01T12:00:00Z"),
    "extra a list": _set(("extra",), []),
    "files a list": _set(("files",), []),
    "no files": _set(("files",), _DELETE),
    "files escape": _set(
        (
            "files",
            "../x",
        ),
        {"bytes": 1, "sha256": SHA},
    ),
    "files two levels": _set(
        (
            "files",
            "a/b/c",
        ),
        {"bytes": 1, "sha256": SHA},
    ),
    "files entry without sha256": _set(
        (
            "files",
            "skipped.jsonl",
            "sha256",
        ),
        _DELETE,
    ),
    "unknown top-level key": _set(("surprise",), 1),
}
GALLERY_GOOD = {
    "as written": lambda d: None,
    "dim 16.0 (a JSON integer)": _set(("dim",), 16.0),
    "no extra": _set(("extra",), _DELETE),
    "created +00:00 with fraction": _set(("created",), "2024-05-01T12:00:00.5+00:00"),
    "model entries may carry more": _set(
        (
            "gallery_models",
            0,
            "note",
        ),
        "x",
    ),
    "empty files": _set(("files",), {}),
}
BUNDLE_BAD = {
    "version 3": _set(("format_version",), 3),
    "mode other": _set(("mode",), "both"),
    "embedding_dim 0": _set(("embedding_dim",), 0),
    "no artifacts": _set(("artifacts",), []),
    "input_spec 20000": _set(
        (
            "input_spec",
            "height",
        ),
        20000,
    ),
    "input_spec channels 2": _set(
        (
            "input_spec",
            "channels",
        ),
        2,
    ),
    "input_spec std 0": _set(
        (
            "input_spec",
            "std",
        ),
        [0.0],
    ),
    "input_spec four means": _set(
        (
            "input_spec",
            "mean",
        ),
        [0.1, 0.2, 0.3, 0.4],
    ),
    "input_spec dtype": _set(
        (
            "input_spec",
            "dtype",
        ),
        "float32",
    ),
    "input_spec unknown": _set(
        (
            "input_spec",
            "colour",
        ),
        "rgb",
    ),
    "target tflite": _set(
        (
            "artifacts",
            0,
            "target",
        ),
        "tflite",
    ),
    "quantization int4": _set(
        (
            "artifacts",
            0,
            "quantization",
        ),
        "int4",
    ),
    "file escape": _set(
        (
            "artifacts",
            0,
            "file",
        ),
        "../query.onnx",
    ),
    "file of another target": _set(
        (
            "artifacts",
            0,
            "file",
        ),
        "query.pte",
    ),
    "bytes 0": _set(
        (
            "artifacts",
            0,
            "bytes",
        ),
        0,
    ),
    "sha256 not hex": _set(
        (
            "artifacts",
            0,
            "sha256",
        ),
        "xyz",
    ),
    "role other": _set(
        (
            "artifacts",
            0,
            "role",
        ),
        "gallery",
    ),
    "head role with slash": _set(
        (
            "artifacts",
            2,
            "role",
        ),
        "head:a/b",
    ),
    "shape with 0": _set(
        (
            "artifacts",
            0,
            "input_shape",
        ),
        [-1, 0, 8, 1],
    ),
    "shape with -2": _set(
        (
            "artifacts",
            0,
            "input_shape",
        ),
        [-2, 8, 8, 1],
    ),
    "shape empty": _set(
        (
            "artifacts",
            0,
            "input_shape",
        ),
        [],
    ),
    "output_shape 3-D": _set(
        (
            "artifacts",
            0,
            "output_shape",
        ),
        [-1, 4, 1],
    ),
    "input_dtype int64": _set(
        (
            "artifacts",
            0,
            "input_dtype",
        ),
        "int64",
    ),
    "max_batch 0": _set(
        (
            "artifacts",
            0,
            "max_batch",
        ),
        0,
    ),
    "max_batch 2**32": _set(
        (
            "artifacts",
            0,
            "max_batch",
        ),
        2**32,
    ),
    "deployment_target for onnx": _set(
        (
            "artifacts",
            0,
            "deployment_target",
        ),
        "iOS17",
    ),
    "deployment_target iOS9": _set(
        (
            "artifacts",
            1,
            "deployment_target",
        ),
        "iOS9",
    ),
    "cosine 2": _set(
        (
            "artifacts",
            0,
            "validation",
            "cosine_min",
        ),
        2.0,
    ),
    "cosine null with images": _set(
        (
            "artifacts",
            0,
            "validation",
            "cosine_min",
        ),
        None,
    ),
    "cosine without images": _set(
        (
            "artifacts",
            0,
            "validation",
            "images",
        ),
        0,
    ),
    "delta without space": _set(
        (
            "artifacts",
            0,
            "validation",
            "gallery_space_id",
        ),
        None,
    ),
    "delta 2": _set(
        (
            "artifacts",
            0,
            "validation",
            "recall_at_1_delta",
        ),
        2.0,
    ),
    "validation extra key": _set(
        (
            "artifacts",
            0,
            "validation",
            "seed",
        ),
        1,
    ),
    "artifact extra key": _set(
        (
            "artifacts",
            0,
            "colour",
        ),
        "red",
    ),
    "created not a time": _set(("created",), "now"),
    "extra a list": _set(("extra",), []),
}
BUNDLE_GOOD = {
    "as written": lambda d: None,
    "version 1": _set(("format_version",), 1),
    "no deployment_target": _set(
        (
            "artifacts",
            0,
            "deployment_target",
        ),
        _DELETE,
    ),
    "coreml without deployment_target": _set(
        (
            "artifacts",
            1,
            "deployment_target",
        ),
        None,
    ),
    "no delta and no space": lambda d: (
        _set(
            (
                "artifacts",
                0,
                "validation",
                "recall_at_1_delta",
            ),
            _DELETE,
        )(d),
        _set(
            (
                "artifacts",
                0,
                "validation",
                "gallery_space_id",
            ),
            _DELETE,
        )(d),
    ),
    "null extra": _set(("extra",), None),
    "no input_spec defaults": lambda d: [d["input_spec"].pop(k) for k in ("mean", "std")],
}
SIG_BAD = {
    "algorithm rsa": _set(("algorithm",), "rsa"),
    "no signature": _set(("signature",), _DELETE),
    "signature short": _set(("signature",), "ef" * 63),
    "signature upper case": _set(("signature",), "EF" * 64),
    "public key not hex": _set(("public_key",), "zz" * 32),
    "extra key": _set(("comment",), "x"),
}
SIG_GOOD = {"as written": lambda d: None, "no public key": _set(("public_key",), _DELETE)}


def _corpus():
    for kind, bad, good in (
        ("gallery", GALLERY_BAD, GALLERY_GOOD),
        ("bundle", BUNDLE_BAD, BUNDLE_GOOD),
        ("sig", SIG_BAD, SIG_GOOD),
    ):
        for name, change in bad.items():
            yield pytest.param(kind, change, False, id=f"{kind}: refuse {name}")
        for name, change in good.items():
            yield pytest.param(kind, change, True, id=f"{kind}: accept {name}")


@pytest.mark.parametrize(("kind", "change", "accept"), list(_corpus()))
def test_schema_and_reader_decide_alike(tmp_path, kind, change, accept):
    d = {"gallery": lambda: _gallery_dict(tmp_path), "bundle": _bundle_dict, "sig": _sig_dict}[
        kind
    ]()
    change(d)
    schema = {"gallery": GALLERY_SCHEMA, "bundle": BUNDLE_SCHEMA, "sig": SIG_SCHEMA}[kind]
    read = {"gallery": _read_gallery, "bundle": _read_bundle, "sig": _read_sig}[kind]
    assert schema.is_valid(d) == accept
    if accept:
        read(d)
    else:
        with pytest.raises(FormatError) as err:
            read(d)
        assert "\n" not in str(err.value)


# values put at every node of a good document (and every key removed): the schema and the
# field spec must agree on each one (the checks between values, which JSON Schema cannot
# state, are left out here)
_PROBES = [None, True, 0, 1, -1, 16.0, 1.5, 2**64, "", "x", "0.5", [], {}, SHA, "iOS17"]


def _paths(d, path=()):
    """Every node's path, the root's ``()`` first."""
    yield path
    children = d.items() if isinstance(d, dict) else enumerate(d) if isinstance(d, list) else ()
    for k, v in children:
        yield from _paths(v, (*path, k))


def _put(d, path, value):
    """A copy of ``d`` with ``value`` at ``path`` (``_DELETE``: that object key removed)."""
    if not path:
        return value
    d = copy.deepcopy(d)
    target = d
    for p in path[:-1]:
        target = target[p]
    if value is not _DELETE:
        target[path[-1]] = value
    elif isinstance(target, dict):
        del target[path[-1]]
    return d


@pytest.mark.parametrize("kind", ["gallery", "bundle", "sig"])
def test_schema_and_field_spec_agree_on_every_node(tmp_path, kind):
    good = {"gallery": lambda: _gallery_dict(tmp_path), "bundle": _bundle_dict, "sig": _sig_dict}[
        kind
    ]()
    schema = {"gallery": GALLERY_SCHEMA, "bundle": BUNDLE_SCHEMA, "sig": SIG_SCHEMA}[kind]
    spec = {"gallery": gf.MANIFEST_SPEC, "bundle": bf.MANIFEST_SPEC, "sig": SIGNATURE_SPEC}[kind]
    checked = disagree = 0
    for path in _paths(good):
        for value in [*_PROBES, _DELETE, {"unknown": 1}]:
            d = _put(good, path, value)
            by_spec = spec.accepts(d)
            if schema.is_valid(d) != by_spec:
                disagree += 1
                print("disagree:", path, repr(value), "spec accepts:", by_spec)
            checked += 1
    assert checked >= 3 * len(_PROBES) and disagree == 0


def test_cross_value_checks_are_the_readers(gallery):
    """What JSON Schema cannot state (listed in each schema's description): the schema
    accepts these, the reader refuses them."""
    folder, _, _ = gallery
    d = json.loads((folder / "manifest.json").read_text())
    cases = [
        (
            _set(
                (
                    "shards",
                    0,
                    "deleted",
                ),
                N + 1,
            ),
            "deleted .* exceeds count",
        ),
        (
            _set(
                (
                    "shards",
                    1,
                ),
                copy.deepcopy(d["shards"][0]),
            ),
            "listed more than once",
        ),
        (_set(("created",), "2024-02-30T12:00:00Z"), "ISO 8601 UTC"),
    ]
    for change, message in cases:
        bad = copy.deepcopy(d)
        change(bad)
        assert GALLERY_SCHEMA.is_valid(bad)
        with pytest.raises(GalleryError, match=message):
            Manifest.from_dict(bad)
    b = _bundle_dict()
    for change, message in [
        (
            _set(
                (
                    "artifacts",
                    0,
                    "output_shape",
                ),
                [-1, 5],
            ),
            r"must be \[N, 4\]",
        ),
        (
            _set(
                (
                    "artifacts",
                    0,
                    "input_shape",
                ),
                [-1, 9, 9, 1],
            ),
            "does not match input_spec",
        ),
        (
            _set(
                (
                    "artifacts",
                    2,
                    "file",
                ),
                "query.onnx",
            ),
            "listed more than once",
        ),
    ]:
        bad = copy.deepcopy(b)
        change(bad)
        assert BUNDLE_SCHEMA.is_valid(bad)
        with pytest.raises(bf.BundleError, match=message):
            bf.BundleManifest.from_dict(bad)


def test_round_trip_keeps_values(gallery):
    folder, manifest, _ = gallery
    manifest = _with_files(folder, manifest)
    assert gf.read_manifest(folder) == manifest
    m = _bundle_manifest()
    assert bf.BundleManifest.from_dict(m.to_dict()) == m
