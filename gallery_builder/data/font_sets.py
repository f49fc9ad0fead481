"""The built-in font sets: which characters, drawn in the fonts of which Debian packages.

Only definitions (no imaging libraries), so that the CLI can name the sets at start-up;
:mod:`gallery_builder.data.glyphs` fetches and renders them.
"""

from __future__ import annotations

import contextlib
import random
import string
from dataclasses import dataclass

from query_sdk.spec import InputSpec

__all__ = [
    "DEFAULT_CHARS",
    "FONT_SETS",
    "FONT_SET_SPEC",
    "GLYPHS",
    "HAN",
    "HAN_PACKAGES",
    "PACKAGES",
    "FontSet",
    "han_characters",
]

#: 100 classes: Latin upper and lower case, digits, 23 ASCII and 15 Latin-1 signs that nearly
#: every Latin font has (the tiny marks . , ' ` - _ " : ; are left out).
DEFAULT_CHARS = (
    string.ascii_uppercase
    + string.ascii_lowercase
    + string.digits
    + "!#$%&()*+/<=>?@[\\]^{|}~"
    + "¡¢£¥§©®¶±×÷¿ßµ°"
)

#: The Debian packages of the glyphs set (Latin text fonts; about 110 MB of .deb files).
PACKAGES: tuple[str, ...] = (
    "fonts-adf-accanthis",
    "fonts-adf-baskervald",
    "fonts-adf-berenis",
    "fonts-adf-gillius",
    "fonts-adf-ikarius",
    "fonts-adf-irianis",
    "fonts-adf-libris",
    "fonts-adf-mekanus",
    "fonts-adf-oldania",
    "fonts-adf-romande",
    "fonts-adf-switzera",
    "fonts-adf-tribun",
    "fonts-adf-universalis",
    "fonts-adf-verana",
    "fonts-agave",
    "fonts-anonymous-pro",
    "fonts-arkpandora",
    "fonts-averia-gwf",
    "fonts-averia-sans-gwf",
    "fonts-averia-serif-gwf",
    "fonts-beteckna",
    "fonts-cabin",
    "fonts-cantarell",
    "fonts-clear-sans",
    "fonts-cmu",
    "fonts-comic-neue",
    "fonts-courier-prime",
    "fonts-croscore",
    "fonts-crosextra-caladea",
    "fonts-crosextra-carlito",
    "fonts-dejavu-core",
    "fonts-dejavu-extra",
    "fonts-dkg-handwriting",
    "fonts-dosis",
    "fonts-dustin",
    "fonts-ebgaramond",
    "fonts-fantasque-sans",
    "fonts-femkeklaver",
    "fonts-firacode",
    "fonts-freefont-ttf",
    "fonts-gfs-artemisia",
    "fonts-gfs-didot",
    "fonts-gfs-neohellenic",
    "fonts-go",
    "fonts-hack",
    "fonts-humor-sans",
    "fonts-inconsolata",
    "fonts-inter",
    "fonts-isabella",
    "fonts-jetbrains-mono",
    "fonts-junicode",
    "fonts-jura",
    "fonts-karla",
    "fonts-lato",
    "fonts-league-spartan",
    "fonts-liberation2",
    "fonts-linex",
    "fonts-linuxlibertine",
    "fonts-lmodern",
    "fonts-lobster",
    "fonts-monofur",
    "fonts-mononoki",
    "fonts-noto-core",
    "fonts-noto-mono",
    "fonts-oldstandard",
    "fonts-open-sans",
    "fonts-oxygen",
    "fonts-paratype",
    "fonts-play",
    "fonts-quicksand",
    "fonts-roboto-slab",
    "fonts-roboto-unhinted",
    "fonts-sil-andika",
    "fonts-sil-charis",
    "fonts-sil-doulos",
    "fonts-sil-gentium",
    "fonts-sil-gentiumplus",
    "fonts-stix",
    "fonts-texgyre",
    "fonts-tiresias",
    "fonts-tuffy",
    "fonts-uralic",
    "fonts-urw-base35",
    "fonts-vollkorn",
    "fonts-yanone-kaffeesatz",
    "fonts-yrsa-rasa",
    "fonts-3270",
)


def han_characters(count: int, seed: int = 0) -> str:
    """``count`` characters of GB2312 level 1 (rows 0xB0-0xD7: the 3,755 most common Chinese
    characters), a seeded draw; the draws of one seed extend each other."""
    chars = []
    for row in range(0xB0, 0xD8):
        for cell in range(0xA1, 0xFF):
            with contextlib.suppress(UnicodeDecodeError):  # the unused end of row 0xD7
                chars.append(bytes([row, cell]).decode("gb2312"))
    if not 1 <= count <= len(chars):
        raise ValueError(f"the number of Han characters must be in 1..{len(chars)}, got {count}")
    random.Random(seed).shuffle(chars)
    return "".join(chars[:count])


#: Debian packages whose fonts draw the common simplified Chinese characters (about 300 MB of
#: .deb files; Japanese and traditional-only fonts lack too many of them and are left out).
HAN_PACKAGES: tuple[str, ...] = (
    "fonts-arphic-gbsn00lp",
    "fonts-arphic-gkai00mp",
    "fonts-arphic-ukai",
    "fonts-arphic-uming",
    "fonts-babelstone-han",
    "fonts-hanazono",
    "fonts-lxgw-wenkai",
    "fonts-noto-cjk",
    "fonts-noto-cjk-extra",
    "fonts-wqy-microhei",
    "fonts-wqy-zenhei",
)


@dataclass(frozen=True)
class FontSet:
    """A rendered dataset: ``chars`` drawn in the fonts of ``packages``, fetched into the folder
    ``name`` (for the built-in ones also their ``cmce data`` name and preset)."""

    name: str
    packages: tuple[str, ...]
    chars: str
    about: str  # what it is and what it downloads, for help and error messages


GLYPHS = FontSet(
    "glyphs",
    PACKAGES,
    DEFAULT_CHARS,
    f"100 characters (Latin letters, digits, signs) in the fonts of {len(PACKAGES)} Debian"
    " packages, about 110 MB of downloads",
)
HAN = FontSet(
    "han",
    HAN_PACKAGES,
    han_characters(600),
    f"600 Han characters in the fonts of {len(HAN_PACKAGES)} Debian packages, about 300 MB of"
    " downloads",
)
FONT_SETS = {s.name: s for s in (GLYPHS, HAN)}

#: The font sets' images as rendered: 32x32 RGB; mean and std per channel as measured on the
#: training classes of both sets (0.49-0.50 and 0.28-0.29), for commands that take a font set
#: without a split (``cmce train --data glyphs``); an experiment measures its own.
FONT_SET_SPEC = InputSpec(32, 32, 3, mean=(0.49, 0.5, 0.5), std=(0.285, 0.29, 0.29))
