"""Tests for gallery_builder.data.datasets: IDX files, Fashion-MNIST lookup, digits, image folders.

No network and no real Fashion-MNIST: tiny IDX files are generated in tmp_path, and HOME,
XDG_CACHE_HOME, CMCE_DATA and the system folders are pointed at temporary folders.
"""

from __future__ import annotations

import gzip
import io
import logging
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gallery_builder.data import datasets as data
from gallery_builder.data.datasets import (
    FASHION_MNIST_CLASSES,
    DataError,
    DatasetMissing,
    ImageSet,
    fashion_mnist_dir,
    fetch_fashion_mnist,
    load_digits,
    load_fashion_mnist,
    load_image_folder,
    load_source,
    read_idx,
)
from query_sdk.spec import InputSpec

RNG = np.random.default_rng(0)


def idx_bytes(array: np.ndarray) -> bytes:
    array = np.asarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.tobytes()


def write_idx(path: Path, array: np.ndarray) -> Path:
    raw = idx_bytes(array)
    path.write_bytes(gzip.compress(raw) if path.suffix == ".gz" else raw)
    return path


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """No real Fashion-MNIST can be found: every searched folder is an empty temp folder."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))
    monkeypatch.delenv("CMCE_DATA", raising=False)
    monkeypatch.setattr(data, "SYSTEM_DATA_DIRS", (tmp_path / "system" / "fashion-mnist",))
    return tmp_path


def make_fashion(folder: Path, gz: bool = True, n_train: int = 12, n_test: int = 5) -> dict:
    """Tiny Fashion-MNIST look-alike: returns the arrays written."""
    folder.mkdir(parents=True, exist_ok=True)
    suffix = ".gz" if gz else ""
    arrays = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = RNG.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = np.arange(n, dtype=np.uint8) % 10
        write_idx(folder / f"{prefix}-images-idx3-ubyte{suffix}", images)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte{suffix}", labels)
        arrays[prefix] = (images, labels)
    return arrays


# ----------------------------------------------------------------------------------------- IDX


@pytest.mark.parametrize("name", ["x-idx3-ubyte", "x-idx3-ubyte.gz"])
def test_read_idx_round_trip(tmp_path, name):
    images = RNG.integers(0, 256, size=(7, 5, 3), dtype=np.uint8)
    out = read_idx(write_idx(tmp_path / name, images))
    assert out.dtype == np.uint8 and out.shape == (7, 5, 3)
    np.testing.assert_array_equal(out, images)
    out[0, 0, 0] = 1  # writable, not a view of read-only bytes


def test_read_idx_one_dimensional(tmp_path):
    labels = np.array([9, 0, 3, 255], dtype=np.uint8)
    np.testing.assert_array_equal(read_idx(write_idx(tmp_path / "l", labels)), labels)


def test_read_idx_wrong_magic(tmp_path):
    path = tmp_path / "bad-idx3-ubyte"
    path.write_bytes(b"\x01\x02" + idx_bytes(np.zeros((2, 2), np.uint8))[2:])
    with pytest.raises(DataError, match="bad-idx3-ubyte.*magic"):
        read_idx(path)


def test_read_idx_unsupported_dtype(tmp_path):
    path = tmp_path / "float-idx"
    raw = bytearray(idx_bytes(np.zeros((2, 2), np.uint8)))
    raw[2] = 0x0D  # float32
    path.write_bytes(bytes(raw))
    with pytest.raises(DataError, match=r"float-idx.*0x0d"):
        read_idx(path)


@pytest.mark.parametrize("cut", [1, 10, 27])
def test_read_idx_truncated(tmp_path, cut):
    path = tmp_path / "trunc-idx3-ubyte"
    path.write_bytes(idx_bytes(np.ones((3, 3, 3), np.uint8))[:-cut])
    with pytest.raises(DataError, match="trunc-idx3-ubyte"):
        read_idx(path)


def test_read_idx_extra_bytes(tmp_path):
    path = tmp_path / "long-idx"
    path.write_bytes(idx_bytes(np.ones((2, 2), np.uint8)) + b"\x00")
    with pytest.raises(DataError, match="long-idx.*5 bytes"):
        read_idx(path)


def test_read_idx_truncated_gzip(tmp_path):
    path = tmp_path / "cut.gz"
    compressed = gzip.compress(idx_bytes(RNG.integers(0, 256, (50, 50), dtype=np.uint8)))
    path.write_bytes(compressed[: len(compressed) // 2])
    with pytest.raises(DataError, match="cut.gz"):
        read_idx(path)


def test_read_idx_missing_file(tmp_path):
    with pytest.raises(DataError, match="nope"):
        read_idx(tmp_path / "nope")


# ------------------------------------------------------------------------------ Fashion-MNIST


@pytest.mark.parametrize("sub", ["", "fashion-mnist"])
def test_fashion_mnist_dir_from_cmce_data(isolated, monkeypatch, sub):
    base = isolated / "data"
    make_fashion(base / sub if sub else base)
    monkeypatch.setenv("CMCE_DATA", str(base))
    assert fashion_mnist_dir() == (base / sub if sub else base)


def test_fashion_mnist_dir_from_xdg_cache(isolated):
    folder = isolated / "xdg-cache" / "cmce" / "fashion-mnist"
    make_fashion(folder, gz=False)
    assert fashion_mnist_dir() == folder


def test_fashion_mnist_dir_from_home_cache(isolated, monkeypatch):
    monkeypatch.delenv("XDG_CACHE_HOME")
    folder = isolated / "home" / ".cache" / "cmce" / "fashion-mnist"
    make_fashion(folder)
    assert fashion_mnist_dir() == folder


def test_fashion_mnist_dir_from_system_dir(isolated):
    folder = data.SYSTEM_DATA_DIRS[0]
    make_fashion(folder)
    assert fashion_mnist_dir() == folder


def test_incomplete_folder_is_not_found(isolated, monkeypatch):
    folder = isolated / "partial"
    make_fashion(folder)
    (folder / "t10k-labels-idx1-ubyte.gz").unlink()
    monkeypatch.setenv("CMCE_DATA", str(folder))
    with pytest.raises(DatasetMissing):
        fashion_mnist_dir()


def test_dataset_missing_message(isolated, monkeypatch):
    monkeypatch.setenv("CMCE_DATA", str(isolated / "empty"))
    (isolated / "empty").mkdir()
    with pytest.raises(DatasetMissing) as info:
        fashion_mnist_dir()
    message = str(info.value)
    assert "cmce data fetch fashion-mnist" in message
    assert "apt-get download dataset-fashion-mnist" in message
    assert "dpkg -x dataset-fashion-mnist_*.deb DIR" in message
    assert "CMCE_DATA=DIR/usr/share/datasets/fashion-mnist" in message
    assert "pip install torchvision" in message
    for folder in (
        isolated / "empty",
        isolated / "empty" / "fashion-mnist",
        isolated / "xdg-cache" / "cmce" / "fashion-mnist",
        data.SYSTEM_DATA_DIRS[0],
    ):
        assert str(folder) in message


@pytest.mark.parametrize("gz", [True, False])
def test_load_fashion_mnist(isolated, monkeypatch, gz):
    arrays = make_fashion(isolated / "fm", gz=gz)
    monkeypatch.setenv("CMCE_DATA", str(isolated / "fm"))
    for split, prefix, n in (("train", "train", 12), ("test", "t10k", 5)):
        ds = load_fashion_mnist(split)
        images, labels = arrays[prefix]
        assert ds.images.shape == (n, 28, 28, 1) and ds.images.dtype == np.uint8
        np.testing.assert_array_equal(ds.images[..., 0], images)
        assert ds.labels.dtype == np.int64
        np.testing.assert_array_equal(ds.labels, labels)
        assert ds.name == f"fashion-mnist:{split}"
        assert ds.ids[:2] == [f"fashion-mnist:{split}/0", f"fashion-mnist:{split}/1"]
        assert ds.classes == FASHION_MNIST_CLASSES and len(ds) == n and ds.skipped == []


def test_load_fashion_mnist_bad_split(isolated):
    with pytest.raises(DataError, match="val"):
        load_fashion_mnist("val")


def test_load_fashion_mnist_missing(isolated):
    with pytest.raises(DatasetMissing):
        load_fashion_mnist("train")


def _no_subprocess(*args, **kwargs):
    raise AssertionError("must not run a subprocess")


def test_fetch_returns_existing_dir(isolated, monkeypatch):
    make_fashion(isolated / "fm")
    monkeypatch.setenv("CMCE_DATA", str(isolated / "fm"))
    monkeypatch.setattr(data.subprocess, "run", _no_subprocess)
    assert fetch_fashion_mnist() == isolated / "fm"


def test_fetch_copies_existing_to_explicit_dest(isolated, monkeypatch):
    arrays = make_fashion(isolated / "fm")
    monkeypatch.setenv("CMCE_DATA", str(isolated / "fm"))
    monkeypatch.setattr(data.subprocess, "run", _no_subprocess)
    dest = isolated / "out" / "fashion"
    assert fetch_fashion_mnist(dest) == dest
    np.testing.assert_array_equal(read_idx(dest / "t10k-labels-idx1-ubyte.gz"), arrays["t10k"][1])
    assert [p.name for p in dest.parent.iterdir()] == ["fashion"]  # no temp dir left behind


def test_fetch_installs_into_default_cache(isolated, monkeypatch):
    source = isolated / "unpacked"
    make_fashion(source)

    def fake_apt(workdir):
        return data._find_files(source)

    monkeypatch.setattr(data, "_fetch_with_apt", fake_apt)
    monkeypatch.setattr(data, "_check_files", lambda files: None)  # tiny files, not 60000
    cache = isolated / "xdg-cache" / "cmce" / "fashion-mnist"
    assert fetch_fashion_mnist() == cache
    assert sorted(p.name for p in cache.iterdir()) == sorted(
        f"{b}.gz" for b in data.FASHION_MNIST_FILES
    )
    assert fashion_mnist_dir() == cache
    assert [p.name for p in cache.parent.iterdir()] == ["fashion-mnist"]


def test_fetch_failure_lists_reasons(isolated, monkeypatch):
    def fail(reason):
        def fetch(workdir):
            raise RuntimeError(reason)

        return fetch

    monkeypatch.setattr(data, "_fetch_with_apt", fail("apt-get download failed: no lists"))
    monkeypatch.setattr(data, "_fetch_with_torchvision", fail("torchvision is not installed"))
    with pytest.raises(DatasetMissing) as info:
        fetch_fashion_mnist(isolated / "dest")
    message = str(info.value)
    assert "apt: apt-get download failed: no lists" in message
    assert "torchvision: torchvision is not installed" in message
    assert "pip install torchvision" in message
    assert not (isolated / "dest").exists()


# ------------------------------------------------------------------------------------- digits


def test_load_digits():
    sklearn_datasets = pytest.importorskip("sklearn.datasets")
    ds = load_digits()
    assert ds.images.shape == (1797, 8, 8, 1) and ds.images.dtype == np.uint8
    assert ds.images.min() == 0 and ds.images.max() == 255
    raw = sklearn_datasets.load_digits()
    np.testing.assert_array_equal(ds.images[..., 0], (raw.images * 255 // 16).astype(np.uint8))
    assert ds.labels.dtype == np.int64
    assert sorted(set(ds.labels.tolist())) == list(range(10))
    assert ds.classes == [str(i) for i in range(10)]
    assert ds.name == "digits" and ds.ids[0] == "digits/0" and len(ds.ids) == 1797


# ------------------------------------------------------------------------------- image folder


def solid(mode: str, size: tuple[int, int], colour) -> Image.Image:
    return Image.new(mode, size, colour)


def truncated_png(path: Path) -> None:
    noise = RNG.integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, format="PNG")
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "shop"
    (root / "cat").mkdir(parents=True)
    (root / "dog" / "more").mkdir(parents=True)
    (root / ".hidden").mkdir()
    solid("RGB", (40, 30), (200, 10, 30)).save(root / "cat" / "a.png")
    solid("L", (20, 50), 77).save(root / "cat" / "b.jpg", quality=95)
    solid("RGBA", (16, 16), (5, 250, 100, 128)).save(root / "dog" / "c.png")
    solid("RGB", (33, 17), (10, 120, 240)).save(root / "dog" / "more" / "d.JPEG", quality=95)
    solid("P", (9, 9), 3).save(root / "dog" / "e.png")
    (root / "dog" / "notes.txt").write_text("not an image")
    (root / "dog" / "bad.jpg").write_bytes(RNG.integers(0, 256, 500, dtype=np.uint8).tobytes())
    truncated_png(root / "dog" / "trunc.png")
    solid("RGB", (8, 8), 0).save(root / ".hidden" / "x.png")
    return root


def test_load_image_folder_rgb(folder, caplog):
    spec = InputSpec(height=12, width=10, channels=3)
    with caplog.at_level(logging.WARNING, logger="gallery_builder.data.datasets"):
        ds = load_image_folder(folder, spec)
    assert ds.classes == ["cat", "dog"]
    assert ds.ids == ["cat/a.png", "cat/b.jpg", "dog/c.png", "dog/e.png", "dog/more/d.JPEG"]
    assert ds.images.shape == (5, 12, 10, 3) and ds.images.dtype == np.uint8
    np.testing.assert_array_equal(ds.labels, [0, 0, 1, 1, 1])
    assert ds.labels.dtype == np.int64
    assert ds.name == str(folder)
    np.testing.assert_array_equal(ds.images[0], np.broadcast_to([200, 10, 30], (12, 10, 3)))
    assert np.abs(ds.images[1].astype(int) - 77).max() <= 2  # grey JPEG -> RGB
    np.testing.assert_array_equal(ds.images[2], np.broadcast_to([5, 250, 100], (12, 10, 3)))
    assert np.abs(ds.images[4].astype(int) - [10, 120, 240]).max() <= 4  # JPEG is lossy
    assert [path for path, _ in ds.skipped] == ["dog/bad.jpg", "dog/trunc.png"]
    assert all(reason for _, reason in ds.skipped)
    assert "skipped 2 of 7" in caplog.text and "dog/bad.jpg" in caplog.text


def test_load_image_folder_grey(folder):
    ds = load_image_folder(folder, InputSpec(height=6, width=6, channels=1), progress=True)
    assert ds.images.shape == (5, 6, 6, 1)
    # ITU-R 601 luma of (200, 10, 30) is 69.1
    assert np.abs(ds.images[0].astype(int) - 69).max() <= 1
    assert np.abs(ds.images[1].astype(int) - 77).max() <= 2


def test_image_set_subset(folder):
    ds = load_image_folder(folder, InputSpec(height=4, width=4, channels=3))
    part = ds.subset(np.array([4, 0]))
    assert part.ids == ["dog/more/d.JPEG", "cat/a.png"]
    np.testing.assert_array_equal(part.labels, [1, 0])
    np.testing.assert_array_equal(part.images[1], ds.images[0])
    assert part.classes == ds.classes and part.skipped == ds.skipped and part.name == ds.name
    sliced = ds.subset(slice(1, 3))
    assert len(sliced) == 2 and sliced.ids == ["cat/b.jpg", "dog/c.png"]
    masked = ds.subset(ds.labels == 1)
    assert masked.ids == ["dog/c.png", "dog/e.png", "dog/more/d.JPEG"]


def test_image_set_rejects_mismatched_lengths():
    with pytest.raises(DataError):
        ImageSet(np.zeros((2, 4, 4, 1), np.uint8), np.zeros(3, np.int64), "x", ["a", "b"], ["c"])


def test_load_image_folder_empty(tmp_path):
    spec = InputSpec(height=8, width=8, channels=3)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match=str(empty)):
        load_image_folder(empty, spec)
    (empty / "cls").mkdir()
    (empty / "cls" / "readme.txt").write_text("x")
    with pytest.raises(DataError, match="no image files"):
        load_image_folder(empty, spec)
    with pytest.raises(DataError, match="not a folder"):
        load_image_folder(tmp_path / "missing", spec)


def test_load_image_folder_all_corrupt(tmp_path):
    (tmp_path / "cls").mkdir()
    (tmp_path / "cls" / "x.png").write_bytes(b"garbage")
    with pytest.raises(DataError, match="none of the 1 image files"):
        load_image_folder(tmp_path, InputSpec(height=8, width=8, channels=3))


# ------------------------------------------------------------------------------------- source


def test_load_source_digits():
    pytest.importorskip("sklearn")
    assert load_source("digits").images.shape == (1797, 8, 8, 1)
    ds = load_source("digits", InputSpec(height=16, width=16, channels=3))
    assert ds.images.shape == (1797, 16, 16, 3) and ds.name == "digits"


def test_load_source_fashion_mnist(isolated, monkeypatch):
    arrays = make_fashion(isolated / "fm")
    monkeypatch.setenv("CMCE_DATA", str(isolated / "fm"))
    ds = load_source("fashion-mnist:test")
    np.testing.assert_array_equal(ds.images[..., 0], arrays["t10k"][0])
    ds = load_source("fashion-mnist:train", InputSpec(height=28, width=28, channels=3))
    assert ds.images.shape == (12, 28, 28, 3)
    np.testing.assert_array_equal(ds.images[..., 2], arrays["train"][0])


def test_load_source_folder(folder):
    ds = load_source(str(folder), InputSpec(height=8, width=8, channels=1))
    assert ds.images.shape == (5, 8, 8, 1) and ds.classes == ["cat", "dog"]
    with pytest.raises(DataError, match="spec"):
        load_source(str(folder))


def test_load_source_builtin_name_beside_a_folder(folder, monkeypatch, caplog):
    pytest.importorskip("sklearn")
    folder.rename(folder.parent / "digits")
    monkeypatch.chdir(folder.parent)
    with caplog.at_level(logging.WARNING, logger="gallery_builder.data.datasets"):
        assert len(load_source("digits")) == 1797  # the built-in wins, and says so
    assert "write ./digits for the folder" in caplog.text
    caplog.clear()
    assert load_source("./digits", InputSpec(8, 8, 1)).classes == ["cat", "dog"]
    assert "built-in" not in caplog.text


@pytest.mark.parametrize("source", ["mnist", "fashion-mnist", "fashion-mnist:val", "/no/such/dir"])
def test_load_source_unknown(source):
    with pytest.raises(DataError) as info:
        load_source(source)
    message = str(info.value)
    assert repr(source) in message
    for form in ("'fashion-mnist:train'", "'fashion-mnist:test'", "'digits'", "image folder"):
        assert form in message
