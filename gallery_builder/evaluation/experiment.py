"""The reference experiment: its config (line-up, recipe, split), its data split, and model
training with a reusable cache.

Protocols (:func:`load_splits`): on a class-folder root (``cmce experiment --data``) or explicit
training / gallery / query folders, the split is open set, by class (:mod:`gallery_builder.
data.splits`): no search class is seen by any training, and validation classes, held out of
training too, are what every choice is fitted on. The Fashion-MNIST and digits presets stay
closed set, with validation images held out of the training split. A config is a preset file
(``presets/*.toml``, shipped with the package) and an optional user file laid over it
(:mod:`gallery_builder.evaluation.config`); with neither, the dataclass defaults below are the
recipe for data nobody has seen. Trained models are cached in ``<out>/models`` and reused when
their architecture, training settings and training images (a fingerprint of their ids) are
unchanged.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from gallery_builder.cli.options import TRUST_FLAG
from gallery_builder.data.datasets import (
    ImageSet,
    list_image_folder,
    load_digits,
    load_fashion_mnist,
    load_image_folder,
)
from gallery_builder.data.glyphs import FONT_SETS, glyphs_dir
from gallery_builder.data.splits import (
    PARTS,
    SplitSettings,
    distractor_index,
    fingerprint,
    holdout_images,
    preview,
    split_by_class,
    split_folders,
)
from gallery_builder.evaluation.config import (
    ConfigError,
    from_mapping,
    preset_files,
    read_config_file,
)
from gallery_builder.models import (
    EmbeddingNet,
    create_model,
    load_model,
    model_role,
    registered_identity,
    save_model,
)
from gallery_builder.models.checkpoint import CheckpointError, read_config
from gallery_builder.training.fit import TrainSettings, train_distilled, train_metric
from gallery_builder.training.heads import OPEN_SET_HEADS, HeadSettings
from query_sdk.errors import DataError
from query_sdk.spec import InputSpec, to_model_input

log = logging.getLogger(__name__)

__all__ = [
    "ModelSpec",
    "ExperimentConfig",
    "PRESETS",
    "preset_names",
    "load_config",
    "with_input_spec",
    "check_lineup",
    "Splits",
    "load_splits",
    "get_model",
    "get_distilled",
    "cached_models",
]

#: Built-in datasets a config's ``dataset`` can name (anything else labels a folder).
BUILTIN_DATASETS = ("fashion-mnist", "digits", *FONT_SETS)
#: Files sampled to find a folder's most common image size, and training images sampled for
#: the mean and std of an input spec.
SHAPE_SAMPLE = 2000


@dataclass
class ModelSpec:
    """One model of the line-up: architecture, size and how it is trained, or ``checkpoint``,
    a model folder (``cmce train``, ``cmce import-model``) used as it is: then architecture,
    kwargs, train and subset are not used. ``name`` (default: the architecture or the folder's
    name) names its cache folder and its settings in the report."""

    name: str = ""
    architecture: str = ""
    embedding_dim: int = 128
    kwargs: dict = field(default_factory=dict)
    train: TrainSettings = field(default_factory=TrainSettings)
    subset: float = 1.0  # fraction of the training images it sees (diversity, update study)
    checkpoint: Path | None = None

    def __post_init__(self) -> None:
        if self.checkpoint is None:
            if not self.architecture:
                raise ValueError("architecture: give a registered architecture or a checkpoint")
            try:
                model_role(self.architecture)
            except ValueError as e:  # it lists the registered architectures
                raise ValueError(f"architecture: {e}") from None
            self.train = self.train.for_architecture(self.architecture)
        self.name = self.name or (
            Path(self.checkpoint).name if self.checkpoint else self.architecture
        )
        if self.embedding_dim < 1:
            raise ValueError(f"embedding_dim must be at least 1, got {self.embedding_dim}")
        if not 0 < self.subset <= 1:
            raise ValueError(f"subset must be in (0, 1], got {self.subset}")


def _default_gallery() -> list[ModelSpec]:
    """The three gallery families (the defaults for data nobody has seen), each larger than
    the query model and trained on its own 80% of the training images; the ViT's patch
    follows the input (:func:`gallery_builder.models.vit.auto_patch`) and it starts with a
    convolutional stem (with a linear patch projection it collapsed to chance on the glyphs at
    the CNNs' learning rate, and reached 30% Recall@1 at a third of it)."""
    vit = {"dim": 96, "depth": 4, "conv_stem": True}
    return [
        ModelSpec("resnet", "resnet", 128, {"width": 8}, TrainSettings(seed=11), subset=0.8),
        ModelSpec("widecnn", "widecnn", 256, {"width": 16}, TrainSettings(seed=12), subset=0.8),
        ModelSpec("vit", "vit", 128, vit, TrainSettings(seed=13), subset=0.8),
    ]


def _half_budget(seed: int) -> TrainSettings:
    """Half the default step budget, per class and per image too (the diversity study)."""
    return TrainSettings(
        steps=TrainSettings.steps // 2,
        steps_per_class=TrainSettings.steps_per_class / 2,
        min_epochs=TrainSettings.min_epochs / 2,
        seed=seed,
    )


def _default_diversity_models() -> list[ModelSpec]:
    """Extra gallery models of the diversity study, at half the steps: one architecture with
    the same data and other seeds, and with other random halves of the data."""

    def widecnn(name: str, seed: int, subset: float) -> ModelSpec:
        return ModelSpec(name, "widecnn", 256, {"width": 16}, _half_budget(seed), subset)

    return [
        widecnn("widecnn-seed-a", 31, 1.0),
        widecnn("widecnn-seed-b", 32, 1.0),
        widecnn("widecnn-half-a", 33, 0.5),
        widecnn("widecnn-half-b", 34, 0.5),
    ]


def _default_diversity() -> dict[str, list[str]]:
    return {
        "seeds": ["widecnn-seed-a", "widecnn-seed-b"],
        "data subsets": ["widecnn-half-a", "widecnn-half-b"],
        "architectures": ["resnet", "widecnn", "vit"],
    }


def _default_query() -> ModelSpec:
    """The small query model, its embedding as wide as the unified space: at 64 dims it was
    the bottleneck on unseen classes (glyphs, sym:query Recall@1 / MAP@R 91.1 / 52.4 at 64,
    92.5 / 55.0 at 128, 93.2 / 57.6 at 256), and 128 is also the smallest distilled
    baseline's width."""
    return ModelSpec("query", "mobilenet", 128, {"width": 16}, TrainSettings(seed=21))


def _default_old_query() -> ModelSpec:
    """The update study's old query model: half the images (so half the per-image floor),
    half the steps where the per-class floor does not bind (few classes), the full per-class
    floor where it does (at half of it, 600 steps for 240 Han classes, the loss had not taken
    off: the update study's old Recall@1 was 7.8)."""
    return ModelSpec(
        "query-old",
        "mobilenet",
        128,
        {"width": 16},
        TrainSettings(steps=TrainSettings.steps // 2, seed=22),
        subset=0.5,
    )


@dataclass
class ExperimentConfig:
    """Everything a run depends on. Config files set any field but the ones marked ``cli``
    (data folders and trust come from the command line)."""

    dataset: str = "folder"  # a built-in (BUILTIN_DATASETS) or the label of a folder run
    spec: InputSpec | None = None  # None: the images' most common size, mean/std of training
    gallery_models: list[ModelSpec] = field(default_factory=_default_gallery)
    query_model: ModelSpec = field(default_factory=_default_query)
    old_query_model: ModelSpec = field(default_factory=_default_old_query)  # the update study
    heads: HeadSettings = field(default_factory=lambda: replace(OPEN_SET_HEADS))
    head_seeds: tuple[int, ...] = (0, 1, 2)
    heads_views: int = 3  # random views of each training image the heads also train on
    # the diversity study: extra gallery models (never in the default ensemble) and axes
    # naming the models of each (line-up or extra)
    diversity_models: list[ModelSpec] = field(default_factory=_default_diversity_models)
    diversity: dict[str, list[str]] = field(default_factory=_default_diversity)
    unified_dim: int = 128
    split: SplitSettings = field(default_factory=SplitSettings)
    max_side: int = 64  # an input spec read from the images is scaled down to this side
    train_limit: int | None = None  # cap on training images (quick runs)
    gallery_limit: int | None = None  # also caps the validation gallery
    query_limit: int | None = None  # also caps the validation queries
    # models trained at a time, each in its own process (0: one per CPU core, at most 4;
    # gallery_builder.evaluation.parallel)
    workers: int = 0
    data: Path | None = field(default=None, metadata={"cli": "--data"})
    train_dir: Path | None = field(default=None, metadata={"cli": "--train"})
    gallery_dir: Path | None = field(default=None, metadata={"cli": "--gallery"})
    query_dir: Path | None = field(default=None, metadata={"cli": "--query"})
    trust: tuple[str, ...] = field(default=(), metadata={"cli": TRUST_FLAG})

    def __post_init__(self) -> None:
        if not self.gallery_models:
            raise ValueError("gallery_models: at least one gallery model is needed")
        names = [
            m.name
            for m in (
                *self.gallery_models,
                *self.diversity_models,
                self.query_model,
                self.old_query_model,
            )
        ]
        if len(set(names)) != len(names):
            twice = sorted({n for n in names if names.count(n) > 1})
            raise ValueError(f"model names must differ (they name cache folders): {twice}")
        known = {m.name for m in (*self.gallery_models, *self.diversity_models)}
        for axis, members in self.diversity.items():
            if unknown := sorted(set(members) - known):
                raise ValueError(
                    f"diversity.{axis}: no gallery or diversity model named {unknown}; "
                    f"known: {sorted(known)}"
                )
        if not self.head_seeds:
            raise ValueError("head_seeds: at least one seed is needed")
        for name, low in {"heads_views": 0, "unified_dim": 1, "max_side": 8, "workers": 0}.items():
            if getattr(self, name) < low:
                raise ValueError(f"{name} must be at least {low}, got {getattr(self, name)}")
        for name in ("train_limit", "gallery_limit", "query_limit"):
            if getattr(self, name) is not None and getattr(self, name) < 2:
                raise ValueError(f"{name} must be at least 2 (or unset), got {getattr(self, name)}")
        folders = (self.train_dir, self.gallery_dir, self.query_dir)
        if any(folders) and not all(folders):
            raise ValueError("give all three of --train, --gallery and --query, or none")
        if self.data is not None and any(folders):
            raise ValueError("give --data or --train/--gallery/--query, not both")

    @property
    def on_folders(self) -> bool:
        """Whether the images come from the user's folders (else a built-in dataset)."""
        return self.data is not None or self.train_dir is not None

    def to_dict(self) -> dict:
        """JSON-able settings (paths as strings; the report embeds them)."""
        d = asdict(self)
        d["spec"] = self.spec.to_dict() if self.spec else None
        return _jsonable(d)


def _jsonable(value):
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return str(value) if isinstance(value, Path) else value


# ------------------------------------------------------------------------------- configs


def preset_names() -> list[str]:
    """The shipped presets (``gallery_builder/evaluation/presets/<name>.toml``)."""
    return list(preset_files())


def load_config(preset: str | None = None, config: Path | None = None, **cli) -> ExperimentConfig:
    """The dataclass defaults, with preset ``preset`` laid over them, then the user's config
    file, then ``cli`` (fields set by command-line options). ConfigError naming the file and the
    key path for anything a file gets wrong."""
    cfg = ExperimentConfig()
    if preset is not None:
        files = preset_files()
        if preset not in files:
            raise ConfigError(f"unknown preset {preset!r}; known: {', '.join(sorted(files))}")
        cfg = from_mapping(
            ExperimentConfig, read_config_file(files[preset]), cfg, str(files[preset])
        )
    if cli.get("data") is not None or cli.get("train_dir") is not None:
        # a preset's recipe on the user's images: the images' own spec unless the file says
        cfg = replace(cfg, dataset="folder", spec=None)
    if config is not None:
        cfg = from_mapping(ExperimentConfig, read_config_file(config), cfg, str(config))
    try:
        return replace(cfg, **cli)
    except ValueError as e:
        raise ConfigError(str(e)) from None


PRESETS = {name: functools.partial(load_config, name) for name in preset_names()}


def check_lineup(cfg: ExperimentConfig) -> None:
    """ConfigError naming the model when an architecture cannot take the input spec (a ViT
    patch that does not divide the image side), before anything trains."""
    models = [
        *((f"gallery_models[{i}]", m) for i, m in enumerate(cfg.gallery_models)),
        *((f"diversity_models[{i}]", m) for i, m in enumerate(cfg.diversity_models)),
        ("query_model", cfg.query_model),
        ("old_query_model", cfg.old_query_model),
    ]
    size = f"{cfg.spec.height}x{cfg.spec.width}x{cfg.spec.channels}"
    for key, ms in models:
        if ms.checkpoint is not None:
            continue
        try:
            create_model(ms.architecture, cfg.spec, ms.embedding_dim, **ms.kwargs)
        except (TypeError, ValueError) as e:
            raise ConfigError(
                f"{key} ({ms.name}): cannot build {ms.architecture} for {size} images: {e}; "
                "change its kwargs or the input spec (--input-spec)"
            ) from None


# --------------------------------------------------------------------------- input spec


def _image_shape(path: Path) -> tuple[int, int, int] | None:
    """(height, width, channels) from an image file's header, None if it cannot be read."""
    try:
        with Image.open(path) as im:
            grey = im.mode in ("1", "L", "LA", "I", "I;16", "F")
            return im.height, im.width, 1 if grey else 3
    except Exception:  # unreadable files are skipped (and listed) when decoded
        return None


def _scaled(shape: tuple[int, int, int], max_side: int) -> tuple[int, int, int]:
    """``shape`` scaled down so its longer side is ``max_side`` (sides multiples of 4, so
    that patch sizes divide them)."""
    h, w, c = shape
    if max(h, w) <= max_side:
        return shape
    f = max_side / max(h, w)
    return max(8, 4 * round(h * f / 4)), max(8, 4 * round(w * f / 4)), c


def _common_shape(folders: list[Path], max_side: int) -> tuple[int, int, int]:
    """The most common (height, width, channels) of up to :data:`SHAPE_SAMPLE` files spread
    over ``folders``, scaled down to ``max_side``."""
    paths = [p for f in folders for p, _ in list_image_folder(f)[0]]
    pick = np.unique(np.linspace(0, len(paths) - 1, min(SHAPE_SAMPLE, len(paths))).astype(int))
    shapes = Counter(s for i in pick if (s := _image_shape(paths[i])) is not None)
    if not shapes:
        raise DataError(f"{folders[0]}: none of {len(pick)} sampled image files can be read")
    ((shape, n),) = shapes.most_common(1)
    scaled = _scaled(shape, max_side)
    log.info(
        "input spec %s (%d of %d sampled files are %dx%dx%d)",
        "x".join(map(str, scaled)),
        n,
        sum(shapes.values()),
        *shape,
    )
    return scaled


def with_input_spec(
    cfg: ExperimentConfig, shape: tuple[int, int, int] | None = None
) -> ExperimentConfig:
    """``cfg`` with a complete input spec. ``shape`` (``--input-spec``) replaces the size and
    channels; without it and without ``cfg.spec`` they are the images' most common ones; mean
    and std are the training images' unless ``cfg.spec`` gives them (and no ``shape``)."""
    if shape is None and cfg.spec is not None:
        return cfg
    cfg = _on_glyphs_root(cfg)
    if shape is None:
        folders = (
            [cfg.data] if cfg.data is not None else [cfg.train_dir, cfg.gallery_dir, cfg.query_dir]
        )
        if not cfg.on_folders:
            raise ConfigError(f"the {cfg.dataset} preset has no input spec; give --input-spec")
        shape = _common_shape(folders, cfg.max_side)
    train = load_splits(replace(cfg, spec=InputSpec(*shape))).train.images
    sample = np.random.default_rng(0).permutation(len(train))[:SHAPE_SAMPLE]
    pixels = train[np.sort(sample)].reshape(-1, shape[2]).astype(np.float64) / 255.0
    mean, std = pixels.mean(axis=0), np.maximum(pixels.std(axis=0), 1e-3)
    spec = InputSpec(*shape, mean=tuple(np.round(mean, 4)), std=tuple(np.round(std, 4)))
    return replace(cfg, spec=spec)


# -------------------------------------------------------------------------------- splits


@dataclass
class Splits:
    """The five parts of a run and how they were made: ``protocol`` in words, ``split`` as a
    JSON-able record (seed, class names of each part, image counts, skipped files).
    ``val_distractors`` indexes the training images that join the validation gallery as
    distractors (open set; :func:`~gallery_builder.data.splits.distractor_index`)."""

    train: ImageSet
    val_gallery: ImageSet
    val_query: ImageSet
    gallery: ImageSet
    query: ImageSet
    protocol: str
    open_set: bool
    split: dict
    val_distractors: np.ndarray


@functools.lru_cache(maxsize=3)
def _decoded(root: str, shape: tuple[int, int, int]) -> ImageSet:
    """A folder decoded at ``shape`` once per process (spec resolution and the run share it)."""
    return load_image_folder(Path(root), InputSpec(*shape))


def _folder(root: Path, spec: InputSpec) -> ImageSet:
    data = _decoded(str(Path(root).resolve()), spec.shape)
    return replace(data, name=str(root), classes=list(data.classes), skipped=list(data.skipped))


def load_splits(cfg: ExperimentConfig) -> Splits:
    """The train, validation and search parts of ``cfg``'s data per its protocol."""
    if cfg.spec is None:
        raise ConfigError("load_splits needs a complete input spec: call with_input_spec first")
    cfg = _on_glyphs_root(cfg)
    if cfg.on_folders:
        parts, record, skipped, source = _open_set_parts(cfg)
    elif cfg.dataset in ("fashion-mnist", "digits"):
        parts, record = _closed_set_parts(cfg)
        skipped, source = [], cfg.dataset
    else:
        raise ConfigError(
            f"unknown dataset {cfg.dataset!r}; known: {', '.join(BUILTIN_DATASETS)} "
            "(or give image folders with --data, or --train/--gallery/--query)"
        )
    parts = _limited(parts, cfg)
    distractors = _distractors(parts, cfg) if record["open_set"] else np.zeros(0, np.int64)
    record["images"] = {p: len(v) for p, v in parts.items()}
    record["val_distractors"] = {
        "images": len(distractors),
        "classes": len(np.unique(parts["train"].labels[distractors])),
    }
    record["fingerprints"] = {p: v.name.rsplit("-", 1)[1] for p, v in parts.items()}
    record["skipped"] = {"count": len(skipped), "files": [list(s) for s in skipped[:20]]}
    open_set = record["open_set"]
    protocol = (_open_protocol if open_set else _closed_protocol)(source, record)
    if skipped:
        protocol += f"; {len(skipped)} unreadable image file(s) skipped: " + preview(
            [p for p, _ in skipped]
        )
    return Splits(
        **parts, protocol=protocol, open_set=open_set, split=record, val_distractors=distractors
    )


def _distractors(parts: dict[str, ImageSet], cfg: ExperimentConfig) -> np.ndarray:
    """The training images that join the validation gallery: ``split.distractors`` of them,
    by default as many as make it as large as the search gallery."""
    n = cfg.split.distractors
    if n is None:
        n = len(parts["gallery"]) - len(parts["val_gallery"])
    return distractor_index(parts["train"].labels, n, cfg.split.seed)


def _on_glyphs_root(cfg: ExperimentConfig) -> ExperimentConfig:
    """A font set (glyphs, han) is a class-folder root like any other (DatasetMissing if
    absent)."""
    if cfg.dataset not in FONT_SETS or cfg.on_folders:
        return cfg
    return replace(cfg, data=glyphs_dir(cfg.dataset))


def _open_set_parts(cfg: ExperimentConfig) -> tuple[dict, dict, list, str]:
    if cfg.data is not None:
        data = _folder(cfg.data, cfg.spec)
        parts, record = split_by_class(data, cfg.split)
        return parts, record, data.skipped, str(cfg.data)
    train, gallery, query = (
        _folder(d, cfg.spec) for d in (cfg.train_dir, cfg.gallery_dir, cfg.query_dir)
    )
    parts, record = split_folders(train, gallery, query, cfg.split)
    skipped = [*train.skipped, *gallery.skipped, *query.skipped]
    return (
        parts,
        record,
        skipped,
        f"{cfg.train_dir} (training), {cfg.gallery_dir} (gallery), {cfg.query_dir} (queries)",
    )


def _closed_set_parts(cfg: ExperimentConfig) -> tuple[dict, dict]:
    """Fashion-MNIST: 50k of the train split train, the other 10k are the gallery, the test
    split the queries; digits: 60 / 20 / 20 %. ``split.val_share`` of the training part is held
    out as validation gallery and queries (same classes: closed set)."""
    rng = np.random.default_rng(cfg.split.seed)
    if cfg.dataset == "fashion-mnist":
        full, query = load_fashion_mnist("train"), load_fashion_mnist("test")
        order = rng.permutation(len(full))
        train, gallery = full.subset(order[:50000]), full.subset(order[50000:])
    else:
        full = load_digits()
        order = rng.permutation(len(full))
        cut1, cut2 = int(0.6 * len(full)), int(0.8 * len(full))
        train, gallery, query = (
            full.subset(order[a:b]) for a, b in ((0, cut1), (cut1, cut2), (cut2, None))
        )
    train, val_gallery, val_query = holdout_images(train, cfg.split.val_share, cfg.split.seed)
    parts = {
        "train": train,
        "val_gallery": val_gallery,
        "val_query": val_query,
        "gallery": gallery,
        "query": query,
    }
    for p in ("gallery", "query"):
        parts[p].name = f"{cfg.dataset}:{p}-{fingerprint(parts[p].ids)}"
    if cfg.spec.shape != train.images.shape[1:]:
        for v in parts.values():
            v.images = to_model_input(v.images, cfg.spec)
    classes = list(full.classes)
    record = {
        "seed": cfg.split.seed,
        "open_set": False,
        "classes": {"train": classes, "val": classes, "search": classes},
    }
    return parts, record


def _limited(parts: dict[str, ImageSet], cfg: ExperimentConfig) -> dict[str, ImageSet]:
    """The parts cut to the config's limits (a seeded random subset of each, renamed with its
    new fingerprint; queries whose class lost every gallery image are dropped)."""
    limits = {
        "train": cfg.train_limit,
        "val_gallery": cfg.gallery_limit,
        "gallery": cfg.gallery_limit,
        "val_query": cfg.query_limit,
        "query": cfg.query_limit,
    }
    rng = np.random.default_rng(cfg.split.seed)
    out = {}
    for p in PARTS:
        v, limit = parts[p], limits[p]
        if limit is not None and len(v) > limit:
            v = v.subset(np.sort(rng.permutation(len(v))[:limit]))
            if p in ("val_query", "query"):
                v = v.subset(np.isin(v.labels, out[p.replace("query", "gallery")].labels))
            v.name = f"{v.name.rsplit('-', 1)[0]}-{fingerprint(v.ids)}"
        out[p] = v
    train = out["train"]
    present = np.unique(train.labels)
    if len(present) < len(train.classes):  # keep training labels 0..C-1
        train.labels = np.searchsorted(present, train.labels)
        train.classes = [train.classes[i] for i in present]
    return out


def _part_line(record: dict, role: str, parts: tuple[str, ...]) -> str:
    names = record["classes"][role]
    images = " / ".join(f"{record['images'][p]} {p.split('_')[-1]}" for p in parts)
    return f"{len(names)} classes ({preview(names)}; {images} images)"


def _open_protocol(source: str, record: dict) -> str:
    val = _part_line(record, "val", ("val_gallery", "val_query"))
    return (
        f"open set, split by class (seed {record['seed']}) of {source}: models and heads train "
        f"on {_part_line(record, 'train', ('train',))}; {val} "
        "are held out of all training as validation classes (fusion weights, neighbours and "
        f"the recommendation are chosen on them){_distractor_words(record)}; "
        f"{_part_line(record, 'search', ('gallery', 'query'))} are searched, none of them seen "
        "by any training"
    )


def _distractor_words(record: dict) -> str:
    d = record["val_distractors"]
    if not d["images"]:
        return ""
    return (
        f", their gallery joined by {d['images']} training images of {d['classes']} training "
        "classes as distractors (no validation query matches them; they make the validation "
        "gallery as crowded as the search one)"
    )


def _closed_protocol(source: str, record: dict) -> str:
    n = record["images"]
    return (
        f"{source}, closed set (every query class is a training class; split seed "
        f"{record['seed']}): models and heads train on {n['train']} images; {n['val_gallery']} "
        f"+ {n['val_query']} more training-split images, held out of all training, are the "
        f"validation gallery and queries; {n['gallery']} other images are the gallery and "
        f"{n['query']} the queries" + (" (the test split)" if source == "fashion-mnist" else "")
    )


# ---------------------------------------------------------------------------- training


def _subset_index(n: int, fraction: float, seed: int) -> np.ndarray:
    if fraction >= 1.0:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).permutation(n)[: int(round(fraction * n))])


