"""Built-in open-set datasets: characters rendered from the fonts of Debian font packages.

Two font sets (:data:`FONT_SETS`): ``glyphs``, 100 characters (Latin letters, digits, signs:
:data:`DEFAULT_CHARS`) in the fonts of 87 packages (:data:`PACKAGES`: few classes, ~600 images
each), and ``han``, 600 common Chinese characters (:func:`han_characters`) in the CJK fonts of 11
packages (:data:`HAN_PACKAGES`: many classes, ~43 images each, the regime of face identification).
:func:`fetch_glyphs` downloads a set's packages with ``apt-get download``, unpacks them with
``dpkg -x`` (no root needed) and renders every character in every usable font into a
class-folder root (``<root>/<class>/<font>.png``, one sub-folder per character), which
``cmce experiment --data`` reads. ``<root>/glyphs.json`` records the packages and versions,
every font file (package, path, sha256, what became of it), the characters, the render
settings and the counts.

Which fonts are used (:func:`render_glyphs`):

* a font must map at least :data:`MIN_COVERAGE` of the characters to a glyph that renders
  ink; characters two code points share one glyph of (an all-caps font's ``a`` drawn as ``A``)
  count once, for the first of them;
* a character whose glyph's name says it is another character (``<`` mapped to
  ``exclamdown`` in old TeX encodings) is not covered; a font with more than 10 % of those
  (symbol fonts: ``A`` drawn as Alpha) is skipped, and so are small-caps, dingbat,
  keyboard-cap and Greek-at-Latin-code-points fonts;
* duplicates count once: the same file (sha256), and fonts whose canonical renderings of every
  character are the same (the RMS difference of the 16x16 canonical images under
  :data:`DUPLICATE_RMS`: .ttf and .otf builds of one design differ by up to 0.019; metric
  clones such as Arimo and Liberation Sans (0.036) and neighbouring weights of one family
  (JetBrains Mono Regular and Medium, 0.027) stay distinct fonts);
* at most :data:`MAX_STYLES_PER_FAMILY` styles per family (regular, bold, italic, bold italic
  first), so that no family with dozens of weights dominates the set.

Each image is one character in one font, drawn at 4x and box-filtered down (antialiasing):
size 72-92 % of the canvas for the font's cap-height-plus-descender line box (lower case stays
smaller than upper case and a sign keeps its height over the baseline), rotation up to 8 degrees,
position
jitter, and background, gradient, foreground and noise colours with a luma contrast of at least
96/255. Every random choice comes from a generator seeded with a hash of (font sha256, face,
character, :data:`RENDER_VERSION`): the same package versions, Pillow and FreeType give
byte-identical PNGs, and adding or dropping a font changes no other font's images.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
import os
import re
import subprocess
import tempfile
import time
import unicodedata
import urllib.parse
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TypeVar

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from PIL import __version__ as pillow_version
from PIL import features as pil_features

from gallery_builder.data.datasets import (
    DataError,
    DatasetMissing,
    apt_download,
    cache_dir,
    dpkg_extract,
)
from gallery_builder.data.font_sets import (
    DEFAULT_CHARS,
    FONT_SET_SPEC,
    FONT_SETS,
    GLYPHS,
    HAN,
    HAN_PACKAGES,
    PACKAGES,
    FontSet,
    han_characters,
)
from query_sdk.fileio import atomic_path, folder_transaction

__all__ = [
    "DEFAULT_CHARS",
    "FONT_SETS",
    "GLYPHS",
    "HAN",
    "HAN_PACKAGES",
    "MANIFEST_NAME",
    "PACKAGES",
    "FontSet",
    "RENDER_VERSION",
    "SELECTION_VERSION",
    "class_name",
    "fetch_glyphs",
    "glyphs_dir",
    "han_characters",
    "render_glyphs",
]

logger = logging.getLogger(__name__)
_T = TypeVar("_T")

#: Bumped whenever a change to the code changes the drawing (it is part of every image's seed).
RENDER_VERSION = 1
#: Bumped whenever a change changes which fonts or characters are used (images of the fonts
#: kept stay as they were); a root of another version is fetched again.
SELECTION_VERSION = 2
MANIFEST_NAME = "glyphs.json"
_FORMAT = "cmce-glyphs"

MIN_COVERAGE = 0.95
MAX_STYLES_PER_FAMILY = 4
#: Two fonts whose canonical renderings differ by less than this RMS (0..1 grey) are one font.
DUPLICATE_RMS = 0.02

FONT_SUFFIXES = (".ttf", ".otf", ".ttc", ".otc")
#: File-name patterns (lower case) of fonts whose letters are not letters.
_EXCLUDED_FILES = {
    "d050000l*": "dingbats",
    "linbiolinum_k*": "keyboard caps",
    "ellen*": "Greek letters at Latin code points",  # fonts-linex
    "elleboli*": "Greek letters at Latin code points",
}
_SMALL_CAPS = re.compile(r"small ?caps|\bcaps\b|\bsc\b", re.IGNORECASE)

# Render settings (fractions of the canvas unless said otherwise); all in glyphs.json.
_SUPERSAMPLE = 4
_SCALE = (0.72, 0.92)  # line box (cap height + descender) over canvas height
_MAX_INK = 0.92  # a glyph larger than this is shrunk to fit
_ROTATION = 8.0  # degrees, either way
_JITTER = 0.10  # position offset, either way
_MARGIN = 0.03  # ink kept this far from the border
_MIN_CONTRAST = 96  # |luma(fg) - luma(bg)| in 0..255
_GRADIENT = 40  # max per-channel change of the background across the image
_NOISE = 6.0  # max std of the per-pixel noise, in grey levels
_CANONICAL_SIZE = 16  # dedupe renderings: no jitter, white on black
_REFERENCE_SIZE = 200  # pixel size at which the font's line box is measured


def class_name(char: str) -> str:
    """The class folder of ``char``: ``0041_A``, ``0061_a``, ``002F_solidus`` (safe on every OS;
    the code point keeps ``A`` and ``a`` apart on case-insensitive file systems)."""
    label = char if char.isascii() and char.isalnum() else unicodedata.name(char, "char").lower()
    return f"{ord(char):04X}_{re.sub(r'[^A-Za-z0-9]+', '-', label).strip('-')}"


# ----------------------------------------------------------------------------------- fonts


@dataclass
class _Face:
    """One face of a font file and what the selection made of it."""

    path: Path
    index: int
    sha256: str
    source: dict
    family: str = ""
    style: str = ""
    weight: int = 400
    italic: bool = False
    width: int = 5
    chars: str = ""  # the characters of the set it draws
    status: str = "kept"
    canonical: np.ndarray | None = field(default=None, repr=False)

    @property
    def id(self) -> str:
        stem = re.sub(r"[^A-Za-z0-9._-]+", "-", self.path.stem)
        suffix = f"-{self.index}" if self.index else ""
        return f"{stem}{suffix}-{self.sha256[:8]}"

    def record(self) -> dict:
        return {
            **self.source,
            "sha256": self.sha256,
            "face": self.index,
            "id": self.id,
            "family": self.family,
            "style": self.style,
            "covered": len(self.chars),
            "status": self.status,
        }


def _load(face: _Face, size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(
        str(face.path), size, index=face.index, layout_engine=ImageFont.Layout.BASIC
    )


def _read_faces(path: Path, source: dict, chars: str) -> tuple[list[_Face], list[dict]]:
    """The faces of one font file with their names and the characters their cmap maps
    (one per glyph); faces that cannot be used are returned as skipped records."""
    from fontTools import agl
    from fontTools.ttLib import TTCollection, TTFont

    data = path.read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    base = {**source, "sha256": sha}
    excluded = next(
        (why for pat, why in _EXCLUDED_FILES.items() if fnmatch.fnmatch(path.name.lower(), pat)),
        None,
    )
    if excluded:
        return [], [{**base, "status": f"skipped: {excluded}"}]
    try:
        if data[:4] == b"ttcf":
            fonts = list(TTCollection(path, lazy=True).fonts)
        else:
            fonts = [TTFont(path, lazy=True)]
    except Exception as e:  # fontTools raises many types on bad files
        return [], [{**base, "status": f"skipped: unreadable ({type(e).__name__}: {e})"}]
    faces, skipped = [], []
    for index, font in enumerate(fonts):
        where = {**base, "face": index}
        try:
            cmap = font.getBestCmap() or {}
            names = font["name"]
            family = str(names.getDebugName(16) or names.getDebugName(1) or path.stem)
            style = str(names.getDebugName(17) or names.getDebugName(2) or "")
            os2 = font.get("OS/2")
        except Exception as e:
            skipped.append({**where, "status": f"skipped: unreadable ({type(e).__name__}: {e})"})
            continue
        if _SMALL_CAPS.search(f"{family} {style}"):
            skipped.append({**where, "family": family, "style": style, "status": "skipped: caps"})
            continue
        covered, glyphs, remapped = [], set(), 0
        for char in chars:
            glyph = cmap.get(ord(char))
            if glyph is None or glyph in glyphs:
                continue
            decoded = agl.toUnicode(glyph)
            if decoded and decoded != char:  # the glyph's name says it is another character
                remapped += 1
                continue
            glyphs.add(glyph)
            covered.append(char)
        if remapped > 0.1 * len(chars):
            skipped.append(
                {**where, "family": family, "style": style, "status": "skipped: symbol font"}
            )
            continue
        faces.append(
            _Face(
                path=path,
                index=index,
                sha256=sha,
                source=source,
                family=family,
                style=style,
                weight=int(os2.usWeightClass) if os2 is not None else 400,
                italic=bool(os2.fsSelection & 1) if os2 is not None else "italic" in style.lower(),
                width=int(os2.usWidthClass) if os2 is not None else 5,
                chars="".join(covered),
            )
        )
    return faces, skipped


@dataclass(frozen=True)
class _Metrics:
    """A font's line box per pixel of font size: cap height above and descender below."""

    cap: float
    descender: float

    @property
    def span(self) -> float:
        return self.cap + self.descender


