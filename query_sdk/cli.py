"""``cmce-query``: search a gallery with query images through the exported model (no torch)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from .bundle_format import QUANTIZATIONS
from .errors import cli_errors
from .images import ImageError
from .runtimes import BACKENDS

#: images decoded and embedded per model call
BATCH = 64


def _uncertainty(_ctx, _param, value: str | None) -> float | str | None:
    """``q0.9`` names a quantile from the manifest; anything else must be a number."""
    if value is None or value.lower().startswith("q"):
        return value
    try:
        return float(value)
    except ValueError:
        raise click.BadParameter(
            f"expected a number or a quantile name such as q0.9, got {value!r}"
        ) from None


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--bundle",
    required=True,
    type=click.Path(path_type=Path),
    help="Query bundle folder (cmce-export output).",
)
@click.option(
    "--gallery",
    required=True,
    type=click.Path(path_type=Path),
    help="Gallery folder (cmce-build-gallery output).",
)
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option(
    "--k",
    "k",
    default=10,
    show_default=True,
    type=click.IntRange(min=1),
    help="Hits per image (more than the gallery holds returns all of its items).",
)
@click.option(
    "--max-uncertainty",
    callback=_uncertainty,
    help="Leave out gallery items more uncertain than this: a number, or a quantile "
    "of the gallery's uncertainties such as q0.9.",
)
@click.option(
    "--backend",
    type=click.Choice(sorted(BACKENDS)),
    default="onnxruntime",
    show_default=True,
    help="Model runtime (coreml: macOS only).",
)
@click.option(
    "--quantization",
    type=click.Choice(QUANTIZATIONS),
    help="Which exported model to run (default: the most precise in the bundle).",
)
@click.option(
    "--threads",
    default=1,
    show_default=True,
    type=click.IntRange(min=1),
    help="Threads for the model and the search (at most the CPU count).",
)
@click.option(
    "--public-key",
    help="Refuse galleries not signed with this Ed25519 key "
    "(hex, or a .pub file from `cmce-build-gallery keygen`).",
)
@click.option("--shards", help="Load only these shards (positions, e.g. 0,2,3).")
@click.option("--json", "as_json", is_flag=True, help="Print results as JSON.")
@cli_errors
def main(
    bundle,
    gallery,
    images,
    k,
    max_uncertainty,
    backend,
    quantization,
    threads,
    public_key,
    shards,
    as_json,
) -> None:
    """Find the gallery items closest to each IMAGE.

    Opening checks the bundle's and the gallery's checksums (and signature, with
    --public-key), that both are in the same embedding space and that the model takes
    what the bundle says; a refusal is one line, exit code 2 (gallery or bundle), 3
    (signature) or 7 (model runtime). An image that cannot be read (not a regular file,
    more pixels than the model's budget, undecodable) is reported (exit code 1); the
    others are still answered.

    \b
    Examples:
      cmce-query --bundle bundle/ --gallery gallery/ shoe.png bag.jpg
      cmce-query --bundle bundle/ --gallery gallery/ --k 5 --max-uncertainty q0.9 --json *.png
    """
    from .searcher import Searcher

    try:
        chosen = [int(s) for s in shards.split(",")] if shards else None
    except ValueError:
        raise click.BadParameter(
            f"expected shard positions such as 0,2,3, got {shards!r}", param_hint="--shards"
        ) from None
    if chosen is not None and len(set(chosen)) != len(chosen):
        raise click.BadParameter(f"{shards!r} names a shard twice", param_hint="--shards")
    searcher = Searcher.open(
        bundle=bundle,
        gallery=gallery,
        backend=backend,
        threads=threads,
        quantization=quantization,
        public_key=public_key,
        shards=chosen,
    )
    try:
        searcher.gallery.uncertainty_limit(max_uncertainty)
    except ValueError as exc:  # a quantile name the gallery's manifest does not have
        raise click.BadParameter(str(exc), param_hint="--max-uncertainty") from None
    failed = 0
    records = []
    for image, result in _answers(searcher, list(images), k, max_uncertainty):
        if isinstance(result, ImageError):
            failed += 1
            records.append({"image": str(image), "error": str(result)})
            if not as_json:
                click.echo(f"error: {result}", err=True)
            continue
        hits = [
            {"id": h.id, "score": h.score, "uncertainty": h.uncertainty, "payload": h.payload}
            for h in result
        ]
        records.append({"image": str(image), "hits": hits})
        if not as_json:
            click.echo(f"{image}:")
            for rank, h in enumerate(result, 1):
                extra = f"  {json.dumps(h.payload)}" if h.payload else ""
                click.echo(
                    f"  {rank:>3}. {h.id}  score {h.score:.4f}  "
                    f"uncertainty {h.uncertainty:.4f}{extra}"
                )
            if not result:
                click.echo("  (no hits)")
    if as_json:
        click.echo(json.dumps(records, indent=2))
    if failed:
        sys.exit(1)


def _answers(searcher, images: list[Path], k: int, max_uncertainty):
    """(image, hits or ImageError) in order, :data:`BATCH` images at a time: memory stays
    bounded however many images are given."""
    for start in range(0, len(images), BATCH):
        chunk = images[start : start + BATCH]
        results = searcher.search_batch(chunk, k=k, max_uncertainty=max_uncertainty)
        yield from zip(chunk, results, strict=True)


if __name__ == "__main__":
    main()
