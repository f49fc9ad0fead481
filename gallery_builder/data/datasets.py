"""Image sources for training and gallery building.

Three kinds of source, all returned as an :class:`ImageSet` of uint8 NHWC images:

* Fashion-MNIST (``"fashion-mnist:train"`` / ``"fashion-mnist:test"``), read from its IDX files.
  They are looked up in ``$CMCE_DATA``, the user cache and where Debian's
  ``dataset-fashion-mnist`` package installs them; :func:`fetch_fashion_mnist` gets them
  (``apt-get download`` + ``dpkg -x``, no root needed; torchvision's downloader as fallback).
* scikit-learn's bundled ``"digits"`` (8x8, ships with the library: handy for tests).
* An image folder with one sub-folder per class, which is how users bring their own images.

Inputs that cannot be used (corrupt or truncated files) are listed in ``ImageSet.skipped``
instead of stopping the run.
"""

from __future__ import annotations

import gzip
import logging
import os
import shutil
import struct
import subprocess
import tempfile
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from gallery_builder.data.font_sets import FONT_SET_SPEC, FONT_SETS
from query_sdk.errors import DataError
from query_sdk.fileio import atomic_path, folder_transaction
from query_sdk.images import decode_image
from query_sdk.spec import InputSpec, to_model_input

__all__ = [
    "BUILTIN_SOURCES",
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_FILES",
    "IMAGE_SUFFIXES",
    "SYSTEM_DATA_DIRS",
    "DataError",
    "apt_download",
    "cache_dir",
    "dpkg_extract",
    "DatasetMissing",
    "ImageSet",
    "fashion_mnist_dir",
    "fetch_fashion_mnist",
    "load_digits",
    "load_fashion_mnist",
    "decode_image",
    "list_image_folder",
    "load_image_folder",
    "load_source",
    "read_idx",
]

logger = logging.getLogger(__name__)

FASHION_MNIST_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
#: The four IDX files, without the optional ``.gz`` suffix.
FASHION_MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
#: System-wide folders searched after $CMCE_DATA and the user cache (Debian package location).
SYSTEM_DATA_DIRS: tuple[Path, ...] = (Path("/usr/share/datasets/fashion-mnist"),)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")

_DEB_NAME = "dataset-fashion-mnist"
_DEB_DATA_DIR = Path("usr/share/datasets/fashion-mnist")
_SPLITS = {"train": ("train", 60000), "test": ("t10k", 10000)}
BUILTIN_SOURCES = ("fashion-mnist:train", "fashion-mnist:test", "digits")


class DatasetMissing(DataError):
    """A built-in dataset is not on this machine; the message says how to get it."""


@dataclass(eq=False)
class ImageSet:
    """Images with labels and ids.

    ``images`` is uint8 (N, H, W, C) with C in {1, 3}; ``labels`` int64 (N,) indexing
    ``classes``; ``ids`` one string per image; ``skipped`` the (path, reason) of inputs that could
    not be used.
    """

    images: np.ndarray
    labels: np.ndarray
    name: str
    ids: list[str]
    classes: list[str]
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.images.dtype != np.uint8 or self.images.ndim != 4:
            raise DataError(
                f"{self.name}: images must be uint8 (N, H, W, C), "
                f"got {self.images.dtype} {self.images.shape}"
            )
        if self.images.shape[-1] not in (1, 3):
            raise DataError(f"{self.name}: images must have 1 or 3 channels: {self.images.shape}")
        n = len(self.images)
        if self.labels.shape != (n,) or len(self.ids) != n:
            raise DataError(
                f"{self.name}: {n} images but labels {self.labels.shape} and {len(self.ids)} ids"
            )

    def __len__(self) -> int:
        return len(self.images)

    def __repr__(self) -> str:
        return (
            f"ImageSet(name={self.name!r}, n={len(self)}, shape={self.images.shape[1:]}, "
            f"classes={len(self.classes)}, skipped={len(self.skipped)})"
        )

    def subset(self, index: np.ndarray | slice) -> ImageSet:
        """The items at ``index`` (slice, integer or boolean array); name/classes/skipped kept."""
        if isinstance(index, slice):
            ids = self.ids[index]
        else:
            ids = np.asarray(self.ids, dtype=object)[np.asarray(index)].tolist()
        return ImageSet(
            images=self.images[index],
            labels=self.labels[index],
            name=self.name,
            ids=ids,
            classes=list(self.classes),
            skipped=list(self.skipped),
        )