def _metrics(face: _Face) -> _Metrics:
    font = _load(face, _REFERENCE_SIZE)

    def ink(char: str) -> tuple[int, int, int, int] | None:
        if char not in face.chars:
            return None
        box = font.getbbox(char, anchor="ls")
        return box if box[3] > box[1] else None

    ascent, descent = font.getmetrics()
    top, bottom = ink("H"), ink("p")
    cap = -top[1] if top and top[1] < 0 else 0.7 * ascent
    descender = bottom[3] if bottom and bottom[3] > 0 else 0.8 * descent
    return _Metrics(cap / _REFERENCE_SIZE, max(descender, 0.1 * cap) / _REFERENCE_SIZE)


# -------------------------------------------------------------------------------- drawing


def _glyph_mask(
    font_at: dict[int, ImageFont.FreeTypeFont],
    face: _Face,
    metrics: _Metrics,
    char: str,
    side: int,
    scale: float,
    angle: float,
    shift: tuple[float, float],
) -> Image.Image | None:
    """``char`` as an L mask of ``side`` x ``side`` (255 = ink), or None if it draws nothing.

    The font's line box takes ``scale`` of the height (baseline kept), the ink is centred
    horizontally, rotated by ``angle`` about the canvas centre and moved by ``shift`` (fractions
    of ``side``) as far as the ink stays inside the margin.
    """
    size = max(1, round(scale * side / metrics.span))
    for _ in range(2):
        if size not in font_at:
            font_at[size] = _load(face, size)
        font = font_at[size]
        left, top, right, bottom = font.getbbox(char, anchor="ls")
        if right <= left or bottom <= top:
            return None
        largest = max(right - left, bottom - top)
        if largest <= _MAX_INK * side:
            break
        size = max(1, int(size * _MAX_INK * side / largest))
    pad = side // 4  # room for the rotation; the crop below pads with zeros beyond it
    big = Image.new("L", (side + 2 * pad, side + 2 * pad), 0)
    centre = pad + side / 2
    line_top = pad + (side - metrics.span * size) / 2
    baseline = line_top + metrics.cap * size
    x = centre - (left + right) / 2
    ImageDraw.Draw(big).text((x, baseline), char, font=font, fill=255, anchor="ls")
    if angle:
        big = big.rotate(angle, resample=Image.Resampling.BILINEAR, center=(centre, centre))
    box = big.getbbox()
    if box is None:
        return None
    margin = _MARGIN * side
    origin = []
    for axis in (0, 1):
        low, high = box[axis], box[axis + 2]
        wanted = pad + shift[axis] * side
        lo, hi = high + margin - side, low - margin
        origin.append(round(min(max(wanted, lo), hi) if lo <= hi else (low + high - side) / 2))
    return big.crop((origin[0], origin[1], origin[0] + side, origin[1] + side))


