"""Bounded resources and one-line errors at the edge (issue 12): image pixel budgets, regular
files only, k bounded by the gallery, input-spec bounds, ONNX models that differ from their
manifest, crafted ExecuTorch programs, and cmce-query's error map.

Whatever could hang, abort or take gigabytes on the old code runs in a child process, so the
old code fails these tests instead of taking pytest down."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_gallery_format import DIM, N, make_gallery, unit_vectors

from query_sdk.bundle_format import (
    Artifact,
    BundleError,
    BundleManifest,
    Validation,
    path_digest,
    read_bundle_manifest,
    write_bundle_manifest,
)
from query_sdk.errors import BackendError
from query_sdk.images import ImageError, load_image
from query_sdk.runtimes import open_runtime
from query_sdk.shards import Gallery
from query_sdk.spec import InputSpec, to_model_input

SPEC = InputSpec(8, 8, 1)
SPACE = "q-abc123"  # make_gallery's space_id


def run_python(code: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter; its last stdout line is JSON (see :func:`last_json`)."""
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout
    )


def last_json(out: subprocess.CompletedProcess):
    assert out.returncode == 0, f"exit {out.returncode}: {out.stderr[-2000:]}"
    return json.loads(out.stdout.strip().splitlines()[-1])


# Peak RSS of the child itself: VmHWM starts afresh at exec, while getrusage's ru_maxrss keeps
# the high-water mark of the (torch-loaded) pytest process it was forked from.
PEAK = (
    "import re\n"
    "def peak_mib():\n"
    "    status = open('/proc/self/status').read()\n"
    "    return int(re.search(r'VmHWM:\\s+(\\d+) kB', status).group(1)) / 1024\n"
)
needs_proc = pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="Linux /proc")


# --------------------------------------------------------------------------- images


