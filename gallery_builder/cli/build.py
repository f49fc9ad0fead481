"""``cmce-build-gallery``: ensemble-encoded galleries as verifiable hnswlib shards."""

from __future__ import annotations

import json
from pathlib import Path

import click

from gallery_builder.cli.options import experiment_option, from_experiment, trust_option
from query_sdk.errors import cli_errors

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
        f"{summary.images_per_second:,.0f} images/s over {summary.seconds:.1f} s"
    )


json_option = click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
sign_option = click.option(
    "--sign-key",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Sign the manifest with this Ed25519 secret key (from `keygen`); searchers given the "
    "public key refuse the gallery if anything changes.",
)
engine_option = click.option(
    "--engine",
    type=click.Choice(["local", "ray"]),
    default="local",
    show_default=True,
    help="local: this process. ray: Ray Data actor pools (a local Ray, or the cluster in "
    "RAY_ADDRESS).",
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Build galleries: each image goes through N gallery models and their heads; the mean is
    the gallery vector, the spread its uncertainty; vectors go into hnswlib shards with a
    manifest of checksums that the query SDK verifies before it trusts anything.

    \b
    Examples:
      cmce-build-gallery build --experiment runs/demo --images fashion-mnist:train --out gallery/
      cmce-build-gallery build --models runs/demo/models/resnet --models runs/demo/models/vit \\
          --heads runs/demo/heads/unified --images fashion-mnist:train --out gallery/
      cmce-build-gallery add --gallery gallery/ --images new-images/
      cmce-build-gallery remove --gallery gallery/ --ids fashion-mnist:train/17
      cmce-build-gallery reproject --gallery gallery/ --heads heads-v2/
      cmce-build-gallery refresh --gallery gallery/ --query query-v2/ --heads heads-v2/
      cmce-build-gallery keygen --out signing && cmce-build-gallery build ... --sign-key signing.key
    """


def _sign(gallery: Path, key: Path | None) -> None:
    """Sign the manifest with ``key``; without one, warn if an old signature went stale."""
    from query_sdk.signing import SIGNATURE_FILE, sign_manifest

    if key is not None:
        sign_manifest(gallery, key.read_text())
    elif (Path(gallery) / SIGNATURE_FILE).exists():
        click.echo(
            f"warning: {gallery}/{SIGNATURE_FILE} no longer matches the manifest; sign "
            "again with `cmce-build-gallery sign --gallery ... --key ...`",
            err=True,
        )


@main.command()
@click.option(
    "--models",
    "model_dirs",
    multiple=True,
    type=PathType,
    help="Gallery model checkpoint folder (repeat for each of the N models; the query model "
    "too when the heads fuse its own embedding).",
)
@click.option("--heads", "heads_dir", type=PathType, help="Heads folder.")
@experiment_option
@click.option(
    "--images",
    "source",
    required=True,
    help="Image folder, list file (path[,id[,payload-json]] per line), or a built-in "
    "split such as fashion-mnist:train.",
)
@click.option("--out", required=True, type=PathType, help="Gallery folder to create.")
@click.option(
    "--shard-size",
    default=10000,
    show_default=True,
    help="Items per shard. Fewer, larger shards search faster (a query visits every "
    "shard; cost grows slowly with a shard's size); smaller ones let a phone load "
    "a subset, and are the unit of parallel indexing and of --resume.",
)
@click.option("--M", "m", default=16, show_default=True, help="HNSW links per node.")
@click.option("--ef-construction", default=200, show_default=True, help="HNSW build beam.")
@click.option("--batch-size", default=256, show_default=True, help="Images per model call.")
@click.option(
    "--reject-quantile",
    default=0.0,
    show_default=True,
    help="Leave out this fraction of the most uncertain items (listed in the "
    "manifest). 0 keeps all and stores every score.",
)
@engine_option
@click.option("--resume", is_flag=True, help="Finish an interrupted build in --out.")
@sign_option
@json_option
@trust_option
@cli_errors
def build(
    model_dirs,
    heads_dir,
    experiment,
    source,
    out,
    shard_size,
    m,
    ef_construction,
    batch_size,
    reject_quantile,
    engine,
    resume,
    sign_key,
    as_json,
    trust,
) -> None:
    """Build a gallery from scratch (with --experiment, from what an experiment recommends)."""
    from gallery_builder.gallery.build import BuildSettings
    from gallery_builder.gallery.build import build as run

    chosen = from_experiment(experiment, gallery_models=list(model_dirs), heads=heads_dir)
    model_dirs, heads_dir = chosen["gallery_models"], chosen["heads"]
    settings = BuildSettings(
        shard_size=shard_size,
        M=m,
        ef_construction=ef_construction,
        batch_size=batch_size,
        reject_quantile=reject_quantile,
    )
    summary = run(list(model_dirs), heads_dir, source, out, settings, engine, resume, trust)
    _sign(out, sign_key)
    _report(summary, as_json)


@main.command()
@click.option("--gallery", required=True, type=PathType)
@click.option("--images", "source", required=True, help="Images to add (as for build).")
@engine_option
@sign_option
@json_option
@trust_option
@cli_errors
def add(gallery, source, engine, sign_key, as_json, trust) -> None:
    """Add images as new shards, with the models and heads the gallery was built with (a
    gallery whose vectors are averaged over neighbours is re-averaged and re-indexed whole)."""
    from gallery_builder.gallery.build import add as run

    summary = run(gallery, source, engine, trust)
    _sign(gallery, sign_key)
    _report(summary, as_json)


@main.command()
@click.option("--gallery", required=True, type=PathType)
@click.option("--ids", "ids", multiple=True, help="Id to remove (repeat).")
@click.option(
    "--ids-file", type=click.Path(exists=True, path_type=Path), help="File with one id per line."
)
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@sign_option
@cli_errors
def remove(gallery, ids, ids_file, yes, sign_key) -> None:
    """Remove items (hnswlib mark_deleted); manifest and checksums are updated. A gallery whose
    vectors are averaged over neighbours is re-averaged and re-indexed whole instead."""
    from gallery_builder.gallery.build import remove as run

    wanted = list(ids) + (ids_file.read_text().split() if ids_file else [])
    if not wanted:
        raise click.UsageError("give --ids or --ids-file")
    if not yes:
        click.confirm(f"remove {len(wanted)} items from {gallery}?", abort=True)
    result = run(gallery, wanted)
    _sign(gallery, sign_key)
    click.echo(json.dumps(result))


@main.command()
@click.option("--gallery", required=True, type=PathType)
@click.option(
    "--heads",
    "heads_dir",
    required=True,
    type=PathType,
    help="New heads for the same gallery models (e.g. after a query-model update).",
)
@sign_option
@json_option
@cli_errors
def reproject(gallery, heads_dir, sign_key, as_json) -> None:
    """Rebuild every shard with new heads from the stored raw embeddings: no gallery model
    runs. Use it after `cmce train update` in to-query mode (new query space)."""
    from gallery_builder.gallery.build import reproject as run

    summary = run(gallery, heads_dir)
    _sign(gallery, sign_key)
    _report(summary, as_json)


@main.command()
@click.option("--gallery", required=True, type=PathType)
@click.option(
    "--query",
    "query_dir",
    required=True,
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="The new query model.",
)
@click.option(
    "--heads",
    "heads_dir",
    required=True,
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Heads trained for the new query model and this gallery's gallery models, fusing the "
    "query model's own member (`cmce train heads --query NEW --gallery-model ...`, or an "
    "experiment's heads whose gallery models are these).",
)
@sign_option
@json_option
@trust_option
@cli_errors
def refresh(gallery, query_dir, heads_dir, sign_key, as_json, trust) -> None:
    """After a query-model update: re-encode only the query model's own member and rebuild
    every shard with the new heads. The gallery models do not run again (their raw embeddings
    are stored); the small query model reads every item once more from the sources the
    gallery was built and added from, so they must still be there.

    Where `cmce train update` (no model runs, the space stays) loses to the old query model,
    as it can on classes no model was trained on, this reaches a rebuild's accuracy at the
    cost of one query-model pass. The gallery moves to the new query model's space: ship the
    new query model with it."""
    from gallery_builder.gallery.build import refresh as run

    summary = run(gallery, query_dir, heads_dir, trust)
    _sign(gallery, sign_key)
    _report(summary, as_json)


@main.command()
@click.option("--gallery", required=True, type=PathType)
@click.option(
    "--public-key",
    help="Also check the manifest's signature against this Ed25519 "
    "public key (hex, or a .pub file).",
)
@cli_errors
def verify(gallery, public_key) -> None:
    """Check every file against the manifest's sizes and sha256, and the index headers."""
    from query_sdk.gallery_format import read_manifest_bytes, verify_gallery
    from query_sdk.signing import verify_manifest

    if public_key:
        verify_manifest(gallery, read_manifest_bytes(gallery), public_key)
    manifest = verify_gallery(gallery)
    click.echo(
        f"ok: {manifest.count:,} items in {len(manifest.shards)} shards, space {manifest.space_id}"
    )


@main.command()
@click.option(
    "--out",
    required=True,
    type=PathType,
    help="Writes OUT.key (secret, keep it on the server) and OUT.pub (ship it).",
)
@cli_errors
def keygen(out) -> None:
    """Make an Ed25519 key pair for signing gallery manifests."""
    from query_sdk.signing import generate_keys

    secret, public = generate_keys(out)
    click.echo(
        f"secret key: {secret} (keep private)\npublic key: {public} ({public.read_text().strip()})"
    )


@main.command()
@click.option("--gallery", required=True, type=PathType)
@click.option(
    "--key",
    required=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Ed25519 secret key file (from `keygen`).",
)
@cli_errors
def sign(gallery, key) -> None:
    """Sign a gallery's manifest (writes manifest.sig next to it)."""
    from query_sdk.gallery_format import verify_gallery

    verify_gallery(gallery)  # never vouch for a damaged gallery
    _sign(gallery, key)
    click.echo(f"signed {gallery}/manifest.json")