def _luma(rgb: np.ndarray) -> float:
    return float(rgb @ np.array([0.299, 0.587, 0.114]))


def _seed(face: _Face, char: str) -> int:
    key = f"{face.sha256}:{face.index}:{ord(char)}:{RENDER_VERSION}".encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "big")


def _render_image(
    font_at: dict[int, ImageFont.FreeTypeFont], face: _Face, metrics: _Metrics, char: str, size: int
) -> Image.Image | None:
    """One seeded RGB image of ``char`` in ``face``, ``size`` x ``size``."""
    rng = np.random.default_rng(_seed(face, char))
    side = size * _SUPERSAMPLE
    scale = rng.uniform(*_SCALE)
    angle = rng.uniform(-_ROTATION, _ROTATION)
    shift = tuple(rng.uniform(-_JITTER, _JITTER, 2))
    mask = _glyph_mask(font_at, face, metrics, char, side, scale, angle, shift)
    if mask is None:
        return None
    bg = rng.integers(0, 256, 3).astype(np.float64)
    for _ in range(32):
        fg = rng.integers(0, 256, 3).astype(np.float64)
        if abs(_luma(fg) - _luma(bg)) >= _MIN_CONTRAST:
            break
    else:
        fg = np.zeros(3) if _luma(bg) > 127 else np.full(3, 255.0)
    direction = rng.uniform(0, 2 * np.pi)
    change = rng.uniform(-_GRADIENT, _GRADIENT, 3)
    noise = rng.uniform(0, _NOISE)
    # Compositing is linear in the mask and the gradient is linear in position, so box-filtering
    # the mask first and compositing at the output size equals compositing at 4x, then filtering.
    ramp = np.linspace(-0.5, 0.5, size)
    along = np.cos(direction) * ramp[None, :] + np.sin(direction) * ramp[:, None]
    background = np.clip(bg + along[..., None] * change, 0, 255)
    alpha = np.asarray(mask.reduce(_SUPERSAMPLE), dtype=np.float64)[..., None] / 255.0
    small = background * (1 - alpha) + fg * alpha
    small += rng.normal(0, noise, small.shape)
    return Image.fromarray(np.clip(np.rint(small), 0, 255).astype(np.uint8), "RGB")


