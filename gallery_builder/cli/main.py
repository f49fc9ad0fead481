"""``cmce``: data, training, evaluation and the end-to-end demo.

Known errors print one line saying what is wrong and exit 1; set CMCE_DEBUG=1 for tracebacks.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import click

from gallery_builder.cli.options import TRUST_FLAG, trust_option
from gallery_builder.data.font_sets import FONT_SET_SPEC, FONT_SETS
from gallery_builder.evaluation.config import preset_files
from query_sdk.errors import CheckpointError, DataError, cli_errors
from query_sdk.spec import InputSpec

if TYPE_CHECKING:
    from gallery_builder.evaluation.experiment import ExperimentConfig

#: What `cmce data fetch/where` knows: Fashion-MNIST and the font sets.
DATASET_NAMES = ("fashion-mnist", *FONT_SETS)
BUILTIN_SPECS = {
    "fashion-mnist": InputSpec(28, 28, 1, mean=(0.286,), std=(0.353,)),
    "digits": InputSpec(8, 8, 1, mean=(0.3,), std=(0.4,)),
    **dict.fromkeys(FONT_SETS, FONT_SET_SPEC),
}
EMBEDDINGS_FILE = "train-embeddings.safetensors"


def _parse_shape(text: str) -> tuple[int, int, int]:
    """``HxWxC`` (e.g. 64x64x3) as (height, width, channels)."""
    try:
        h, w, c = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise click.BadParameter(f"expected HxWxC such as 64x64x3, got {text!r}") from None
    return h, w, c


def _parse_spec(text: str | None, source: str) -> InputSpec:
    """``HxWxC`` (e.g. 64x64x3) or the built-in dataset's spec."""
    if text:
        h, w, c = _parse_shape(text)
        return (
            InputSpec(h, w, c)
            if c == 1
            else InputSpec(h, w, c, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
        )
    base = source.split(":")[0]
    if base not in BUILTIN_SPECS:
        raise click.BadParameter("an image folder needs --input-spec HxWxC (e.g. 64x64x3)")
    return BUILTIN_SPECS[base]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="Log progress details.")
def main(verbose: bool) -> None:
    """cmce: asymmetric image retrieval with cross-model compatible ensembles.

    A server indexes a gallery with an ensemble of large models, each mapped by a small head
    into the space of one light query model that runs on the phone.

    \b
    Examples:
      cmce demo --out runs/demo            # train, evaluate, report on Fashion-MNIST
      cmce demo --quick --out runs/quick   # the same on a subset, about 3 minutes
      cmce experiment --data photos/ --out runs/photos   # the same on your class folders
      cmce data fetch fashion-mnist
      cmce train gallery --arch resnet --data fashion-mnist:train --out models/resnet
    """
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )


# ---------------------------------------------------------------- data
@main.group()
def data() -> None:
    """Find or fetch datasets."""


@data.command("fetch")
@click.argument("name", type=click.Choice(DATASET_NAMES))
@click.option(
    "--dest",
    type=click.Path(path_type=Path),
    default=None,
    help="Folder for the dataset (default: ~/.cache/cmce/<name>).",
)
@cli_errors
def data_fetch(name: str, dest: Path | None) -> None:
    """Get a dataset if it is missing and print where it is (apt-get download + dpkg -x of
    Debian packages, no root needed).

    \b
    fashion-mnist  the IDX files (torchvision's downloader as a fallback)
    glyphs         100 characters (Latin letters, digits, signs) rendered from the
                   fonts of 87 font packages (about 110 MB of downloads; ~600
                   images per class)
    han            600 Chinese characters rendered from the fonts of 11 CJK font
                   packages (about 300 MB of downloads; ~43 images per class)

    glyphs and han are class-folder roots for `cmce experiment --data`; glyphs.json in
    each lists the packages, fonts and characters used.
    """
    from gallery_builder.data.datasets import fetch_fashion_mnist
    from gallery_builder.data.glyphs import fetch_glyphs

    if name == "fashion-mnist":
        click.echo(fetch_fashion_mnist(dest))
    else:
        click.echo(fetch_glyphs(dest, FONT_SETS[name]))