# --------------------------------------------------------------------------------------- IDX


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (plain or gzip) of unsigned bytes into an array of the header's shape."""
    path = Path(path)
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except FileNotFoundError:
        raise DataError(f"{path}: no such IDX file") from None
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path}: cannot read IDX file ({e})") from e
    if len(raw) < 4:
        raise DataError(f"{path}: not an IDX file ({len(raw)} bytes, too short for a header)")
    if raw[:2] != b"\x00\x00":
        raise DataError(f"{path}: not an IDX file (bad magic {raw[:4].hex()})")
    dtype_code, ndim = raw[2], raw[3]
    if dtype_code != 0x08:
        raise DataError(
            f"{path}: IDX element type 0x{dtype_code:02x} not supported (only 0x08, unsigned byte)"
        )
    header = 4 + 4 * ndim
    if ndim == 0 or len(raw) < header:
        raise DataError(f"{path}: IDX header truncated or invalid ({ndim} dimensions)")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    expected = int(np.prod(dims, dtype=np.int64))
    actual = len(raw) - header
    if actual != expected:
        raise DataError(
            f"{path}: IDX header says shape {dims} ({expected} bytes of data), "
            f"file has {actual} bytes (truncated or corrupt)"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims).copy()


# ------------------------------------------------------------------------------ Fashion-MNIST


def cache_dir(name: str = "fashion-mnist") -> Path:
    """``${XDG_CACHE_HOME:-~/.cache}/cmce/<name>``: where fetched datasets are kept."""
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg and Path(xdg).is_absolute() else Path.home() / ".cache"
    return base / "cmce" / name


def _search_dirs() -> list[Path]:
    dirs = []
    env = os.environ.get("CMCE_DATA")
    if env:
        base = Path(env).expanduser()
        dirs += [base, base / "fashion-mnist"]
    dirs.append(cache_dir())
    dirs += [Path(d) for d in SYSTEM_DATA_DIRS]
    return dirs


def _find_files(folder: Path) -> dict[str, Path] | None:
    """The 4 Fashion-MNIST files in ``folder`` (plain preferred over .gz), or None if incomplete."""
    found = {}
    for base in FASHION_MNIST_FILES:
        for candidate in (folder / base, folder / f"{base}.gz"):
            if candidate.is_file():
                found[base] = candidate
                break
        else:
            return None
    return found


def _missing_message(searched: Sequence[Path]) -> str:
    names = ", ".join(f"{b}[.gz]" for b in FASHION_MNIST_FILES)
    folders = "\n".join(f"  {d}" for d in searched)
    return (
        f"Fashion-MNIST not found. Looked for {names} in:\n{folders}\n"
        "Get it one of three ways:\n"
        "  1. cmce data fetch fashion-mnist\n"
        f"  2. apt-get download {_DEB_NAME} && dpkg -x {_DEB_NAME}_*.deb DIR\n"
        f"     then set CMCE_DATA=DIR/{_DEB_DATA_DIR.as_posix()}\n"
        "  3. pip install torchvision  (its downloader is the fallback of "
        "`cmce data fetch fashion-mnist`)"
    )


def fashion_mnist_dir() -> Path:
    """The first folder holding all 4 Fashion-MNIST IDX files; DatasetMissing if there is none.

    Searched in order: ``$CMCE_DATA``, ``$CMCE_DATA/fashion-mnist``,
    ``${XDG_CACHE_HOME:-~/.cache}/cmce/fashion-mnist``, then :data:`SYSTEM_DATA_DIRS`.
    """
    searched = _search_dirs()
    for folder in searched:
        if _find_files(folder) is not None:
            return folder
    raise DatasetMissing(_missing_message(searched))


