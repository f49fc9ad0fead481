"""The native SDK's model path (query_sdk/native/src/image.cpp, embedder.cpp) against the
Python SDK, through ``embed_probe`` (query_sdk/native/tests/embed_probe.cpp):

- preprocessing: PNG (grey, RGB, RGBA, LA, palette with and without transparency, 1-bit,
  16-bit grey) and JPEG (qualities 50-95, 4:2:0 and 4:4:4, progressive, grey, CMYK) files and
  EXIF orientations 2-8, at four input specs (same size, up, down, non-square): the native model
  input is bit-identical to query_sdk.images.decode_image, raw pixels to
  query_sdk.spec.to_model_input; the pixel budget and undecodable files are refused alike;
- the model: a real exported .pte (fp32 and int8, XNNPACK) on the ExecuTorch C++ runtime gives
  the Python SDK's ExecuTorch embeddings (cosine >= 0.9999 for fp32); crafted programs are
  BackendErrors, never an abort.
"""

from __future__ import annotations

import json
import struct
import subprocess
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_edge_bounds import crafted
from torch import nn

from query_sdk.bundle_format import Artifact, Validation, path_digest
from query_sdk.errors import BackendError, DataError
from query_sdk.images import ImageError, decode_image, load_image
from query_sdk.native import build as native
from query_sdk.runtimes import check_pte, open_runtime
from query_sdk.searcher import renormalise
from query_sdk.spec import InputSpec, to_model_input

SPECS = [InputSpec(28, 28, 1), InputSpec(32, 32, 3), InputSpec(96, 96, 3), InputSpec(48, 64, 1)]
MODEL_SPEC, DIM = InputSpec(28, 28, 1), 32


@pytest.fixture(scope="module")
def probe() -> Path:
    if native.compiler() is None:
        pytest.skip("no C++ compiler (g++ or $CXX): the native SDK needs one")
    pytest.importorskip("executorch.runtime", reason="the executorch extra is not installed")
    path = native.build_library("release") / "embed_probe"
    if not path.is_file():
        pytest.fail(f"{path} missing: libcmce_query was configured without cmake/embedder.cmake")
    return path


