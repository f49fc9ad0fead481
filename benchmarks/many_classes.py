"""Open-set data with many classes and few images each (the regime of face identification):
Han characters drawn in the CJK fonts of Debian packages, for ``cmce experiment --data``.

``python -m benchmarks.many_classes [--dest DIR] [--classes 1000]`` fetches the font packages
(``apt-get download`` + ``dpkg -x``, no root; 452 MB of ``.deb`` files) and renders a seeded
draw of ``--classes`` characters of GB2312 level 1 (the 3,755 most common Chinese characters)
the way ``cmce data fetch glyphs`` renders Latin ones (``glyphs.json`` lists every package and
font). Then::

    cmce experiment --data DEST --out runs/han

Measured figures are in the README (open set, many classes). There is no ``--smoke``: the data
is a download of the font packages.
"""

from __future__ import annotations

import contextlib
import logging
import random
from pathlib import Path

import click

from gallery_builder.data.glyphs import fetch_glyphs

#: Debian packages with fonts that draw the common Chinese characters.
PACKAGES = (
    "fonts-arphic-bkai00mp",
    "fonts-arphic-bsmi00lp",
    "fonts-arphic-gbsn00lp",
    "fonts-arphic-gkai00mp",
    "fonts-arphic-ukai",
    "fonts-arphic-uming",
    "fonts-babelstone-han",
    "fonts-cwtex-fs",
    "fonts-cwtex-heib",
    "fonts-cwtex-kai",
    "fonts-cwtex-ming",
    "fonts-cwtex-yen",
    "fonts-hanazono",
    "fonts-horai-umefont",
    "fonts-ipaexfont-gothic",
    "fonts-ipaexfont-mincho",
    "fonts-ipafont-gothic",
    "fonts-ipafont-mincho",
    "fonts-klee",
    "fonts-komatuna",
    "fonts-lxgw-wenkai",
    "fonts-motoya-l-cedar",
    "fonts-motoya-l-maruberi",
    "fonts-mplus",
    "fonts-noto-cjk",
    "fonts-noto-cjk-extra",
    "fonts-sawarabi-gothic",
    "fonts-sawarabi-mincho",
    "fonts-seto",
    "fonts-takao-mincho",
    "fonts-umeplus",
    "fonts-vlgothic",
    "fonts-wqy-microhei",
    "fonts-wqy-zenhei",
)


def han_characters(count: int, seed: int = 0) -> str:
    """``count`` characters of GB2312 level 1 (rows 0xB0-0xD7), a seeded draw."""
    chars = []
    for row in range(0xB0, 0xD8):
        for cell in range(0xA1, 0xFF):
            with contextlib.suppress(UnicodeDecodeError):  # the unused end of row 0xD7
                chars.append(bytes([row, cell]).decode("gb2312"))
    if not 1 <= count <= len(chars):
        raise click.BadParameter(f"--classes must be in 1..{len(chars)}, got {count}")
    random.Random(seed).shuffle(chars)
    return "".join(chars[:count])


@click.command()
@click.option(
    "--dest",
    type=click.Path(path_type=Path),
    default=Path.home() / ".cache" / "cmce" / "han-glyphs",
    show_default=True,
    help="Folder to render into (one folder per character).",
)
@click.option("--classes", default=1000, show_default=True, help="Characters (classes) drawn.")
def main(dest: Path, classes: int) -> None:
    """Fetch CJK font packages and render Han characters into DEST; print DEST."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    click.echo(fetch_glyphs(dest, PACKAGES, han_characters(classes)))


if __name__ == "__main__":
    main()