def _check_files(files: Mapping[str, Path]) -> None:
    """Validate a complete set of Fashion-MNIST files (shapes and label range)."""
    for prefix, n in _SPLITS.values():
        images = read_idx(files[f"{prefix}-images-idx3-ubyte"])
        labels = read_idx(files[f"{prefix}-labels-idx1-ubyte"])
        if images.shape != (n, 28, 28) or labels.shape != (n,) or labels.max() > 9:
            raise DataError(
                f"{prefix} files have unexpected shapes {images.shape}, {labels.shape} "
                f"(want ({n}, 28, 28), ({n},))"
            )


def _install(files: Mapping[str, Path], dest: Path) -> None:
    """Copy ``files`` into ``dest`` all-or-nothing (a :func:`folder_transaction`: files already
    in ``dest`` are kept, hard-linked into the staged copy; ours replace theirs)."""
    with folder_transaction(
        dest, start="copy" if dest.is_dir() else "empty", link=lambda name: True
    ) as stage:
        for src in files.values():
            with atomic_path(stage / src.name) as tmp:
                shutil.copyfile(src, tmp)


def _tail(text: str, lines: int = 3) -> str:
    return " | ".join(text.strip().splitlines()[-lines:])


def _apt_lists_empty() -> bool:
    lists = Path("/var/lib/apt/lists")
    return not any(lists.glob("*_Packages*")) if lists.is_dir() else True


def apt_download(packages: Sequence[str], workdir: Path) -> list[Path]:
    """``apt-get download`` the Debian ``packages`` into ``workdir`` (no root needed).

    When that fails, we are root and the apt lists are empty, ``apt-get update`` runs once and
    the download is retried. Returns the ``.deb`` files, one per package, in the given order;
    RuntimeError (with apt's last lines) when a package cannot be downloaded.
    """

    def download() -> subprocess.CompletedProcess:
        logger.info("running apt-get download %s", " ".join(packages))
        return subprocess.run(
            ["apt-get", "download", *packages],
            cwd=workdir,
            capture_output=True,
            text=True,
            timeout=900,
        )

    result = download()
    is_root = getattr(os, "geteuid", lambda: -1)() == 0
    if result.returncode != 0 and is_root and _apt_lists_empty():
        logger.info("apt lists are empty; running apt-get update once")
        update = subprocess.run(["apt-get", "update"], capture_output=True, text=True, timeout=900)
        if update.returncode != 0:
            raise RuntimeError(f"apt-get update failed: {_tail(update.stderr)}")
        result = download()
    if result.returncode != 0:
        raise RuntimeError(f"apt-get download failed: {_tail(result.stderr or result.stdout)}")
    debs = []
    for name in packages:
        found = sorted(workdir.glob(f"{name}_*.deb"))
        if not found:
            raise RuntimeError(f"apt-get download succeeded but left no {name}_*.deb file")
        debs.append(found[0])
    return debs


def dpkg_extract(deb: Path, dest: Path) -> None:
    """Unpack the files of ``deb`` into ``dest`` with ``dpkg -x`` (no root needed)."""
    logger.info("unpacking %s", deb.name)
    result = subprocess.run(["dpkg", "-x", str(deb), str(dest)], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"dpkg -x {deb.name} failed: {_tail(result.stderr)}")


def _fetch_with_apt(workdir: Path) -> dict[str, Path]:
    """``apt-get download`` + ``dpkg -x`` the Debian package inside ``workdir``."""
    (deb,) = apt_download([_DEB_NAME], workdir)
    unpacked = workdir / "root"
    dpkg_extract(deb, unpacked)
    files = _find_files(unpacked / _DEB_DATA_DIR)
    if files is None:
        raise RuntimeError(f"the package holds no complete Fashion-MNIST in /{_DEB_DATA_DIR}")
    return files


def _fetch_with_torchvision(workdir: Path) -> dict[str, Path]:
    """Download with torchvision's FashionMNIST into ``workdir``."""
    try:
        from torchvision.datasets import FashionMNIST
    except ImportError as e:
        raise RuntimeError(f"torchvision is not installed ({e})") from e
    logger.info("downloading with torchvision.datasets.FashionMNIST")
    FashionMNIST(root=str(workdir), train=True, download=True)
    files = _find_files(workdir / "FashionMNIST" / "raw")
    if files is None:
        raise RuntimeError("torchvision's download left no complete set of raw files")
    return files