def run_probe(probe: Path, *args) -> list[dict]:
    # errors="replace": ExecuTorch logs a crafted program's raw bytes (a backend name) to stderr
    done = subprocess.run(
        [str(probe), *map(str, args)], capture_output=True, text=True, errors="replace"
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return [json.loads(line) for line in done.stdout.splitlines()]


def native_inputs(probe: Path, files: list[Path], spec: InputSpec, out: Path) -> list:
    """The native model input of each file (an array), or its (code, message)."""
    out.mkdir(exist_ok=True)
    lines = run_probe(probe, "prep", spec.height, spec.width, spec.channels, out, *files)
    return [
        np.fromfile(out / f"{r['i']}.bin", np.uint8).reshape(spec.shape)
        if r["code"] == 0
        else (r["code"], r["message"])
        for r in lines
    ]


def _photo(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """Smooth colour waves plus noise: an image with detail at every scale."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    waves = [127 + 120 * np.sin(x / (7 + 3 * i) + y / (11 + i)) for i in range(3)]
    return np.clip(np.stack(waves, -1) + rng.normal(0, 25, (height, width, 3)), 0, 255).astype(
        np.uint8
    )


def _exif(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif.tobytes()


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[Path]:
    """120 files: 16 digits (8x8 grey, saved at 28x28) and, at six sizes from 5x3 to
    640x480, every PNG mode and JPEG flavour Pillow writes, plus EXIF orientations 2-8."""
    from sklearn.datasets import load_digits

    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    files = []

    def save(im: Image.Image, name: str, **options) -> None:
        im.save(folder / name, **options)
        files.append(folder / name)

    digits = load_digits().images
    for i in range(16):
        grey = Image.fromarray((digits[i * 97] * 255 / 16).astype(np.uint8))
        save(grey.resize((28, 28), Image.NEAREST), f"digit{i}.png")
    for k, (w, h) in enumerate([(17, 23), (64, 48), (301, 199), (640, 480), (28, 28), (5, 3)]):
        rgb = Image.fromarray(_photo(rng, w, h))
        save(rgb, f"rgb{k}.png")
        save(rgb.convert("L"), f"grey{k}.png")
        rgba = rgb.copy()
        rgba.putalpha(Image.fromarray(rng.integers(0, 256, (h, w), np.uint8)))
        save(rgba, f"rgba{k}.png")
        save(rgb.convert("LA"), f"la{k}.png")
        save(rgb.quantize(64), f"palette{k}.png")
        save(rgb.quantize(16), f"palette-transparent{k}.png", transparency=3)
        save(rgb.convert("1"), f"bit{k}.png")
        wide = np.asarray(rgb.convert("L")).astype(np.uint16) * 257 + rng.integers(0, 257, (h, w))
        save(Image.fromarray(wide.astype(np.uint16)), f"grey16-{k}.png")
        for quality in (50, 75, 95):
            save(rgb, f"q{quality}-{k}.jpg", quality=quality)
        save(rgb, f"q90-444-{k}.jpg", quality=90, subsampling=0)
        save(rgb, f"progressive{k}.jpg", quality=80, progressive=True)
        save(rgb.convert("L"), f"grey{k}.jpg", quality=80)
        save(rgb.convert("CMYK"), f"cmyk{k}.jpg", quality=85)
    turned = Image.fromarray(_photo(rng, 97, 61))
    for orientation in range(2, 9):
        save(turned, f"exif{orientation}.jpg", quality=90, exif=_exif(orientation))
        save(turned, f"exif{orientation}.png", exif=_exif(orientation))
    return files


# ------------------------------------------------------------------------------ images


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: "x".join(map(str, s.shape)))
def test_files_preprocess_bit_identical_to_the_python_sdk(probe, images, spec, tmp_path):
    got = native_inputs(probe, images, spec, tmp_path)
    assert len(images) >= 50
    differ = {}
    for path, native_input in zip(images, got, strict=True):
        want = decode_image(path, spec)
        if not isinstance(native_input, np.ndarray) or not np.array_equal(native_input, want):
            differ[path.name] = (
                native_input
                if isinstance(native_input, tuple)
                else int(np.abs(native_input.astype(int) - want).max())
            )
    assert differ == {}


def test_raw_pixels_convert_and_resize_as_to_model_input(probe, tmp_path):
    rng = np.random.default_rng(1)
    cases = [((h, w, c), spec) for h, w in [(97, 61), (61, 97), (30, 20), (1, 1)] for c in
             (1, 3, 4) for spec in (InputSpec(28, 28, 1), InputSpec(48, 64, 3))]  # fmt: skip
    every_colour = np.arange(2**24, dtype=np.uint32).view(np.uint8).reshape(4096, 4096, 4)
    cases.append(((4096, 4096, 3), InputSpec(4096, 4096, 1)))  # the luma of all 2**24 colours
    for k, (shape, spec) in enumerate(cases):
        last = k == len(cases) - 1
        pixels = every_colour[..., :3] if last else rng.integers(0, 256, shape, np.uint8)
        raw = tmp_path / f"{k}.raw"
        raw.write_bytes(np.ascontiguousarray(pixels).tobytes())
        out = tmp_path / f"out{k}"
        out.mkdir()
        (line,) = run_probe(probe, "raw", *spec.shape, out, *shape, raw)
        assert line["code"] == 0, line
        got = np.fromfile(out / "0.bin", np.uint8).reshape(spec.shape)
        want = to_model_input(pixels[None], spec)[0]
        np.testing.assert_array_equal(got, want, err_msg=str(shape))


def _png_bomb(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height grey pixels, with one small IDAT chunk."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\0" * 4096)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat)


def test_bombs_are_refused_from_the_header_and_big_jpegs_decoded_reduced(probe, tmp_path):
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(_png_bomb(13000, 13000))
    big = tmp_path / "big.jpg"  # 17.2 MP > the 16.8 MP budget: decoded at 1/2 a side
    Image.fromarray(_photo(np.random.default_rng(2), 4200, 4100)).save(big, quality=90)
    spec = InputSpec(28, 28, 1)
    refused, reduced = native_inputs(probe, [bomb, big], spec, tmp_path / "out")
    with pytest.raises(ImageError) as err:
        decode_image(bomb, spec)
    assert refused == (DataError.exit_code, str(err.value))
    assert "13000x13000 pixels is more than the 16777216" in refused[1]
    np.testing.assert_array_equal(reduced, decode_image(big, spec))


def test_undecodable_images_are_data_errors_in_both_sdks(probe, images, tmp_path):
    good = next(p for p in images if p.name == "rgb2.png").read_bytes()
    jpeg = next(p for p in images if p.name == "q75-2.jpg").read_bytes()
    cases = {
        "truncated.png": good[: len(good) // 2],
        "truncated.jpg": jpeg[:600],
        "garbage.png": b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4,
        "text.txt": b"not an image at all",
        "empty.png": b"",
    }
    paths = []
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        paths.append(tmp_path / name)
    paths += [tmp_path / "missing.png", tmp_path]  # no file; a folder
    got = native_inputs(probe, paths, InputSpec(28, 28, 1), tmp_path / "out")
    for path, result in zip(paths, got, strict=True):
        assert isinstance(result, tuple) and result[0] == DataError.exit_code, (path, result)
        assert result[1].startswith(str(path)) and "\n" not in result[1]
        with pytest.raises(ImageError):  # the Python SDK's path: load_image wraps decoders'
            load_image(path, InputSpec(28, 28, 1))


# ------------------------------------------------------------------------------ the model


class _Query(nn.Module):
    """A small query model as the exporter takes it: uint8 NHWC -> L2-normalised vectors."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.fc = nn.Linear(16 * 7 * 7, DIM)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = (images.to(torch.float32) / 255 - 0.5) / 0.5
        x = torch.relu(self.conv2(torch.relu(self.conv(x.permute(0, 3, 1, 2)))))
        return nn.functional.normalize(self.fc(x.flatten(1)), dim=1)


@pytest.fixture(scope="module")
def programs(images, tmp_path_factory) -> dict[str, Path]:
    """fp32 and int8 .pte of one seeded model (int8 calibrated on the test images)."""
    from export.executorch import export_executorch
    from export.graph import query_io

    folder = tmp_path_factory.mktemp("pte")
    torch.manual_seed(0)
    model = _Query().eval()
    calibration = np.stack([decode_image(p, MODEL_SPEC) for p in images])
    io = query_io(MODEL_SPEC, DIM)
    for quantization in ("fp32", "int8"):
        calib = calibration if quantization == "int8" else None
        export_executorch(model, io, quantization, calib, folder / f"query.{quantization}.pte")
    return {q: folder / f"query.{q}.pte" for q in ("fp32", "int8")}


def _python_embeddings(path: Path, quantization: str, files: list[Path]) -> np.ndarray:
    """The Python SDK's query vectors: its ExecuTorch runtime, then Searcher's re-normalisation."""
    size, digest = path_digest(path)
    artifact = Artifact(
        "executorch", quantization, path.name, size, digest, "query", "images",
        [-1, *MODEL_SPEC.shape], "uint8", "embedding", [-1, DIM],
        Validation("executorch", 0, None, None),
    )  # fmt: skip
    runtime = open_runtime("executorch", path, artifact, threads=1)
    return renormalise(runtime.run(np.stack([decode_image(p, MODEL_SPEC) for p in files])))


@pytest.mark.parametrize("quantization, cosine_min", [("fp32", 0.9999), ("int8", 0.999)])
def test_embeddings_match_the_python_sdk(probe, programs, images, quantization, cosine_min):
    path = programs[quantization]
    lines = run_probe(probe, "embed", path, *MODEL_SPEC.shape, DIM, 1, *images)
    assert [r["code"] for r in lines] == [0] * len(images), lines[0]
    got = np.array([r["vector"] for r in lines], np.float32)
    want = _python_embeddings(path, quantization, images)
    cosine = (got * want).sum(1)
    assert len(images) >= 50 and cosine.min() >= cosine_min, (cosine.min(), cosine.mean())
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1, atol=1e-5)
    # the same runtime build and one thread: the same model output, re-normalised alike
    np.testing.assert_array_equal(got, want)


def test_crafted_programs_are_backend_errors_never_aborts(probe, programs, tmp_path):
    good = programs["fp32"].read_bytes()
    for name, data in crafted(good).items():
        path = tmp_path / "query.pte"
        path.write_bytes(data)
        (line,) = run_probe(probe, "embed", path, *MODEL_SPEC.shape, DIM, 1)
        assert line["code"] == BackendError.exit_code, (name, line)
        message = line["message"]
        assert message.startswith(f"{path}: ") and "\n" not in message, (name, message)
        try:  # the frame checks say what the Python SDK says, word for word
            check_pte(data, str(path))
        except BackendError as exc:
            assert message == str(exc), name
        else:
            assert "ExecuTorch could not" in message, (name, message)


def test_a_program_that_does_not_take_the_spec_is_refused(probe, programs):
    (line,) = run_probe(probe, "embed", programs["fp32"], 32, 32, 3, DIM, 1)
    assert line["code"] == BackendError.exit_code
    assert "does not take one uint8 [N, 32, 32, 3] image tensor" in line["message"]
