"""Open-set data with many classes and few images each (the regime of face identification),
at a size of your choice: the ``han`` font set (``cmce data fetch han``: 600 Han characters)
drawn with ``--classes`` characters instead, for ``cmce experiment --data``.

``python -m benchmarks.many_classes [--dest DIR] [--classes 1000]`` fetches the CJK font
packages (``apt-get download`` + ``dpkg -x``, no root; about 300 MB of ``.deb`` files) and
renders a seeded draw of ``--classes`` characters of GB2312 level 1 (the 3,755 most common
Chinese characters; the draws extend each other, so the 600 of ``han`` are the first 600 of
any larger draw). Then::

    cmce experiment --data DEST --out runs/han

Measured figures are in the README (open set, many classes). There is no ``--smoke``: the data
is a download of the font packages.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import click

from gallery_builder.data.glyphs import HAN, fetch_glyphs, han_characters


@click.command()
@click.option(
    "--dest",
    type=click.Path(path_type=Path),
    default=Path.home() / ".cache" / "cmce" / "han-glyphs",
    show_default=True,
    help="Folder to render into (one folder per character).",
)
@click.option(
    "--classes",
    type=click.IntRange(1, 3755),
    default=1000,
    show_default=True,
    help="Characters (classes) drawn.",
)
def main(dest: Path, classes: int) -> None:
    """Fetch CJK font packages and render Han characters into DEST; print DEST."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    click.echo(fetch_glyphs(dest, replace(HAN, chars=han_characters(classes))))


if __name__ == "__main__":
    main()