def fetch_fashion_mnist(dest: Path | None = None) -> Path:
    """Make Fashion-MNIST available and return its folder.

    If it is already found (in ``dest`` or, without ``dest``, by :func:`fashion_mnist_dir`),
    nothing is downloaded. Otherwise the Debian package is fetched with ``apt-get download`` and
    unpacked with ``dpkg -x`` (no root needed), falling back to torchvision's downloader; the
    files land in ``dest`` (default ``~/.cache/cmce/fashion-mnist``) atomically. A copy found
    elsewhere on the machine is copied into an explicit ``dest`` instead of downloading.
    """
    target = Path(dest).expanduser() if dest is not None else cache_dir()
    if _find_files(target) is not None:
        logger.info("Fashion-MNIST already present in %s", target)
        return target
    try:
        existing = fashion_mnist_dir()
    except DatasetMissing:
        existing = None
    if existing is not None:
        if dest is None:
            logger.info("Fashion-MNIST already present in %s", existing)
            return existing
        logger.info("copying Fashion-MNIST from %s to %s", existing, target)
        _install(_find_files(existing), target)
        return target

    failures = []
    for method, fetch in (("apt", _fetch_with_apt), ("torchvision", _fetch_with_torchvision)):
        with tempfile.TemporaryDirectory(prefix="cmce-fetch-") as work:
            try:
                files = fetch(Path(work))
                _check_files(files)
                _install(files, target)
            except Exception as e:  # every failure is reported, next method tried
                logger.warning("fetching Fashion-MNIST with %s failed: %s", method, e)
                failures.append(f"{method}: {e}")
                continue
        logger.info("Fashion-MNIST installed in %s (via %s)", target, method)
        return target
    reasons = "\n".join(f"  {f}" for f in failures)
    raise DatasetMissing(f"{_missing_message(_search_dirs())}\nFetching failed:\n{reasons}")


def load_fashion_mnist(split: str) -> ImageSet:
    """Fashion-MNIST ``"train"`` (60000) or ``"test"`` (10000) as (N, 28, 28, 1) uint8."""
    if split not in _SPLITS:
        raise DataError(f"unknown Fashion-MNIST split {split!r}; use 'train' or 'test'")
    folder = fashion_mnist_dir()
    files = _find_files(folder)
    prefix, _ = _SPLITS[split]
    images = read_idx(files[f"{prefix}-images-idx3-ubyte"])
    labels = read_idx(files[f"{prefix}-labels-idx1-ubyte"])
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise DataError(
            f"{folder}: {split} images {images.shape} and labels {labels.shape} do not match"
        )
    if len(labels) and labels.max() >= len(FASHION_MNIST_CLASSES):
        raise DataError(f"{folder}: {split} labels go up to {labels.max()}, expected 0..9")
    name = f"fashion-mnist:{split}"
    return ImageSet(
        images=images[..., None],
        labels=labels.astype(np.int64),
        name=name,
        ids=[f"{name}/{i}" for i in range(len(labels))],
        classes=list(FASHION_MNIST_CLASSES),
    )


# ------------------------------------------------------------------------------------ digits