def _canonical(face: _Face, metrics: _Metrics, chars: str) -> np.ndarray:
    """Canonical 16x16 renderings (0..1) of ``chars``; NaN where the face draws nothing."""
    side = _CANONICAL_SIZE * _SUPERSAMPLE
    out = np.full((len(chars), _CANONICAL_SIZE, _CANONICAL_SIZE), np.nan, dtype=np.float32)
    font_at: dict[int, ImageFont.FreeTypeFont] = {}
    for i, char in enumerate(chars):
        if char not in face.chars:
            continue
        mask = _glyph_mask(font_at, face, metrics, char, side, 0.82, 0.0, (0.0, 0.0))
        if mask is not None:
            small = np.asarray(mask.reduce(_SUPERSAMPLE), dtype=np.float32) / 255.0
            if small.max() > 0.1:  # draws visible ink
                out[i] = small
    return out


# ------------------------------------------------------------------------------ selection


def _dedupe_rendered(faces: list[_Face]) -> None:
    """Mark faces whose canonical renderings match an earlier face's as duplicates."""
    groups: dict[str, list[_Face]] = {}
    for face in faces:
        groups.setdefault(face.chars, []).append(face)
    for group in groups.values():
        if len(group) < 2:
            continue
        vectors = np.stack([np.nan_to_num(f.canonical).ravel() for f in group]).astype(np.float64)
        sq = (vectors**2).sum(axis=1)
        dist = np.sqrt(np.maximum(sq[:, None] + sq[None, :] - 2 * vectors @ vectors.T, 0))
        rms = dist / np.sqrt(len(group[0].chars) * _CANONICAL_SIZE**2)
        for i, face in enumerate(group):
            for j in range(i):
                if group[j].status == "kept" and rms[i, j] < DUPLICATE_RMS:
                    face.status = f"duplicate of {group[j].id} (rms {rms[i, j]:.4f})"
                    break


def _cap_families(faces: list[_Face], per_family: int) -> None:
    """Keep at most ``per_family`` styles per family: one per (bold, italic) kind first, the
    weights nearest regular or bold and the normal width preferred."""
    families: dict[str, list[_Face]] = {}
    for face in faces:
        families.setdefault(face.family, []).append(face)
    for members in families.values():
        members.sort(
            key=lambda f: (
                min(abs(f.weight - 400), abs(f.weight - 700)),
                f.italic,
                abs(f.width - 5),
                f.id,
            )
        )
        kinds, chosen = set(), []
        for face in members:
            kind = (face.weight >= 600, face.italic)
            if kind not in kinds and len(chosen) < per_family:
                kinds.add(kind)
                chosen.append(face)
        for face in members:
            if len(chosen) >= per_family:
                break
            if face not in chosen:
                chosen.append(face)
        for face in members:
            if face not in chosen:
                face.status = f"family cap ({per_family} styles of {face.family})"


