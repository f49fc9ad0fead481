"""``cmce-build-gallery``: ensemble-encoded galleries as verifiable hnswlib shards."""

from __future__ import annotations

import json
from pathlib import Path

import click

from .cli import _friendly

PathType = click.Path(path_type=Path)


def _report(summary, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(summary.to_dict(), indent=2))
        return
    click.echo(
        f"{summary.items:,} items in {summary.shards} shards "
        f"({summary.bytes_per_item:,.0f} bytes/item), {summary.skipped} skipped, "
        f"{summary.rejected} rejected; ef_search {summary.ef_search} "
        f"(recall@10 {summary.recall_at_10:.4f} vs exact); "
        f"{summary.images_per_second:,.0f} images/s over {summary.seconds:.1f} s")


json_option = click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
engine_option = click.option(
    "--engine", type=click.Choice(["local", "ray"]), default="local", show_default=True,
    help="local: this process. ray: Ray Data actor pools (a local Ray, or the cluster in "
         "RAY_ADDRESS).")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Build galleries: each image goes through N gallery models and their heads; the mean is
    the gallery vector, the spread its uncertainty; vectors go into hnswlib shards with a
    manifest of checksums that the query SDK verifies before it trusts anything.

    \b
    Examples:
      cmce-build-gallery build --models runs/demo/models/resnet --models runs/demo/models/vit \\
          --heads runs/demo/heads/unified --images fashion-mnist:train --out gallery/
      cmce-build-gallery add --gallery gallery/ --images new-images/
      cmce-build-gallery remove --gallery gallery/ --ids fashion-mnist:train/17
      cmce-build-gallery reproject --gallery gallery/ --heads heads-v2/
    """


@main.command()
@click.option("--models", "model_dirs", multiple=True, required=True, type=PathType,
              help="Gallery model checkpoint folder (repeat for each of the N models).")
@click.option("--heads", "heads_dir", required=True, type=PathType, help="Heads folder.")
@click.option("--images", "source", required=True,
              help="Image folder, list file (path[,id[,payload-json]] per line), or a built-in "
                   "split such as fashion-mnist:train.")
@click.option("--out", required=True, type=PathType, help="Gallery folder to create.")
@click.option("--shard-size", default=10000, show_default=True, help="Items per shard.")
@click.option("--M", "m", default=16, show_default=True, help="HNSW links per node.")
@click.option("--ef-construction", default=200, show_default=True, help="HNSW build beam.")
@click.option("--batch-size", default=256, show_default=True, help="Images per model call.")
@click.option("--reject-quantile", default=0.0, show_default=True,
              help="Leave out this fraction of the most uncertain items (listed in the "
                   "manifest). 0 keeps all and stores every score.")
@engine_option
@click.option("--resume", is_flag=True, help="Finish an interrupted build in --out.")
@json_option
@_friendly
def build(model_dirs, heads_dir, source, out, shard_size, m, ef_construction, batch_size,
          reject_quantile, engine, resume, as_json) -> None:
    """Build a gallery from scratch."""
    from .gallery import BuildSettings
    from .gallery import build as run

    settings = BuildSettings(shard_size=shard_size, M=m, ef_construction=ef_construction,
                             batch_size=batch_size, reject_quantile=reject_quantile)
    _report(run(list(model_dirs), heads_dir, source, out, settings, engine, resume), as_json)


@main.command()
@click.option("--gallery", required=True, type=PathType)
@click.option("--images", "source", required=True, help="Images to add (as for build).")
@engine_option
@json_option
@_friendly
def add(gallery, source, engine, as_json) -> None:
    """Add images as new shards, with the models and heads the gallery was built with."""
    from .gallery import add as run

    _report(run(gallery, source, engine), as_json)


@main.command()
@click.option("--gallery", required=True, type=PathType)
@click.option("--ids", "ids", multiple=True, help="Id to remove (repeat).")
@click.option("--ids-file", type=click.Path(exists=True, path_type=Path),
              help="File with one id per line.")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@_friendly
def remove(gallery, ids, ids_file, yes) -> None:
    """Remove items (hnswlib mark_deleted); manifest and checksums are updated."""
    from .gallery import remove as run

    wanted = list(ids) + (ids_file.read_text().split() if ids_file else [])
    if not wanted:
        raise click.UsageError("give --ids or --ids-file")
    if not yes:
        click.confirm(f"remove {len(wanted)} items from {gallery}?", abort=True)
    click.echo(json.dumps(run(gallery, wanted)))


@main.command()
@click.option("--gallery", required=True, type=PathType)
@click.option("--heads", "heads_dir", required=True, type=PathType,
              help="New heads for the same gallery models (e.g. after a query-model update).")
@json_option
@_friendly
def reproject(gallery, heads_dir, as_json) -> None:
    """Rebuild every shard with new heads from the stored raw embeddings: no gallery model
    runs. Use it after `cmce train update` in to-query mode (new query space)."""
    from .gallery import reproject as run

    _report(run(gallery, heads_dir), as_json)


@main.command()
@click.option("--gallery", required=True, type=PathType)
@_friendly
def verify(gallery) -> None:
    """Check every file against the manifest's sizes and sha256, and the index headers."""
    from query_sdk.gallery_format import verify_gallery

    manifest = verify_gallery(gallery)
    click.echo(f"ok: {manifest.count:,} items in {len(manifest.shards)} shards, space "
               f"{manifest.space_id}")