def load_digits() -> ImageSet:
    """scikit-learn's bundled 8x8 digits (1797 images) as (N, 8, 8, 1) uint8 in 0..255."""
    from sklearn.datasets import load_digits as sk_load_digits

    digits = sk_load_digits()
    images = (digits.images.astype(np.int64) * 255 // 16).astype(np.uint8)[..., None]
    return ImageSet(
        images=images,
        labels=digits.target.astype(np.int64),
        name="digits",
        ids=[f"digits/{i}" for i in range(len(images))],
        classes=[str(i) for i in range(10)],
    )


# ------------------------------------------------------------------------------ image folder


def list_image_folder(root: Path) -> tuple[list[tuple[Path, int]], list[str]]:
    """Image files under ``root/<class>/`` with their label, and the sorted class names.

    Files whose suffix is not in :data:`IMAGE_SUFFIXES` and hidden files/folders are ignored.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: not a folder")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(f"{root}: no class folders (expected one sub-folder per class)")
    items: list[tuple[Path, int]] = []
    for label, name in enumerate(classes):
        for path in sorted((root / name).rglob("*")):
            rel = path.relative_to(root)
            if (
                path.suffix.lower() in IMAGE_SUFFIXES
                and not any(part.startswith(".") for part in rel.parts)
                and path.is_file()
            ):
                items.append((path, label))
    if not items:
        raise DataError(f"{root}: no image files ({', '.join(IMAGE_SUFFIXES)}) in class folders")

    return items, classes


def load_image_folder(root: Path, spec: InputSpec, progress: bool = False) -> ImageSet:
    """Images under ``root/<class>/`` (sorted class names), decoded and resized to ``spec``.

    Files whose suffix is not in :data:`IMAGE_SUFFIXES` and hidden files/folders are ignored;
    files that cannot be decoded are listed in ``skipped`` and the run goes on. ``ids`` are the
    paths relative to ``root`` (posix).
    """
    root = Path(root)
    items, classes = list_image_folder(root)
    iterator = items
    if progress:
        from tqdm import tqdm

        iterator = tqdm(items, desc=f"loading {root.name}", unit="img")
    images = np.empty((len(items), *spec.shape), dtype=np.uint8)
    labels, ids, skipped = [], [], []
    for path, label in iterator:
        rel = path.relative_to(root).as_posix()
        try:
            images[len(ids)] = decode_image(path, spec)
        except Exception as e:  # any decoder failure means "skip this file"
            skipped.append((rel, f"{type(e).__name__}: {e}"))
            continue
        labels.append(label)
        ids.append(rel)
    if skipped:
        first = "; ".join(f"{p} ({r})" for p, r in skipped[:3])
        logger.warning(
            "%s: skipped %d of %d image files, first: %s", root, len(skipped), len(items), first
        )
    if not ids:
        raise DataError(f"{root}: none of the {len(items)} image files could be decoded")
    return ImageSet(
        images=images[: len(ids)],
        labels=np.asarray(labels, dtype=np.int64),
        name=str(root),
        ids=ids,
        classes=classes,
        skipped=skipped,
    )


# ------------------------------------------------------------------------------------ source


def load_source(source: str, spec: InputSpec | None = None) -> ImageSet:
    """Load ``"fashion-mnist:train"``, ``"fashion-mnist:test"``, ``"digits"``, a font set
    (``"glyphs"``, ``"han"``: the fetched root, 32x32 RGB unless ``spec`` says otherwise) or an
    image folder.

    Built-in names win over a folder of the same name, with a warning (write ``./digits`` for
    the folder). With ``spec`` the built-ins are converted to its size and channels; a folder
    requires ``spec``.
    """
    from gallery_builder.data.glyphs import glyphs_dir

    if source in (*BUILTIN_SOURCES, *FONT_SETS) and Path(source).is_dir():
        logger.warning("%s: the built-in data set; write ./%s for the folder here", source, source)
    if source in FONT_SETS:
        return load_image_folder(glyphs_dir(source), spec or FONT_SET_SPEC)
    if source.startswith("fashion-mnist:") and source in BUILTIN_SOURCES:
        data = load_fashion_mnist(source.split(":", 1)[1])
    elif source == "digits":
        data = load_digits()
    elif Path(source).expanduser().is_dir():
        if spec is None:
            raise DataError(f"{source}: an image folder needs an input spec to decode into")
        return load_image_folder(Path(source).expanduser(), spec)
    else:
        allowed = ", ".join(repr(s) for s in (*BUILTIN_SOURCES, *FONT_SETS))
        raise DataError(
            f"unknown data source {source!r}: use {allowed} or the path of an image folder "
            "(one sub-folder per class)"
        )
    if spec is not None:
        data.images = to_model_input(data.images, spec)
    return data