# -------------------------------------------------------------------------------- render


def _prepare(face: _Face, chars: str) -> tuple[_Metrics, np.ndarray] | str:
    """A face's line box and canonical renderings, or why FreeType cannot use it."""
    try:
        metrics = _metrics(face)
        return metrics, _canonical(face, metrics, chars)
    except Exception as e:  # FreeType raises OSError and others on bad fonts
        return f"skipped: FreeType cannot render it ({type(e).__name__}: {e})"


def _render_face(job: tuple[_Face, _Metrics, Path, int]) -> str:
    """Write the PNGs of one face; returns the characters drawn."""
    face, metrics, out, size = job
    font_at: dict[int, ImageFont.FreeTypeFont] = {}
    drawn = ""
    for char in face.chars:
        image = _render_image(font_at, face, metrics, char, size)
        if image is not None:
            image.save(out / class_name(char) / f"{face.id}.png", format="PNG")
            drawn += char
    return drawn


class _Serial:
    """The ``map`` of a process pool, run here (few fonts: no start-up cost)."""

    def __enter__(self) -> _Serial:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def map(self, fn: Callable[..., _T], *iterables: Iterable) -> Iterator[_T]:
        return map(fn, *iterables)


def _pool(workers: int | None, jobs: int) -> ProcessPoolExecutor | _Serial:
    """A pool of ``workers`` processes (default: up to 2 when there are 16+ fonts)."""
    if workers is None:
        workers = min(2, os.cpu_count() or 1) if jobs >= 16 else 1
    return ProcessPoolExecutor(workers) if workers > 1 else _Serial()


