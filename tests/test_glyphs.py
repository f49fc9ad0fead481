"""Tests for gallery_builder.data.glyphs: the font-glyph open-set dataset.

No network: fonts are the ones matplotlib ships (mpl-data/fonts/ttf); the fetch test builds
real .deb files from them with ``dpkg-deb --build`` and lets the real ``dpkg -x`` unpack them,
only ``apt-get download`` is replaced.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
from dataclasses import replace
from pathlib import Path

import matplotlib
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from gallery_builder.cli.main import main as cli
from gallery_builder.data import glyphs
from gallery_builder.data.datasets import DatasetMissing, load_image_folder, load_source
from gallery_builder.data.glyphs import (
    DEFAULT_CHARS,
    FONT_SET_SPEC,
    FONT_SETS,
    GLYPHS,
    HAN,
    MANIFEST_NAME,
    FontSet,
    class_name,
    fetch_glyphs,
    glyphs_dir,
    han_characters,
    render_glyphs,
)
from gallery_builder.data.sources import open_source
from gallery_builder.evaluation.experiment import load_config
from query_sdk.spec import InputSpec

MPL_FONTS = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
CHARS = "AaBg0?§("
SANS = MPL_FONTS / "DejaVuSans.ttf"


def pngs(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*.png"))}


def status(manifest: dict, name: str) -> str:
    (record,) = [r for r in manifest["fonts"] if Path(r["path"]).name == name]
    return record["status"]


@pytest.fixture(scope="module")
def fonts(tmp_path_factory) -> list[Path]:
    """Seven usable fonts plus every kind of font file that must be skipped."""
    folder = tmp_path_factory.mktemp("fonts")
    names = [
        "DejaVuSans.ttf",
        "DejaVuSans-Bold.ttf",
        "DejaVuSans-Oblique.ttf",
        "DejaVuSans-BoldOblique.ttf",
        "DejaVuSerif.ttf",
        "DejaVuSansMono.ttf",
        "STIXGeneral.ttf",
        "cmex10.ttf",  # a symbol font: letters mapped to other glyphs
        "STIXSizOneSymReg.ttf",  # low coverage
    ]
    paths = [MPL_FONTS / n for n in names]
    copy = folder / "SameFile.ttf"
    shutil.copyfile(SANS, copy)  # identical bytes
    padded = folder / "SameDrawing.ttf"
    padded.write_bytes(SANS.read_bytes() + b"\0" * 16)  # other sha256, same rendering
    corrupt = folder / "Corrupt.ttf"
    corrupt.write_bytes(b"\x00\x01\x00\x00" + bytes(range(256)) * 8)
    truncated = folder / "Truncated.otf"
    truncated.write_bytes(SANS.read_bytes()[:2000])
    return [*paths, copy, padded, corrupt, truncated, folder / "Missing.ttf"]


@pytest.fixture(scope="module")
def rendered(fonts, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("glyphs")
    return out, render_glyphs(fonts, out, chars=CHARS, workers=1)


def test_class_folders_counts_and_images(rendered):
    out, manifest = rendered
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == sorted(map(class_name, CHARS))
    kept = [r for r in manifest["fonts"] if r["status"] == "kept"]
    assert len(kept) == manifest["counts"]["fonts"] == 7
    for entry in manifest["classes"]:
        files = sorted((out / entry["folder"]).glob("*.png"))
        assert len(files) == entry["images"] == 7, entry
        assert entry["codepoint"] == f"U+{ord(entry['char']):04X}"
    assert manifest["counts"]["images"] == 7 * len(CHARS)
    assert manifest["counts"]["bytes"] == sum(p.stat().st_size for p in out.rglob("*.png"))
    arrays = []
    for path in sorted((out / class_name("A")).glob("*.png")):
        image = Image.open(path)
        assert (image.size, image.mode) == ((32, 32), "RGB")
        pixels = np.asarray(image, dtype=np.float64)
        arrays.append(pixels)
        # a glyph on a background: two clearly different tones, not a flat image
        grey = pixels.mean(axis=2)
        assert np.percentile(grey, 95) - np.percentile(grey, 5) > 60, path.name
    # fonts differ, and so do their seeded sizes, positions and colours
    assert len({a.tobytes() for a in arrays}) == len(arrays)


def test_lower_case_is_drawn_smaller_than_upper_case(rendered):
    out, manifest = rendered
    (font,) = [r["id"] for r in manifest["fonts"] if Path(r["path"]).name == "DejaVuSerif.ttf"]

    def ink_height(char: str) -> int:
        pixels = np.asarray(Image.open(out / class_name(char) / f"{font}.png"), dtype=float)
        grey = pixels.mean(axis=2)
        background = np.median(np.concatenate([grey[0], grey[-1]]))
        rows = np.abs(grey - background).max(axis=1) > 50
        return int(rows.sum())

    assert ink_height("a") < ink_height("A")


def test_manifest_records_every_font_file(rendered, fonts):
    out, manifest = rendered
    assert json.loads((out / MANIFEST_NAME).read_text()) == manifest
    assert manifest["format"] == "cmce-glyphs"
    assert manifest["render_version"] == glyphs.RENDER_VERSION
    assert manifest["selection_version"] == glyphs.SELECTION_VERSION
    assert [c["char"] for c in manifest["classes"]] == list(CHARS)
    assert manifest["render"]["size"] == 32 and manifest["render"]["min_coverage"] == 0.95
    by_path = {r["path"]: r for r in manifest["fonts"]}
    assert set(by_path) == {str(f) for f in fonts}
    for path in fonts[:-1]:
        assert by_path[str(path)]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    sans_id = by_path[str(SANS)]["id"]
    assert re.fullmatch(r"DejaVuSans-[0-9a-f]{8}", sans_id)
    assert by_path[str(SANS)]["covered"] == len(CHARS)


def test_unusable_fonts_are_skipped_and_listed(rendered):
    _, manifest = rendered
    assert status(manifest, "cmex10.ttf") == "skipped: symbol font"
    assert status(manifest, "STIXSizOneSymReg.ttf").startswith("low coverage")
    assert status(manifest, "Corrupt.ttf").startswith("skipped: unreadable")
    assert status(manifest, "Truncated.otf").startswith("skipped: unreadable")
    assert status(manifest, "Missing.ttf") == "skipped: no such file"
    # one drawing in three files, two of them byte-identical: one kept, two duplicates
    three = sorted(
        status(manifest, n) for n in ("DejaVuSans.ttf", "SameFile.ttf", "SameDrawing.ttf")
    )
    assert re.fullmatch(r"duplicate of \S+ \(rms 0\.0000\)", three[0])
    assert re.fullmatch(r"duplicate of \S+ \(same file\)", three[1])
    assert three[2] == "kept"


def test_render_is_byte_identical_and_independent_of_the_other_fonts(rendered, tmp_path):
    out, _ = rendered
    first = pngs(out)
    fewer = [MPL_FONTS / "DejaVuSansMono.ttf", MPL_FONTS / "DejaVuSerif.ttf"]
    again = render_glyphs(fewer, tmp_path / "a", chars=CHARS, workers=2)
    assert again["counts"]["fonts"] == 2
    second = pngs(tmp_path / "a")
    assert second and all(first[name] == data for name, data in second.items())


def test_family_cap_keeps_one_style_of_each_kind_first(tmp_path):
    styles = ["DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSans-Oblique.ttf"]
    manifest = render_glyphs(
        [MPL_FONTS / s for s in styles], tmp_path, chars="Ab", max_styles_per_family=2
    )
    assert status(manifest, "DejaVuSans.ttf") == "kept"
    assert status(manifest, "DejaVuSans-Bold.ttf") == "kept"
    assert status(manifest, "DejaVuSans-Oblique.ttf").startswith("family cap (2 styles")


def test_root_loads_as_an_image_folder(rendered):
    out, manifest = rendered
    images = load_image_folder(out, InputSpec(32, 32, 3))
    assert len(images) == manifest["counts"]["images"] and not images.skipped
    assert images.classes == sorted(map(class_name, CHARS))


def test_class_names_are_unique_and_safe():
    names = [class_name(c) for c in DEFAULT_CHARS]
    assert len(DEFAULT_CHARS) == len(set(DEFAULT_CHARS)) == 100
    assert len({n.lower() for n in names}) == len(names)  # case-insensitive file systems
    assert all(re.fullmatch(r"[0-9A-F]{4}_[A-Za-z0-9-]+", n) for n in names)
    assert class_name("/") == "002F_solidus" and class_name("a") == "0061_a"


def test_han_draws_distinct_common_characters_that_extend_each_other():
    chars = han_characters(1000)
    assert len(set(chars)) == 1000 and chars == han_characters(1000)  # seeded
    assert all("\u4e00" <= c <= "\u9fff" for c in chars)  # CJK unified ideographs
    assert chars[:5] != han_characters(5, seed=1)
    assert HAN.chars == chars[:600]  # the built-in set is the start of any larger draw
    assert len(han_characters(3755)) == 3755  # all of GB2312 level 1
    with pytest.raises(ValueError, match="1..3755"):
        han_characters(3756)
    assert set(FONT_SETS) == {"glyphs", "han"} and FONT_SETS["glyphs"].chars == DEFAULT_CHARS


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("CMCE_DATA", raising=False)
    return tmp_path


def test_glyphs_dir_explains_how_to_fetch(isolated, rendered, monkeypatch):
    with pytest.raises(DatasetMissing, match="cmce data fetch glyphs"):
        glyphs_dir()
    result = CliRunner().invoke(cli, ["data", "where", "glyphs"])
    assert result.exit_code != 0 and "cmce data fetch glyphs" in result.output
    data = isolated / "data"
    shutil.copytree(rendered[0], data / "glyphs")
    monkeypatch.setenv("CMCE_DATA", str(data))
    with pytest.raises(DatasetMissing):  # a rendering of other characters is not the set
        glyphs_dir()
    monkeypatch.setitem(FONT_SETS, "glyphs", replace(GLYPHS, chars=CHARS))
    assert glyphs_dir() == data / "glyphs"
    assert CliRunner().invoke(cli, ["data", "where", "glyphs"]).output.strip() == str(
        data / "glyphs"
    )
    loaded = load_source("glyphs")  # the built-in name reads the root as an image folder
    assert loaded.images.shape == (len(pngs(data / "glyphs")), 32, 32, 3)
    items = open_source("glyphs")
    assert len(items) == len(loaded) and items.items[0].class_name == class_name("(")
    # `cmce train --data glyphs` knows the set's input spec, as it knows fashion-mnist's
    args = ["train", "query", "--data", "glyphs", "--steps", "2", "--batch-size", "8"]
    trained = CliRunner().invoke(cli, [*args, "--no-flip", "--out", str(isolated / "q")])
    assert trained.exit_code == 0, trained.output
    config = json.loads((isolated / "q" / "config.json").read_text())
    assert InputSpec.from_dict(config["input_spec"]) == FONT_SET_SPEC
    manifest = json.loads((data / "glyphs" / MANIFEST_NAME).read_text())
    manifest["selection_version"] = glyphs.SELECTION_VERSION - 1  # made by older code
    (data / "glyphs" / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(DatasetMissing):
        glyphs_dir()


def build_deb(workdir: Path, name: str, fonts: list[Path]) -> Path:
    """A real Debian package ``name`` holding ``fonts`` in /usr/share/fonts/truetype/<name>/."""
    tree = workdir / f"{name}-tree"
    (tree / "DEBIAN").mkdir(parents=True)
    (tree / "DEBIAN" / "control").write_text(
        f"Package: {name}\nVersion: 1:2.0-1\nArchitecture: all\n"
        "Maintainer: test <test@example.org>\nDescription: test fonts\n"
    )
    folder = tree / "usr" / "share" / "fonts" / "truetype" / name
    folder.mkdir(parents=True)
    for font in fonts:
        shutil.copyfile(font, folder / font.name)
    (folder / "link.ttf").symlink_to(fonts[0].name)  # symlinks are not read twice
    deb = workdir / f"{name}_1%3a2.0-1_all.deb"
    subprocess.run(
        ["dpkg-deb", "--build", "-Zgzip", str(tree), str(deb)], check=True, capture_output=True
    )
    return deb


@pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="needs dpkg-deb")
def test_fetch_unpacks_packages_renders_and_then_is_a_no_op(isolated, monkeypatch):
    packages = {
        "fonts-one": [SANS, MPL_FONTS / "DejaVuSerif.ttf"],
        "fonts-two": [MPL_FONTS / "DejaVuSansMono.ttf"],
    }
    calls = []

    def fake_apt_download(names, workdir):
        calls.append(list(names))
        if "fonts-gone" in names:
            raise RuntimeError("E: Unable to locate package fonts-gone")
        return [build_deb(workdir, n, packages[n]) for n in names]

    monkeypatch.setattr(glyphs, "apt_download", fake_apt_download)
    root = fetch_glyphs(font_set=replace(GLYPHS, packages=("fonts-one", "fonts-gone", "fonts-two")))
    assert root == isolated / "cache" / "cmce" / "glyphs"
    manifest = json.loads((root / MANIFEST_NAME).read_text())
    assert manifest["packages"] == [
        {"name": "fonts-one", "version": "1:2.0-1", "bytes": manifest["packages"][0]["bytes"]},
        {"name": "fonts-two", "version": "1:2.0-1", "bytes": manifest["packages"][1]["bytes"]},
    ]
    assert manifest["packages_missing"] == ["fonts-gone"]
    assert {(r["package"], r["path"]) for r in manifest["fonts"]} == {
        (p, f"/usr/share/fonts/truetype/{p}/{f.name}") for p, fs in packages.items() for f in fs
    }
    assert manifest["counts"]["fonts"] == 3
    assert manifest["counts"]["images"] == 3 * len(DEFAULT_CHARS) == len(pngs(root))
    assert glyphs_dir() == root
    calls.clear()
    assert fetch_glyphs() == root and calls == []  # present: nothing downloaded
    result = CliRunner().invoke(cli, ["data", "fetch", "glyphs"])
    assert result.exit_code == 0 and result.output.strip() == str(root) and calls == []
    # other characters into that folder: rendered anew, then present too
    other = FontSet("other", ("fonts-two",), "xyz", "three letters")
    assert fetch_glyphs(root, other) == root and calls == [["fonts-two"]]
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["0078_x", "0079_y", "007A_z"]
    assert fetch_glyphs(root, other) == root and len(calls) == 1
    # the han set: its own folder, `cmce data fetch/where han`, a source and a preset's data
    calls.clear()
    with pytest.raises(DatasetMissing, match="cmce data fetch han"):
        glyphs_dir("han")
    monkeypatch.setitem(FONT_SETS, "han", replace(HAN, packages=("fonts-one",), chars="AB"))
    result = CliRunner().invoke(cli, ["data", "fetch", "han"])
    han = isolated / "cache" / "cmce" / "han"
    assert result.exit_code == 0 and result.output.strip() == str(han), result.output
    assert calls == [["fonts-one"]] and sorted(p.name for p in han.iterdir() if p.is_dir()) == [
        "0041_A",
        "0042_B",
    ]
    assert CliRunner().invoke(cli, ["data", "where", "han"]).output.strip() == str(han)
    assert len(load_source("han")) == len(open_source("han")) == 2 * 2  # two fonts x AB
    assert load_config("han").dataset == "han"  # `cmce demo --preset han` reads it
    # a set of one's own, without a folder: the cache folder of its name
    mine = fetch_glyphs(font_set=FontSet("mine", ("fonts-two",), "q", "one letter"))
    assert mine == isolated / "cache" / "cmce" / "mine" and (mine / "0071_q").is_dir()