@data.command("where")
@click.argument("name", type=click.Choice(DATASET_NAMES), default="fashion-mnist")
@cli_errors
def data_where(name: str) -> None:
    """Print the folder a dataset is read from (or how to get it)."""
    from gallery_builder.data.datasets import fashion_mnist_dir
    from gallery_builder.data.glyphs import glyphs_dir

    click.echo(fashion_mnist_dir() if name == "fashion-mnist" else glyphs_dir(name))


# ---------------------------------------------------------------- experiment / demo / eval
@main.command()
@click.option(
    "--data",
    type=click.Path(path_type=Path, file_okay=False, exists=True),
    default=None,
    help="A class-folder root (one sub-folder per class), split by class.",
)
@click.option(
    "--train",
    "train_dir",
    type=click.Path(path_type=Path, file_okay=False, exists=True),
    default=None,
    help="Training class folders (instead of --data; validation classes come from these).",
)
@click.option(
    "--gallery",
    "gallery_dir",
    type=click.Path(path_type=Path, file_okay=False, exists=True),
    default=None,
    help="Gallery class folders (classes unseen in --train).",
)
@click.option(
    "--query",
    "query_dir",
    type=click.Path(path_type=Path, file_okay=False, exists=True),
    default=None,
    help="Query class folders (the gallery's class names).",
)
@click.option(
    "--out",
    required=True,
    type=click.Path(path_type=Path),
    help="Folder for models (a cache reused by later runs), heads and the report.",
)
@click.option(
    "--config",
    "config_file",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="TOML or JSON file: line-up, recipe, split shares (keys: ExperimentConfig).",
)
@click.option(
    "--preset",
    type=click.Choice(list(preset_files())),
    default=None,
    help="Start from a preset's recipe (--config is laid over it).",
)
@click.option(
    "--input-spec",
    default=None,
    help="HxWxC the images are resized to (default: their most common size and channels).",
)
@click.option("--seed", type=click.IntRange(min=0), default=None, help="Seed of the split.")
@trust_option
@cli_errors
def experiment(
    data, train_dir, gallery_dir, query_dir, out, config_file, preset, input_spec, seed, trust
) -> None:
    """The reference experiment on your images: train (or reuse) the gallery models, the
    query model, the distilled baselines and the heads, evaluate every setting on classes no
    model has seen, write report.md, report.json and PNG plots.

    \b
    With --data ROOT the classes are split (seeded): training classes, validation classes
    held out of training (every choice is fitted on them) and search classes, whose images
    split into gallery and queries. --train/--gallery/--query give the parts as folders.

    \b
    Examples:
      cmce experiment --data photos/ --out runs/photos
      cmce experiment --train t/ --gallery g/ --query q/ --config lineup.toml --out runs/x
      cmce experiment --preset glyphs --out runs/glyphs
    """
    from gallery_builder.evaluation.experiment import load_config

    cli = {"trust": trust}
    if data is not None or train_dir is not None:
        label = (data or train_dir).resolve().name
        cli.update(dataset=label, data=data, train_dir=train_dir)
        cli.update(gallery_dir=gallery_dir, query_dir=query_dir)
    elif gallery_dir is not None or query_dir is not None:
        raise click.UsageError("--gallery and --query need --train")
    elif preset is None:
        raise click.UsageError("give --data ROOT, or --train/--gallery/--query (or a --preset)")
    cfg = load_config(preset, config_file, **cli)
    if seed is not None:
        cfg = replace(cfg, split=replace(cfg.split, seed=seed))
    _run(cfg, out, preset or "experiment", _parse_shape(input_spec) if input_spec else None)