def render_glyphs(
    fonts: Sequence[Path],
    out: Path,
    chars: str = DEFAULT_CHARS,
    size: int = FONT_SET_SPEC.height,
    sources: Mapping[Path, Mapping[str, str]] | None = None,
    min_coverage: float = MIN_COVERAGE,
    max_styles_per_family: int = MAX_STYLES_PER_FAMILY,
    extra: Mapping[str, object] | None = None,
    workers: int | None = None,
) -> dict:
    """Render ``chars`` in the usable ``fonts`` into ``out/<class>/<font id>.png``.

    ``sources`` gives each font file's provenance for ``glyphs.json`` (default: its path);
    ``extra`` is merged into it (the fetch adds the packages); ``workers`` processes render
    (default: up to 2 when there are 16+ fonts, else this process; the output does not depend
    on it). Font files that cannot be read or used are listed with the reason, never fatal.
    Returns the manifest written to ``out/glyphs.json``.
    """
    started = time.perf_counter()
    chars = "".join(dict.fromkeys(chars))
    if not chars:
        raise DataError("render_glyphs: no characters to render")
    if size < 8:
        raise DataError(f"render_glyphs: image size {size} is too small (at least 8)")
    out = Path(out)
    records: list[dict] = []
    faces: list[_Face] = []
    seen: dict[str, str] = {}
    for path in sorted({Path(f) for f in fonts}, key=lambda p: str(p)):
        source = dict((sources or {}).get(path, {"path": str(path)}))
        if not path.is_file():
            records.append({**source, "status": "skipped: no such file"})
            continue
        found, skipped = _read_faces(path, source, chars)
        records += skipped
        for face in found:
            key = f"{face.sha256}:{face.index}"
            if key in seen:
                face.status = f"duplicate of {seen[key]} (same file)"
            else:
                seen[key] = face.id
            faces.append(face)
    low = min_coverage * len(chars)
    for face in faces:
        if face.status == "kept" and len(face.chars) < low:
            face.status = f"low coverage ({len(face.chars)}/{len(chars)} characters)"
    # Measure and draw each face canonically; fonts FreeType cannot use are skipped.
    todo = [f for f in faces if f.status == "kept"]
    logger.info("measuring %d fonts of %d files", len(todo), len(seen))
    metrics: dict[str, _Metrics] = {}
    with _pool(workers, len(todo)) as pool:
        for face, result in zip(todo, pool.map(_prepare, todo, [chars] * len(todo)), strict=True):
            if isinstance(result, str):
                face.status = result
                continue
            metrics[face.id], face.canonical = result
            drawn = ~np.isnan(face.canonical[:, 0, 0])  # rows of undrawn characters are NaN
            face.chars = "".join(c for c, ok in zip(chars, drawn, strict=True) if ok)
            if len(face.chars) < low:
                face.status = f"low coverage ({len(face.chars)}/{len(chars)} drawn)"
        kept = [f for f in faces if f.status == "kept"]
        _dedupe_rendered(kept)
        _cap_families([f for f in kept if f.status == "kept"], max_styles_per_family)
        kept = [f for f in faces if f.status == "kept"]

        for c in chars:
            (out / class_name(c)).mkdir(parents=True, exist_ok=True)
        jobs = [(replace(f, canonical=None), metrics[f.id], out, size) for f in kept]
        logger.info("rendering %d fonts x %d characters into %s", len(kept), len(chars), out)
        for face, drawn in zip(kept, pool.map(_render_face, jobs), strict=True):
            face.chars = drawn
    counts = {c: sum(c in f.chars for f in kept) for c in chars}
    records += [face.record() for face in faces]
    images = sum(counts.values())
    nbytes = sum(p.stat().st_size for p in out.rglob("*.png"))
    manifest = {
        "format": _FORMAT,
        "render_version": RENDER_VERSION,
        "selection_version": SELECTION_VERSION,
        **dict(extra or {}),
        "classes": [
            {
                "folder": class_name(c),
                "char": c,
                "codepoint": f"U+{ord(c):04X}",
                "name": unicodedata.name(c, ""),
                "images": counts[c],
            }
            for c in chars
        ],
        "render": {
            "size": size,
            "channels": 3,
            "supersample": _SUPERSAMPLE,
            "line_box_scale": list(_SCALE),
            "max_ink": _MAX_INK,
            "rotation_degrees": _ROTATION,
            "jitter": _JITTER,
            "margin": _MARGIN,
            "min_luma_contrast": _MIN_CONTRAST,
            "gradient": _GRADIENT,
            "noise_std_max": _NOISE,
            "min_coverage": min_coverage,
            "max_styles_per_family": max_styles_per_family,
            "duplicate_rms": DUPLICATE_RMS,
            "seed": "sha256(font sha256:face:code point:render_version)[:8]",
            "pillow": pillow_version,
            "freetype": pil_features.version("freetype2"),
        },
        "fonts": records,
        "counts": {
            "font_files": len({r["sha256"] for r in records if "sha256" in r}),
            "fonts": len(kept),
            "families": len({f.family for f in kept}),
            "classes": len(chars),
            "images": images,
            "bytes": nbytes,
            "seconds": round(time.perf_counter() - started, 1),
        },
    }
    with atomic_path(out / MANIFEST_NAME) as tmp:
        tmp.write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n")
    logger.info(
        "rendered %d images of %d classes from %d fonts into %s",
        images,
        len(chars),
        len(kept),
        out,
    )
    return manifest


# --------------------------------------------------------------------------------- fetch


def _search_dirs(name: str) -> list[Path]:
    dirs = []
    env = os.environ.get("CMCE_DATA")
    if env:
        dirs.append(Path(env).expanduser() / name)
    dirs.append(cache_dir(name))
    return dirs


def _is_current(root: Path, chars: str | None = None) -> bool:
    """True if ``root`` holds a complete rendering by this code's versions (of ``chars``, when
    given)."""
    try:
        manifest = json.loads((root / MANIFEST_NAME).read_text())
    except (OSError, ValueError):
        return False
    return (
        isinstance(manifest, dict)
        and manifest.get("format") == _FORMAT
        and manifest.get("render_version") == RENDER_VERSION
        and manifest.get("selection_version") == SELECTION_VERSION
        and (
            chars is None
            or [c.get("char") for c in manifest.get("classes", [])] == list(dict.fromkeys(chars))
        )
    )


def _missing_message(font_set: FontSet) -> str:
    folders = "\n".join(f"  {d}" for d in _search_dirs(font_set.name))
    return (
        f"the {font_set.name} dataset (version {RENDER_VERSION}.{SELECTION_VERSION}) was not "
        f"found in:\n{folders}\n"
        f"Get it with:  cmce data fetch {font_set.name}   ({font_set.about}; apt-get download "
        "+ dpkg -x, no root needed)\n"
        f"or set CMCE_DATA=DIR to use DIR/{font_set.name}."
    )