def png_bomb(path: Path, width: int, height: int) -> None:
    """A grey PNG of zeros, compressed row by row (never held whole in memory)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc

    z = zlib.compressobj(9)
    row = bytes(width + 1)  # filter byte + pixels
    idat = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
    )


@needs_proc
def test_png_bomb_is_refused_from_its_header(tmp_path):
    bomb = tmp_path / "bomb.png"
    png_bomb(bomb, 13000, 13000)
    assert bomb.stat().st_size < 200_000  # 164 KB on disk, 169 M pixels
    code = PEAK + (
        "import json\n"
        "from query_sdk.images import load_image, ImageError\n"
        "from query_sdk.spec import InputSpec\n"
        "try:\n"
        f"    load_image({str(bomb)!r}, InputSpec(8, 8, 1)); error = None\n"
        "except ImageError as e:\n"
        "    error = str(e)\n"
        "print(json.dumps({'error': error, 'peak_mib': peak_mib()}))\n"
    )
    out = run_python(code)
    got = last_json(out)
    # before: decoded (837 MiB peak) after Pillow's DecompressionBombWarning
    assert got["error"] == (
        f"{bomb}: 13000x13000 pixels is more than the 16777216 an image for this 8x8 model "
        "may decode to (max(4096x4096, 4x its input)); downscale it first"
    )
    assert got["peak_mib"] < 150, got
    assert "DecompressionBomb" not in out.stderr


@needs_proc
def test_phone_photos_decode_and_huge_jpegs_decode_reduced(tmp_path):
    spec = InputSpec(224, 224, 3)
    # a 12 MP photo is under the budget: decoded in full, exactly as before
    x, y = np.meshgrid(np.arange(4000), np.arange(3000))
    rgb = np.stack([x % 256, y % 256, (x + y) // 28 % 256], axis=-1).astype(np.uint8)
    Image.fromarray(rgb).save(tmp_path / "photo.jpg", quality=90)
    with Image.open(tmp_path / "photo.jpg") as im:
        full = to_model_input(np.asarray(im.convert("RGB"))[None], spec)[0]
    assert np.array_equal(load_image(tmp_path / "photo.jpg", spec), full)
    # 182 MP is past Pillow's own refusal (179 MP); the JPEG decodes at 1/4 into the budget
    huge = tmp_path / "huge.jpg"
    make = f"from PIL import Image; Image.new('L', (14000, 13000), 77).save({str(huge)!r})"
    assert run_python(make).returncode == 0
    code = PEAK + (
        "import json\n"
        "from query_sdk.images import load_image\n"
        "from query_sdk.spec import InputSpec\n"
        f"pixels = load_image({str(huge)!r}, InputSpec(224, 224, 3))\n"
        "print(json.dumps({'shape': pixels.shape, 'values': sorted(set(pixels.ravel().tolist())),"
        " 'peak_mib': peak_mib()}))\n"
    )
    got = last_json(run_python(code))
    assert got["shape"] == [224, 224, 3] and got["values"] == [77]
    assert got["peak_mib"] < 250, got  # a full decode alone would be 182 MiB


def test_only_regular_files_are_opened_as_images(tmp_path):
    fifo = tmp_path / "query.png"
    os.mkfifo(fifo)  # opening it for reading would wait for a writer forever
    folder = tmp_path / "folder.png"
    folder.mkdir()
    paths = [str(fifo), str(folder), "/dev/zero"]
    code = (
        "import json\n"
        "from query_sdk.images import load_image, ImageError\n"
        "from query_sdk.spec import InputSpec\n"
        "errors = []\n"
        f"for p in {paths!r}:\n"
        "    try:\n"
        "        load_image(p, InputSpec(8, 8, 1)); errors.append(None)\n"
        "    except ImageError as e:\n"
        "        errors.append(str(e))\n"
        "print(json.dumps(errors))\n"
    )
    got = last_json(run_python(code, timeout=60))  # before: the FIFO hung
    assert got == [f"{p}: the image is not a regular file" for p in paths]


def test_opened_pil_files_get_the_same_budget(tmp_path):
    png_bomb(tmp_path / "bomb.png", 5000, 5000)
    # opened lazily: nothing decoded yet
    with (
        Image.open(tmp_path / "bomb.png") as im,
        pytest.raises(ImageError, match="5000x5000 pixels is more than the 16777216"),
    ):
        load_image(im, SPEC)
    small = Image.fromarray(np.full((8, 8), 200, np.uint8))
    assert (load_image(small, SPEC) == 200).all()


# --------------------------------------------------------------------------- k, input spec


@pytest.fixture()
def gallery(tmp_path):
    folder = tmp_path / "gallery"
    make_gallery(folder)
    return folder


def test_k_is_bounded_by_the_live_items(gallery):
    g = Gallery.open(gallery)
    q = unit_vectors(2, DIM, seed=5)
    # before: np.full((2, 10**12)) -> MemoryError; --k 100000000 took 1.35 GB
    labels, scores = g.search_labels(q, k=10**12)
    assert labels.shape == scores.shape == (2, 2 * N) and (labels >= 0).all()
    every = g.search(q, k=10**12)
    assert [len(row) for row in every] == [2 * N, 2 * N]
    assert every == g.search(q, k=2 * N)
    assert [h.id for h in every[0][:5]] == [h.id for h in g.search(q, k=5)[0]]
    # rejection pads rows to the clamped width, not to k
    labels, _ = g.search_labels(q, k=10**12, max_uncertainty=0.3)
    assert labels.shape == (2, 2 * N) and ((labels >= 0).sum(axis=1) == int(0.6 * N)).all()


def test_input_spec_is_bounded():
    with pytest.raises(ValueError, match=r"at most 4096 .*got 20000x20000"):
        InputSpec(20000, 20000, 3)
    with pytest.raises(ValueError, match="height must be an int, got 8.0"):
        InputSpec(8.0, 8, 1)
    with pytest.raises(ValueError, match="channels must be an int, got True"):
        InputSpec(8, 8, True)
    with pytest.raises(ValueError, match="mean and std must be finite"):
        InputSpec(8, 8, 1, std=(float("nan"),))
    assert InputSpec(4096, 4096, 3).shape == (4096, 4096, 3)


# --------------------------------------------------------------------------- bundles


def onnx_model(path: Path, side: int = 8, batch: str | int = "batch", dtype: str = "uint8"):
    """A real ONNX query model: (batch, side, side, 1) pixels -> L2-normalised (batch, DIM)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    elem = {"uint8": TensorProto.UINT8, "float32": TensorProto.FLOAT}[dtype]
    weights = np.random.default_rng(0).normal(size=(side * side, DIM)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Cast", ["images"], ["pixels"], to=TensorProto.FLOAT),
            helper.make_node("Reshape", ["pixels", "flat_shape"], ["flat"]),
            helper.make_node("MatMul", ["flat", "weights"], ["raw"]),
            helper.make_node("LpNormalization", ["raw"], ["embedding"], axis=1, p=2),
        ],
        "query",
        [helper.make_tensor_value_info("images", elem, [batch, side, side, 1])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, [batch, DIM])],
        [
            numpy_helper.from_array(np.array([-1, side * side], np.int64), "flat_shape"),
            numpy_helper.from_array(weights, "weights"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def artifact(folder: Path, file: str, target: str = "onnx", **changes) -> Artifact:
    size, digest = path_digest(folder / file)
    a = Artifact(
        target=target,
        quantization="fp32",
        file=file,
        bytes=size,
        sha256=digest,
        role="query",
        input_name="images",
        input_shape=[-1, 8, 8, 1],
        input_dtype="uint8",
        output_name="embedding",
        output_shape=[-1, DIM],
        validation=Validation("onnxruntime" if target == "onnx" else target, 0, None, None),
    )
    return dataclasses.replace(a, **changes)


def write_bundle(folder: Path, artifacts: list[Artifact], spec: InputSpec = SPEC) -> Path:
    manifest = BundleManifest(
        space_id=SPACE,
        mode="unified",
        input_spec=spec,
        embedding_dim=DIM,
        query_fingerprint="q",
        artifacts=artifacts,
        tool_version="test",
    )
    write_bundle_manifest(folder, manifest)
    return folder


@pytest.fixture()
def bundle(tmp_path):
    folder = tmp_path / "bundle"
    folder.mkdir()
    onnx_model(folder / "query.onnx")
    return write_bundle(folder, [artifact(folder, "query.onnx")])


def test_bundle_manifest_refuses_a_huge_input_spec(bundle):
    d = json.loads((bundle / "manifest.json").read_text())
    d["input_spec"]["height"] = d["input_spec"]["width"] = 20000
    d["artifacts"][0]["input_shape"] = [-1, 20000, 20000, 1]
    (bundle / "manifest.json").write_text(json.dumps(d))
    with pytest.raises(BundleError) as err:
        read_bundle_manifest(bundle)
    text = str(err.value)  # before: accepted (and a 1.2 GB resize per query image)
    assert text.startswith(f"{bundle / 'manifest.json'}: key 'input_spec")
    assert "4096" in text and "20000" in text and "\n" not in text


def test_onnx_model_must_take_what_the_manifest_says(bundle, tmp_path):
    a = read_bundle_manifest(bundle).artifacts[0]
    ok = open_runtime("onnxruntime", bundle / a.file, a)
    vectors = ok.run(np.zeros((3, 8, 8, 1), np.uint8) + 9)
    assert vectors.shape == (3, DIM) and np.allclose(np.linalg.norm(vectors, axis=1), 1)
    onnx_model(tmp_path / "fixed.onnx", batch=1)
    cases = [
        (bundle / a.file, {"input_shape": [-1, 16, 16, 1]}, "input 'images' has shape "
         "['batch', 8, 8, 1], the manifest says [-1, 16, 16, 1]"),
        (bundle / a.file, {"input_dtype": "float32"},
         "input 'images' is tensor(uint8), the manifest says float32"),
        (bundle / a.file, {"output_shape": [-1, 2 * DIM]},
         f"output 'embedding' has shape ['batch', {DIM}], the manifest says [-1, {2 * DIM}]"),
        (tmp_path / "fixed.onnx", {}, "input 'images' has shape [1, 8, 8, 1], the manifest "
         "says [-1, 8, 8, 1]"),
    ]  # fmt: skip
    for path, change, message in cases:
        with pytest.raises(BackendError) as err:  # before: opened, then failed in run
            open_runtime("onnxruntime", path, dataclasses.replace(a, **change))
        text = str(err.value)
        assert text.startswith("query.onnx: the model does not take what the manifest says: ")
        assert message in text and "re-export" in text and "\n" not in text


def test_searcher_refuses_a_bundle_whose_model_differs(bundle, gallery):
    from query_sdk import Searcher

    onnx_model(bundle / "query.onnx", side=16)  # the manifest still says 8x8, re-hashed
    write_bundle(bundle, [artifact(bundle, "query.onnx")])
    with pytest.raises(BackendError, match=r"shape \['batch', 16, 16, 1\], the manifest says"):
        Searcher.open(bundle=bundle, gallery=gallery)


# --------------------------------------------------------------------------- ExecuTorch


@pytest.fixture(scope="module")
def pte(tmp_path_factory) -> bytes:
    """A real .pte from the exporter: (N, 8, 8, 1) uint8 -> normalised (N, DIM)."""
    pytest.importorskip("executorch.runtime", reason="the executorch extra is not installed")
    import torch
    from torch import nn

    from export.executorch import export_executorch
    from export.graph import query_io

    class Tiny(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(64, DIM)

        def forward(self, images: torch.Tensor) -> torch.Tensor:
            x = self.fc(images.to(torch.float32).flatten(1) / 255)
            return nn.functional.normalize(x, dim=1)

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("pte") / "query.pte"
    export_executorch(Tiny().eval(), query_io(SPEC, DIM), "fp32", None, path)
    return path.read_bytes()


def crafted(data: bytes) -> dict[str, bytes]:
    """Damage a crafted bundle would carry (its manifest re-hashed)."""
    rng = np.random.default_rng(1)

    def patched(start: int, new: bytes) -> bytes:
        return data[:start] + new + data[start + len(new) :]

    backend = data.index(b"XnnpackBackend")
    return {
        "identifier": patched(4, bytes.fromhex("cafebabe")),
        "truncated": data[: len(data) // 2],
        "random-tail": data[:200] + rng.integers(0, 256, len(data) - 200, np.uint8).tobytes(),
        "huge-offset": patched(24, (2**62).to_bytes(8, "little")),
        "root-offset": patched(0, (2**31 - 1).to_bytes(4, "little")),
        "backend-name": patched(backend + 2, bytes.fromhex("cafebabe")),
    }


def test_crafted_executorch_programs_are_refused_not_aborting(pte, gallery, tmp_path):
    bundles = {}
    for name, data in {"good": pte, **crafted(pte)}.items():
        folder = tmp_path / name
        folder.mkdir()
        (folder / "query.pte").write_bytes(data)
        write_bundle(folder, [artifact(folder, "query.pte", target="executorch")])
        bundles[name] = str(folder)
    code = (
        "import json, numpy as np\n"
        "from query_sdk import Searcher\n"
        "from query_sdk.errors import BackendError\n"
        "got = {}\n"
        f"for name, folder in {bundles!r}.items():\n"
        "    try:\n"
        f"        s = Searcher.open(bundle=folder, gallery={str(gallery)!r},\n"
        "                          backend='executorch')\n"
        "        got[name] = len(s.search(np.zeros((8, 8, 1), np.uint8), k=3))\n"
        "    except BackendError as e:\n"
        "        got[name] = str(e)\n"
        "print(json.dumps(got))\n"
    )
    got = last_json(run_python(code, timeout=600))  # before: SIGABRT on 'identifier'
    assert got.pop("good") == 3
    assert got["identifier"] == (
        "query.pte: not an ExecuTorch program: bytes 4-7 are cafebabe, expected 45543132 "
        "(ET12); re-export it with cmce-export"
    )
    assert "the extended header claims" in got["truncated"]
    assert "the extended header claims" in got["huge-offset"]
    assert "flatbuffer root offset 2147483647 outside" in got["root-offset"]
    assert got["random-tail"].startswith("query.pte: ExecuTorch could not load and run it")
    assert got["backend-name"].startswith("query.pte: ExecuTorch aborted (SIGABRT) loading it")
    assert all(v.startswith("query.pte: ") and "\n" not in v for v in got.values())


# --------------------------------------------------------------------------- cmce-query


def test_cmce_query_bounds_and_one_line_errors(bundle, gallery, tmp_path):
    Image.fromarray(np.full((8, 8), 120, np.uint8)).save(tmp_path / "a.png")
    os.mkfifo(tmp_path / "fifo.png")
    base = [sys.executable, "-m", "query_sdk.cli", "--bundle", str(bundle)]
    base += ["--gallery", str(gallery)]

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([*base, *args], capture_output=True, text=True, timeout=120)

    # a huge k returns every item (before: MemoryError traceback)
    out = cli("--json", "--k", str(10**12), str(tmp_path / "a.png"))
    assert out.returncode == 0, out.stderr
    (record,) = json.loads(out.stdout)
    assert set(record) == {"image", "hits"} and len(record["hits"]) == 2 * N
    assert set(record["hits"][0]) == {"id", "score", "uncertainty", "payload"}
    # a FIFO is one image's error; the others are answered, in order, across batches
    images = [str(tmp_path / "a.png")] * 70
    images[66] = str(tmp_path / "fifo.png")
    out = cli("--json", "--k", "2", *images)
    assert out.returncode == 1
    records = json.loads(out.stdout)
    assert [r["image"] for r in records] == images
    assert records[66] == {
        "image": images[66],
        "error": f"{images[66]}: the image is not a regular file",
    }
    assert all(len(r["hits"]) == 2 for i, r in enumerate(records) if i != 66)
    # option values the gallery cannot take: one line each, no traceback
    for args, message in [
        (["--max-uncertainty", "q0.42"], "no such uncertainty quantile; it has q0.5, q0.9"),
        (["--shards", "0,0"], "'0,0' names a shard twice"),
        (["--shards", "7"], "no shard number 7"),
    ]:
        out = cli(*args, str(tmp_path / "a.png"))
        assert out.returncode == 2 and message in out.stderr, out.stderr
        assert "Traceback" not in out.stderr
    helped = cli("--help")
    assert helped.returncode == 0 and "Examples:" in helped.stdout
    assert "more than the gallery holds returns all" in " ".join(helped.stdout.split())


def test_cmce_query_refuses_a_crafted_bundle_in_one_line(bundle, gallery, tmp_path):
    shutil.copy(bundle / "query.onnx", tmp_path / "keep.onnx")
    onnx_model(bundle / "query.onnx", dtype="float32")
    write_bundle(bundle, [artifact(bundle, "query.onnx")])
    out = subprocess.run(
        [sys.executable, "-m", "query_sdk.cli", "--bundle", str(bundle), "--gallery",
         str(gallery), str(tmp_path / "keep.onnx")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == BackendError.exit_code
    assert out.stderr.strip().splitlines() == [
        "error: query.onnx: the model does not take what the manifest says: input 'images' is "
        "tensor(float), the manifest says uint8 (re-export the bundle with cmce-export)"
    ]