@main.command()
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    default=Path("runs/demo"),
    show_default=True,
    help="Folder for models, heads and the report.",
)
@click.option("--quick", is_flag=True, help="A subset and fewer epochs (about 3 minutes).")
@click.option(
    "--preset",
    type=click.Choice(list(preset_files())),
    default=None,
    help="Experiment preset (overrides --quick); glyphs and han are open-set ones.",
)
@cli_errors
def demo(out: Path, quick: bool, preset: str | None) -> None:
    """`cmce experiment` on a built-in dataset with a preset config: fetch the data if
    missing, train (or reuse cached) models and heads, evaluate every setting, write
    report.md, report.json and PNG plots. Presets: default and quick (Fashion-MNIST, closed
    set), digits (scikit-learn's, closed set), glyphs (100 characters, Latin letters, digits
    and signs, rendered from
    Debian's fonts, open set: few classes, many images each) and han (600 Chinese characters,
    open set: many classes, few images each, like face identification).

    \b
    Example:
      cmce demo --out runs/demo && open runs/demo/report.md
      cmce demo --preset glyphs --out runs/glyphs
    """
    from gallery_builder.data.datasets import fetch_fashion_mnist
    from gallery_builder.data.glyphs import fetch_glyphs
    from gallery_builder.evaluation.experiment import load_config

    preset = preset or ("quick" if quick else "default")
    cfg = load_config(preset)
    if cfg.dataset == "fashion-mnist":
        fetch_fashion_mnist()
    elif cfg.dataset in FONT_SETS:
        cfg = replace(cfg, data=fetch_glyphs(font_set=FONT_SETS[cfg.dataset]))
    _run(cfg, out, preset)
    if cfg.dataset == "fashion-mnist":
        _write_sample_queries(out / "queries")
        click.echo(_next_steps(out))


def _run(
    cfg: ExperimentConfig, out: Path, label: str, shape: tuple[int, int, int] | None = None
) -> dict:
    """Complete the input spec, check the line-up, run, write and print the report."""
    from gallery_builder.evaluation.experiment import check_lineup, with_input_spec
    from gallery_builder.evaluation.report import settings_table, write_report
    from gallery_builder.evaluation.run import run_experiment

    cfg = with_input_spec(cfg, shape)
    check_lineup(cfg)
    start = time.time()
    report = run_experiment(cfg, out)
    report["preset"], report["seconds"] = label, round(time.time() - start, 1)
    report["config"] = cfg.to_dict()
    files = write_report(report, out)
    click.echo(f"Protocol: {report['protocol']}\n")
    click.echo(settings_table(report))
    click.echo(
        f"\n{label} run took {report['seconds']:.0f} s; wrote " + ", ".join(str(f) for f in files)
    )
    return report


def _write_sample_queries(folder: Path, n: int = 10) -> None:
    """The first ``n`` test images as PNG files named after their class, to try cmce-query."""
    from PIL import Image

    from gallery_builder.data.datasets import FASHION_MNIST_CLASSES, load_fashion_mnist

    test = load_fashion_mnist("test")
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        name = FASHION_MNIST_CLASSES[int(test.labels[i])].replace("/", "-").replace(" ", "-")
        Image.fromarray(test.images[i, :, :, 0]).save(folder / f"test-{i:05d}-{name.lower()}.png")


def _next_steps(out: Path) -> str:
    """The commands that take a demo run's recommendation to a gallery, a bundle and a search."""
    return (
        "\nNext: a gallery, the phone's model and a search with what the run recommends "
        "(export needs pip install -e '.[export]'):\n"
        f"  cmce-build-gallery build --experiment {out} --images fashion-mnist:train "
        f"--out {out / 'gallery'}\n"
        f"  cmce-export --experiment {out} --target onnx --quantize int8 "
        "--calibration fashion-mnist:train "
        f"--validation fashion-mnist:test --gallery {out / 'gallery'} --out {out / 'bundle'}\n"
        f"  cmce-query --bundle {out / 'bundle'} --gallery {out / 'gallery'} "
        f"{out / 'queries'}/*.png"
    )