def glyphs_dir(name: str = "glyphs") -> Path:
    """The root of the built-in font set ``name`` (:data:`FONT_SETS`): ``$CMCE_DATA/<name>``,
    then ``${XDG_CACHE_HOME:-~/.cache}/cmce/<name>``, whichever holds a ``glyphs.json`` of this
    code's versions and the set's characters; DatasetMissing if none."""
    if (found := _found(name, FONT_SETS[name].chars)) is None:
        raise DatasetMissing(_missing_message(FONT_SETS[name]))
    return found


def _found(name: str, chars: str) -> Path | None:
    return next((d for d in _search_dirs(name) if _is_current(d, chars)), None)


def _deb_version(deb: Path) -> str:
    """The version in an ``apt-get download`` file name (``name_version_arch.deb``)."""
    return urllib.parse.unquote(deb.name.split("_")[1])


def _download(packages: Sequence[str], workdir: Path) -> tuple[list[Path], list[str]]:
    """The .deb files of ``packages`` (one ``apt-get download``; package by package if that
    fails, so that one missing package does not stop the rest) and the packages not found."""
    try:
        return apt_download(packages, workdir), []
    except RuntimeError as e:
        logger.warning("apt-get download of all packages failed (%s); one by one", e)
    debs, missing = [], []
    for name in packages:
        try:
            debs += apt_download([name], workdir)
        except RuntimeError as e:
            logger.warning("%s: %s", name, e)
            missing.append(name)
    return debs, missing


def fetch_glyphs(dest: Path | None = None, font_set: FontSet = GLYPHS) -> Path:
    """Make ``font_set`` (its characters drawn in the fonts of its packages) available and
    return its root.

    Nothing happens when ``dest`` (default: the first of :func:`glyphs_dir`'s folders that has
    it, else ``${XDG_CACHE_HOME:-~/.cache}/cmce/<name>``) already holds a rendering of this
    code's versions (:data:`RENDER_VERSION`, :data:`SELECTION_VERSION`) of these characters.
    Otherwise the packages are fetched with ``apt-get download`` + ``dpkg -x`` into a temporary
    folder and rendered into the root all-or-nothing.
    """
    packages, chars = font_set.packages, font_set.chars
    if dest is None:
        if (found := _found(font_set.name, chars)) is not None:
            return found
        target = cache_dir(font_set.name)
    else:
        target = Path(dest).expanduser()
        if _is_current(target, chars):
            logger.info("%s already present in %s", font_set.name, target)
            return target
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="cmce-glyphs-") as work:
        workdir = Path(work)
        try:
            debs, missing = _download(packages, workdir)
            if not debs:
                raise RuntimeError(f"none of the {len(packages)} font packages could be downloaded")
            fonts: dict[Path, dict] = {}
            package_records = []
            for deb in debs:
                name = deb.name.split("_")[0]
                root = workdir / "root" / name
                root.mkdir(parents=True)
                dpkg_extract(deb, root)
                package_records.append(
                    {"name": name, "version": _deb_version(deb), "bytes": deb.stat().st_size}
                )
                for path in sorted(root.rglob("*")):
                    usable = path.suffix.lower() in FONT_SUFFIXES and not path.is_symlink()
                    if usable and path.is_file():
                        fonts[path] = {"package": name, "path": f"/{path.relative_to(root)}"}
        except (RuntimeError, OSError, subprocess.SubprocessError) as e:
            raise DatasetMissing(f"{_missing_message(font_set)}\nFetching failed: {e}") from e
        download_seconds = time.perf_counter() - started
        target.parent.mkdir(parents=True, exist_ok=True)
        with folder_transaction(target, start="empty") as stage:
            manifest = render_glyphs(
                list(fonts),
                stage,
                chars,
                sources=fonts,
                extra={
                    "packages": package_records,
                    "packages_missing": missing,
                    "download_seconds": round(download_seconds, 1),
                },
            )
    counts = manifest["counts"]
    logger.info(
        "%s: %d packages (%.1f MB), %d fonts, %d classes, %d images in %.0f s -> %s",
        font_set.name,
        len(package_records),
        sum(p["bytes"] for p in package_records) / 1e6,
        counts["fonts"],
        counts["classes"],
        counts["images"],
        time.perf_counter() - started,
        target,
    )
    return target