def _model_record(ms: ModelSpec, cfg: ExperimentConfig, train: ImageSet) -> tuple[dict, dict]:
    """The identity and training record a cached checkpoint of ``ms`` must have."""
    identity = registered_identity(ms.architecture, cfg.spec, ms.embedding_dim, **ms.kwargs)
    training = {
        "data": train.name,
        "images": len(_subset_index(len(train), ms.subset, ms.train.seed)),
        "subset": ms.subset,
        "loss": "normalized_softmax",
        "settings": ms.train.to_dict(),
    }
    return identity, training


def _distilled_record(
    ms: ModelSpec,
    teacher_name: str,
    teacher_dim: int,
    teacher_fp: str,
    cfg: ExperimentConfig,
    train: ImageSet,
) -> tuple[ModelSpec, dict, dict]:
    """The distilled baseline of a teacher (``ms`` is the query model's spec) and the identity
    and training record its cached checkpoint must have."""
    ms = replace(ms, name=f"kd-{teacher_name}", embedding_dim=teacher_dim)
    identity = registered_identity(ms.architecture, cfg.spec, ms.embedding_dim, **ms.kwargs)
    training = {
        "data": train.name,
        "images": len(train),
        "loss": "distill_l2",
        "teacher": teacher_fp,
        "settings": ms.train.to_dict(),
    }
    return ms, identity, training