@main.command("eval")
@click.option(
    "--query",
    "query_dir",
    required=True,
    type=click.Path(path_type=Path),
    help="Query model checkpoint folder.",
)
@click.option(
    "--heads",
    "heads_dir",
    required=True,
    type=click.Path(path_type=Path),
    help="Heads checkpoint folder (from `cmce train heads`).",
)
@click.option(
    "--gallery-model",
    "gallery_dirs",
    multiple=True,
    required=True,
    type=click.Path(path_type=Path),
    help="Gallery model folder (repeat for N).",
)
@click.option("--gallery-images", required=True, help="Gallery source (folder or built-in).")
@click.option("--query-images", required=True, help="Query source (folder or built-in).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@trust_option
@cli_errors
def eval_cmd(
    query_dir, heads_dir, gallery_dirs, gallery_images, query_images, as_json, trust
) -> None:
    """Recall@1, Recall@5 and MAP@R of your models on your images, by exact search:
    the query model alone, each member through its head (the query model's own member too,
    when the heads fuse it), and the ensemble.

    \b
    Example:
      cmce eval --query q --heads h --gallery-model g1 --gallery-model g2 \\
        --gallery-images fashion-mnist:train --query-images fashion-mnist:test
    """
    from gallery_builder.data.datasets import load_source
    from gallery_builder.evaluation.metrics import retrieval_metrics
    from gallery_builder.models import load_model
    from gallery_builder.training.fit import embed
    from gallery_builder.training.heads import QUERY_MEMBER, check_compatible, load_heads

    query, qcfg = load_model(query_dir, trust)
    gallery = {Path(d).name: load_model(d, trust) for d in gallery_dirs}
    heads, hcfg = load_heads(heads_dir)
    check_compatible(hcfg, qcfg, {n: c for n, (_, c) in gallery.items()})
    missing = set(heads.inputs) - set(gallery) - ({QUERY_MEMBER} if heads.identity else set())
    if missing:
        raise CheckpointError(
            f"the heads in {heads_dir} need {sorted(heads.inputs)}: give --gallery-model for "
            f"{sorted(missing)}"
        )
    spec = query.input_spec
    gset, qset = load_source(gallery_images, spec), load_source(query_images, spec)
    raw = {
        n: embed(
            m,
            load_source(gallery_images, m.input_spec).images
            if m.input_spec != spec
            else gset.images,
        )
        for n, (m, _) in gallery.items()
    }
    q_raw = embed(query, qset.images)
    qv = heads.encode_query(q_raw)
    own = embed(query, gset.images)
    if heads.identity:
        raw[QUERY_MEMBER] = own
    results = {"sym:query": retrieval_metrics(q_raw, qset.labels, own, gset.labels)}
    for n in raw:
        results[f"{heads.mode}:{n}"] = retrieval_metrics(
            qv, qset.labels, heads.encode_gallery(raw, [n])[0], gset.labels
        )
    # the heads' own fusion, averaged over the gallery's neighbours when they say so
    results[f"{heads.mode}:ensemble"] = retrieval_metrics(
        qv, qset.labels, heads.gallery_vectors(raw)[0], gset.labels
    )
    if as_json:
        click.echo(json.dumps({"space_id": hcfg["space_id"], "settings": results}, indent=2))
        return
    for name, m in results.items():
        click.echo(
            f"{name:28s} R@1 {100 * m['recall_at_1']:6.2f}  R@5 "
            f"{100 * m['recall_at_5']:6.2f}  MAP@R {100 * m['map_at_r']:6.2f}"
        )


# ---------------------------------------------------------------- train
@main.group()
def train() -> None:
    """Train gallery and query models, the distillation baseline, and heads."""


def _train_options(fn):
    for option in reversed(
        [
            click.option(
                "--data",
                "source",
                default="fashion-mnist:train",
                show_default=True,
                help="Training images: fashion-mnist:train, digits, a font set (glyphs, han; "
                "fetched with `cmce data fetch`) or a class folder.",
            ),
            click.option(
                "--input-spec",
                default=None,
                help="HxWxC for image folders (built-ins know theirs).",
            ),
            click.option(
                "--out",
                required=True,
                type=click.Path(path_type=Path),
                help="Checkpoint folder to write.",
            ),
            click.option(
                "--epochs",
                type=click.IntRange(min=1),
                default=None,
                help="Passes over the data (default: as many as --steps take).",
            ),
            click.option(
                "--steps",
                type=click.IntRange(min=1),
                default=2000,
                show_default=True,
                help="Optimiser steps when --epochs is not given, at least 5 per class (many "
                "classes need them) and 20 passes over the images (many images need them); "
                "small data get more passes.",
            ),
            click.option(
                "--batch-size", type=click.IntRange(min=2), default=256, show_default=True
            ),
            click.option(
                "--lr",
                type=click.FloatRange(min=0, min_open=True),
                default=None,
                help="Peak learning rate [default: the architecture's: 1e-2, the ViT 3e-3].",
            ),
            click.option(
                "--flip/--no-flip",
                default=True,
                show_default=True,
                help="Mirror half the training images (photos yes, text no).",
            ),
            click.option(
                "--jitter/--no-jitter",
                default=False,
                show_default=True,
                help="Random affine and colour views (the experiment's open-set recipe).",
            ),
            click.option("--seed", default=0, show_default=True),
            click.option(
                "--subset",
                default=1.0,
                show_default=True,
                help="Fraction of the images to train on (diversity between models).",
            ),
        ]
    ):
        fn = option(fn)
    return fn


def _fit(
    arch,
    embedding_dim,
    kwargs,
    source,
    input_spec,
    out,
    epochs,
    steps,
    batch_size,
    lr,
    flip,
    jitter,
    seed,
    subset,
    role,
    teacher_dir=None,
    trust=(),
):
    import torch

    from gallery_builder.data.datasets import load_source
    from gallery_builder.evaluation.experiment import _subset_index
    from gallery_builder.models import (
        create_model,
        load_model,
        model_role,
        registered_identity,
        save_model,
    )
    from gallery_builder.training.augment import Augment
    from gallery_builder.training.fit import TrainSettings, train_distilled, train_metric
    from query_sdk.fileio import parse_json

    if model_role(arch) != role and teacher_dir is None:
        click.echo(f"note: {arch} is registered as a {model_role(arch)} architecture", err=True)
    spec = _parse_spec(input_spec, source)
    images = load_source(source, spec)
    index = _subset_index(len(images), subset, seed)
    kw = parse_json(kwargs, "--kwargs", click.BadParameter) if kwargs else {}
    if not isinstance(kw, dict):
        raise click.BadParameter(f"--kwargs must be a JSON object, got {kwargs!r}")
    settings = TrainSettings(
        epochs=epochs,
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        augment=Augment(flip=flip) if jitter else Augment(flip, 0, 0, 0, 0),
        seed=seed,
    ).for_architecture(arch)
    torch.manual_seed(seed)
    training = {
        "data": images.name,
        "images": len(index),
        "subset": subset,
        "settings": settings.to_dict(),
    }
    if teacher_dir is not None:
        teacher, tcfg = load_model(teacher_dir, trust)
        if teacher.input_spec != spec:
            raise CheckpointError(
                f"{teacher_dir}: teacher input spec {teacher.input_spec} differs "
                f"from the student's {spec}"
            )
        embedding_dim = teacher.embedding_dim
        model = create_model(arch, spec, embedding_dim, **kw)
        classes = len(torch.unique(torch.as_tensor(images.labels[index])))
        train_distilled(model, images.images[index], teacher, settings, classes)
        training.update(loss="distill_l2", teacher=tcfg["fingerprint"])
    else:
        model = create_model(arch, spec, embedding_dim, **kw)
        train_metric(model, images.images[index], images.labels[index], settings)
        training["loss"] = "normalized_softmax"
    identity = registered_identity(arch, spec, embedding_dim, **kw)
    config = save_model(out, model, identity, role, training)
    click.echo(
        f"wrote {out} (fingerprint {config['fingerprint']}, {config['params']:,} "
        f"parameters, {config['mflops']:.2f} MFLOPs)"
    )


@train.command("gallery")
@click.option("--arch", default="resnet", show_default=True, help="See `cmce models`.")
@click.option("--embedding-dim", default=128, show_default=True)
@click.option("--kwargs", default=None, help='Architecture options as JSON, e.g. {"width": 32}.')
@_train_options
@cli_errors
def train_gallery(arch, embedding_dim, kwargs, **opts) -> None:
    """Train one gallery model with a normalised-softmax metric loss.

    Diversity comes from the architecture, the seed and --subset.

    \b
    Example:
      cmce train gallery --arch vit --seed 3 --subset 0.8 --out models/vit
    """
    _fit(arch, embedding_dim, kwargs, role="gallery", **opts)


@train.command("query")
@click.option("--arch", default="mobilenet", show_default=True)
@click.option("--embedding-dim", default=128, show_default=True)
@click.option("--kwargs", default=None, help="Architecture options as JSON.")
@_train_options
@cli_errors
def train_query(arch, embedding_dim, kwargs, **opts) -> None:
    """Train the light query model on its own (it is frozen afterwards).

    \b
    Example:
      cmce train query --epochs 6 --out models/query
    """
    _fit(arch, embedding_dim, kwargs, role="query", **opts)


@train.command("kd")
@click.option(
    "--teacher", required=True, type=click.Path(path_type=Path), help="Gallery model to distil."
)
@click.option("--arch", default="mobilenet", show_default=True)
@click.option("--kwargs", default=None, help="Architecture options as JSON.")
@_train_options
@trust_option
@cli_errors
def train_kd(teacher, arch, kwargs, trust, **opts) -> None:
    """The distillation baseline: a query model regressing a gallery model's embedding."""
    _fit(arch, None, kwargs, role="query", teacher_dir=teacher, trust=trust, **opts)


@train.command("heads")
@click.option(
    "--mode", type=click.Choice(["unified", "to-query"]), default="unified", show_default=True
)
@click.option("--query", "query_dir", required=True, type=click.Path(path_type=Path))
@click.option(
    "--gallery-model",
    "gallery_dirs",
    multiple=True,
    required=True,
    type=click.Path(path_type=Path),
    help="Gallery model folder (repeat for N).",
)
@click.option("--data", "source", default="fashion-mnist:train", show_default=True)
@click.option("--out", required=True, type=click.Path(path_type=Path))
@click.option("--dim", default=128, show_default=True, help="Shared space dim (unified).")
@click.option(
    "--steps",
    type=click.IntRange(min=1),
    default=None,
    help="Optimiser steps when --epochs is not given (default: the experiment's budget; small "
    "data get more passes).",
)
@click.option(
    "--epochs", type=click.IntRange(min=1), default=None, help="Passes over the data instead."
)
@click.option(
    "--identity/--no-identity",
    default=True,
    show_default=True,
    help="Fuse the query model's own embedding of each gallery image as one more member.",
)
@click.option("--seed", default=0, show_default=True)
@trust_option
@cli_errors
def train_heads_cmd(
    mode, query_dir, gallery_dirs, source, out, dim, steps, epochs, identity, seed, trust
) -> None:
    """Train the transformation heads (gallery and query models frozen), with the
    experiment's recipe for data nobody has seen (linear heads, a step budget) and equal
    fusion weights; `cmce experiment` also fits the weights on held-out classes.

    Also stores the raw embeddings of the training images (fp16) in the heads folder, the
    gallery models' and, with --identity, the query model's own, so `cmce train update` can
    fit a new query model to the gallery vectors without running any gallery model.

    \b
    Example:
      cmce train heads --query models/query --gallery-model models/resnet \\
        --gallery-model models/vit --out heads/unified
    """
    import torch

    from gallery_builder.data.datasets import load_source
    from gallery_builder.models import load_model
    from gallery_builder.training.fit import embed
    from gallery_builder.training.heads import OPEN_SET_HEADS, save_heads, train_heads

    query, qcfg = load_model(query_dir, trust)
    gallery = {Path(d).name: load_model(d, trust) for d in gallery_dirs}
    images = load_source(source, query.input_spec)
    raw = {
        n: embed(m, load_source(source, m.input_spec).images, progress=n)
        for n, (m, _) in gallery.items()
    }
    labels = torch.as_tensor(images.labels)
    settings = replace(
        OPEN_SET_HEADS, steps=steps or OPEN_SET_HEADS.steps, epochs=epochs, seed=seed
    )
    own = embed(query, images.images)
    heads = train_heads(
        mode,
        raw,
        own,
        labels,
        settings,
        dim=dim if mode == "unified" else None,
        identity=identity,
    )
    config = save_heads(
        out,
        heads,
        qcfg["fingerprint"],
        {n: c["fingerprint"] for n, (_, c) in gallery.items()},
        settings,
        {"data": images.name, "images": len(images)},
    )
    _save_embeddings(out / EMBEDDINGS_FILE, raw, labels, own if identity else None)
    click.echo(f"wrote {out} (mode {mode}, space_id {config['space_id']})")


@train.command("update")
@click.option(
    "--heads",
    "heads_dir",
    required=True,
    type=click.Path(path_type=Path),
    help="The heads the gallery was built with.",
)
@click.option(
    "--query",
    "query_dir",
    required=True,
    type=click.Path(path_type=Path),
    help="The new query model.",
)
@click.option(
    "--data",
    "source",
    default="fashion-mnist:train",
    show_default=True,
    help="The training images the heads were trained on.",
)
@click.option("--out", required=True, type=click.Path(path_type=Path))
@click.option(
    "--steps",
    type=click.IntRange(min=1),
    default=None,
    help="Optimiser steps when --epochs is not given (default: the heads' own).",
)
@click.option(
    "--epochs", type=click.IntRange(min=1), default=None, help="Passes over the data instead."
)
@click.option("--seed", default=0, show_default=True)
@trust_option
@cli_errors
def train_update(heads_dir, query_dir, source, out, steps, epochs, seed, trust) -> None:
    """Fit a new query model to an existing gallery without running any gallery model.

    unified: a new query head into the same space (space_id unchanged: the gallery stays),
    fitted to land on the training images' gallery vectors as stored (the old query model's
    own member included). to-query: new gallery heads into the new query space, from the
    stored raw embeddings (re-project the gallery with them). Compare before deploying: a
    new head fitted on the training classes can lose to the old query model on unseen
    classes (`cmce experiment` reports both).
    """
    import torch
    from safetensors.torch import load_file

    from gallery_builder.data.datasets import load_source
    from gallery_builder.models import load_model
    from gallery_builder.training.fit import embed
    from gallery_builder.training.heads import (
        QUERY_MEMBER,
        UPDATE_L2_WEIGHT,
        head_settings,
        load_heads,
        save_heads,
        train_heads,
        train_query_head,
    )

    heads, hcfg = load_heads(heads_dir)
    if heads.mode == "to-query" and heads.identity:
        raise CheckpointError(
            f"{heads_dir}: to-query heads that fuse the query model's own member cannot follow "
            "a new query model (the gallery holds the old query model's embeddings, and no head "
            "maps them into the new one's space); update unified heads (the gallery stays) or "
            "train the to-query heads with --no-identity"
        )
    query, qcfg = load_model(query_dir, trust)
    stored_path = Path(heads_dir) / EMBEDDINGS_FILE
    if not stored_path.is_file():
        raise CheckpointError(
            f"{heads_dir} has no {EMBEDDINGS_FILE}: `cmce train update` re-uses the gallery "
            "models' embeddings that `cmce train heads` stores beside its heads (the demo's "
            "heads folders do not keep them); train the heads with `cmce train heads` first"
        )
    stored = load_file(stored_path)
    raw = {n: stored[f"gallery.{n}"].float() for n in heads.names}
    members = dict(raw)  # what the stored gallery vectors fuse
    if heads.mode == "unified" and QUERY_MEMBER in heads.fused:
        if QUERY_MEMBER not in stored:
            raise CheckpointError(
                f"{stored_path} lacks the query model's own training embeddings, which the "
                "gallery vectors fuse; train the heads again with `cmce train heads` (it "
                "stores them) and rebuild the gallery"
            )
        members[QUERY_MEMBER] = stored[QUERY_MEMBER].float()
    images = load_source(source, query.input_spec)
    if len(images) != len(stored["labels"]):
        raise DataError(
            f"{source} has {len(images)} images; the heads were trained on {len(stored['labels'])}"
        )
    labels = stored["labels"].long()
    if not torch.equal(labels, torch.as_tensor(images.labels)):
        raise DataError(f"{source} is not the data the heads in {heads_dir} were trained on")
    settings = replace(head_settings(hcfg, heads_dir), seed=seed)
    if steps or epochs:
        settings = replace(settings, steps=steps or settings.steps, epochs=epochs)
    q = embed(query, images.images)
    if heads.mode == "unified":
        new = train_query_head(heads, members, q, labels, settings)
    else:
        new = train_heads("to-query", raw, q, labels, settings)
        new.set_weights(heads.weights)
    gallery_fps = {g["name"]: g["fingerprint"] for g in hcfg["gallery_models"]}
    config = save_heads(
        out,
        new,
        qcfg["fingerprint"],
        gallery_fps,
        settings,
        {
            **hcfg["training"],
            "updated_from": hcfg["space_id"],
            **({"update_l2_weight": UPDATE_L2_WEIGHT} if heads.mode == "unified" else {}),
        },
    )
    _save_embeddings(out / EMBEDDINGS_FILE, raw, labels, q if heads.mode == "unified" else None)
    same = config["space_id"] == hcfg["space_id"]
    click.echo(
        f"wrote {out} (space_id {config['space_id']}: "
        + (
            "unchanged, the gallery stays as it is)"
            if same
            else "new; re-project the gallery with these heads)"
        )
    )


def _save_embeddings(path: Path, raw: dict, labels, own=None) -> None:
    """The gallery models' raw training embeddings (fp16), and the query model's ``own`` when
    the gallery fuses them: what `cmce train update` fits a new query model to."""
    from safetensors.torch import save_file

    from gallery_builder.training.heads import QUERY_MEMBER

    tensors = {f"gallery.{n}": v.half().contiguous() for n, v in raw.items()}
    if own is not None:
        tensors[QUERY_MEMBER] = own.half().contiguous()
    save_file({**tensors, "labels": labels.contiguous()}, str(path))


# ---------------------------------------------------------------- models
@main.command("models")
def models_cmd() -> None:
    """List the registered architectures with their size at 28x28 grey (or at the one input an
    architecture takes)."""
    from gallery_builder.models import (
        count_params,
        create_model,
        list_models,
        mflops,
        model_role,
        native_input_spec,
    )

    for name in list_models():
        spec = native_input_spec(name) or BUILTIN_SPECS["fashion-mnist"]
        m = create_model(name, spec)
        click.echo(
            f"{name:18s} {model_role(name):8s} {count_params(m):>9,} params "
            f"{mflops(m, spec):8.2f} MFLOPs at {spec.height}x{spec.width}x{spec.channels}"
        )


@main.command("import-model")
@click.option(
    "--entry-point",
    default=None,
    help="package.module:factory building an nn.Module (images -> features).",
)
@click.option(
    "--weights",
    type=click.Path(exists=True, path_type=Path),
    default=None,
    help="safetensors file with the module's state dict.",
)
@click.option(
    "--torchscript",
    type=click.Path(exists=True, path_type=Path),
    default=None,
    help="A TorchScript file instead of an entry point (trusted files only).",
)
@click.option("--kwargs", default=None, help="Factory keyword arguments as JSON.")
@click.option("--input-spec", required=True, help="HxWxC the module takes, e.g. 224x224x3.")
@click.option("--feature-dim", required=True, type=int, help="Features per image.")
@click.option("--out", required=True, type=click.Path(path_type=Path))
@cli_errors
def import_model(entry_point, weights, torchscript, kwargs, input_spec, feature_dim, out):
    """Wrap your own (pretrained) backbone as a gallery model checkpoint.

    \b
    Example:
      cmce import-model --entry-point mypkg.nets:backbone --weights w.safetensors \\
        --input-spec 224x224x3 --feature-dim 768 --out models/mine
    """
    from gallery_builder.models import import_external, import_torchscript
    from query_sdk.fileio import parse_json

    spec = _parse_spec(input_spec, "")
    if torchscript and not entry_point:
        config = import_torchscript(out, torchscript, spec, feature_dim)
    elif entry_point and weights and not torchscript:
        config = import_external(
            out,
            entry_point,
            weights,
            spec,
            feature_dim,
            parse_json(kwargs, "--kwargs", click.BadParameter) if kwargs else {},
        )
    else:
        raise click.UsageError("give either --entry-point with --weights, or --torchscript")
    click.echo(
        f"wrote {out} (fingerprint {config['fingerprint']}); it runs code, so commands that "
        f"load it need {TRUST_FLAG} {entry_point or out}"
    )