def cached_models(cfg: ExperimentConfig, train: ImageSet, models_dir: Path) -> set[str]:
    """The names of the models a run trains (``kd-G`` for the distilled baselines) whose
    checkpoint in ``models_dir`` was trained as ``cfg`` asks, by its config (the weights are
    checked when the model is loaded)."""
    found = {
        ms.name: c
        for ms in (*cfg.gallery_models, cfg.query_model, *cfg.diversity_models, cfg.old_query_model)
        if ms.checkpoint is None
        and (c := _matching_config(models_dir / ms.name, *_model_record(ms, cfg, train)))
    }
    names = set(found)
    for ms in cfg.gallery_models:
        teacher = found.get(ms.name)
        if ms.checkpoint is not None:
            with contextlib.suppress(CheckpointError):
                teacher = read_config(ms.checkpoint, "model")
        if teacher is not None:
            kd, identity, training = _distilled_record(
                cfg.query_model,
                ms.name,
                teacher["embedding_dim"],
                teacher["fingerprint"],
                cfg,
                train,
            )
            if _matching_config(models_dir / kd.name, identity, training):
                names.add(kd.name)
    return names


def _matching_config(path: Path, identity: dict, training: dict) -> dict | None:
    """The model config in ``path`` if it records this identity and training, else None."""
    try:
        config = read_config(path, "model")
    except CheckpointError:
        return None
    return config if config["identity"] == identity and config["training"] == training else None


def _cached(path: Path, identity: dict, training: dict) -> tuple[EmbeddingNet, dict] | None:
    if _matching_config(path, identity, training) is None:
        return None
    try:
        model, config = load_model(path)  # checks the weights against the config
    except CheckpointError:
        return None
    log.info("reusing %s", path)
    return model, config


def get_model(
    ms: ModelSpec,
    cfg: ExperimentConfig,
    train: ImageSet,
    models_dir: Path,
    role: str,
    progress: bool = True,
) -> tuple[EmbeddingNet, dict]:
    """Train a metric-learning model per ``ms`` (or reuse its cached checkpoint), or load
    ``ms.checkpoint`` (code runs only if ``cfg.trust`` names it); ``progress`` shows a bar."""
    if ms.checkpoint is not None:
        model, config = load_model(ms.checkpoint, cfg.trust)
        if model.input_spec.shape != cfg.spec.shape:
            have, want = ("x".join(map(str, s.shape)) for s in (model.input_spec, cfg.spec))
            raise ConfigError(
                f"{ms.checkpoint}: the model takes {have} images, the experiment's are {want}; "
                f"run with --input-spec {have.lower()}"
            )
        return model, config
    identity, training = _model_record(ms, cfg, train)
    path = models_dir / ms.name
    if (hit := _cached(path, identity, training)) is not None:
        return hit
    index = _subset_index(len(train), ms.subset, ms.train.seed)
    torch.manual_seed(ms.train.seed)
    model = create_model(ms.architecture, cfg.spec, ms.embedding_dim, **ms.kwargs)
    images, labels = train.images[index], train.labels[index]
    train_metric(model, images, labels, ms.train, desc=ms.name, progress=progress)
    config = save_model(path, model, identity, role, training)
    return model.eval(), config


def get_distilled(
    ms: ModelSpec,
    teacher_name: str,
    teacher: EmbeddingNet,
    teacher_fp: str,
    cfg: ExperimentConfig,
    train: ImageSet,
    models_dir: Path,
    progress: bool = True,
) -> tuple[EmbeddingNet, dict]:
    """The knowledge-distillation baseline: ``ms``'s architecture (the query model's, with its
    training budget and augmentation) regressing the frozen teacher on the same views."""
    ms, identity, training = _distilled_record(
        ms, teacher_name, teacher.embedding_dim, teacher_fp, cfg, train
    )
    path = models_dir / ms.name
    if (hit := _cached(path, identity, training)) is not None:
        return hit
    torch.manual_seed(ms.train.seed)
    model = create_model(ms.architecture, cfg.spec, ms.embedding_dim, **ms.kwargs)
    classes = len(np.unique(train.labels))
    train_distilled(model, train.images, teacher, ms.train, classes, ms.name, progress)
    config = save_model(path, model, identity, "query", training)
    return model.eval(), config
