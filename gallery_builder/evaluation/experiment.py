"""The reference experiment: data split, model line-up, and training with a reusable cache.

Protocol: models and heads train on one part of the training split; the rest of the training
split is the gallery; the test split is the query set. No gallery or query image is seen by
any training. Trained models are cached in ``<out>/models`` and reused when their
architecture and training settings are unchanged.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from gallery_builder.data.datasets import ImageSet, load_digits, load_fashion_mnist
from gallery_builder.models import (
    EmbeddingNet,
    create_model,
    load_model,
    registered_identity,
    save_model,
)
from gallery_builder.models.checkpoint import CheckpointError
from gallery_builder.training.fit import TrainSettings, train_distilled, train_metric
from gallery_builder.training.heads import HeadSettings
from query_sdk.spec import InputSpec

log = logging.getLogger(__name__)

__all__ = [
    "ModelSpec",
    "ExperimentConfig",
    "PRESETS",
    "Splits",
    "load_splits",
    "get_model",
    "get_distilled",
]


@dataclass
class ModelSpec:
    """One model of the line-up: architecture, size and how it is trained."""

    name: str
    architecture: str
    embedding_dim: int
    kwargs: dict = field(default_factory=dict)
    train: TrainSettings = field(default_factory=TrainSettings)
    subset: float = 1.0  # fraction of the training images it sees (diversity, update study)


@dataclass
class ExperimentConfig:
    dataset: str
    spec: InputSpec
    gallery_models: list[ModelSpec]
    query_model: ModelSpec
    old_query_model: ModelSpec  # trained on less data: the "old" side of the update study
    heads: HeadSettings = field(default_factory=HeadSettings)
    head_seeds: tuple[int, ...] = (0, 1, 2)
    unified_dim: int = 128
    train_limit: int | None = None  # cap on training images (quick runs)
    gallery_limit: int | None = None
    query_limit: int | None = None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["spec"] = self.spec.to_dict()
        return d


def _fashion_mnist_preset(epochs_g: int, epochs_q: int, head_epochs: int, **limits):
    spec = InputSpec(28, 28, 1, mean=(0.286,), std=(0.353,))
    return ExperimentConfig(
        dataset="fashion-mnist",
        spec=spec,
        gallery_models=[
            ModelSpec(
                "resnet",
                "resnet",
                128,
                {"width": 16},
                TrainSettings(epochs=epochs_g, seed=11),
                subset=0.8,
            ),
            ModelSpec(
                "widecnn",
                "widecnn",
                256,
                {"width": 32},
                TrainSettings(epochs=epochs_g, seed=12),
                subset=0.8,
            ),
            # 7x7 patches (16 tokens): a ViT needs more epochs than the CNNs to catch up with
            # them, and a weak member drags the ensemble's mean down
            ModelSpec(
                "vit",
                "vit",
                192,
                {"patch": 7, "dim": 112, "depth": 4},
                TrainSettings(epochs=2 * epochs_g, seed=13),
                subset=0.8,
            ),
        ],
        query_model=ModelSpec(
            "query", "mobilenet", 64, {"width": 16}, TrainSettings(epochs=epochs_q, seed=21)
        ),
        old_query_model=ModelSpec(
            "query-old",
            "mobilenet",
            64,
            {"width": 16},
            TrainSettings(epochs=max(1, epochs_q // 2), seed=22),
            subset=0.5,
        ),
        heads=HeadSettings(epochs=head_epochs),
        **limits,
    )


PRESETS = {
    "default": lambda: _fashion_mnist_preset(3, 6, 10),
    "quick": lambda: _fashion_mnist_preset(
        1, 2, 20, train_limit=5000, gallery_limit=2000, query_limit=2000
    ),
    "digits": lambda: ExperimentConfig(
        dataset="digits",
        spec=InputSpec(8, 8, 1, mean=(0.3,), std=(0.4,)),
        gallery_models=[
            ModelSpec(
                "resnet",
                "resnet",
                32,
                {"width": 8},
                TrainSettings(epochs=8, batch_size=64, seed=11),
                subset=0.8,
            ),
            ModelSpec(
                "widecnn",
                "widecnn",
                48,
                {"width": 8},
                TrainSettings(epochs=8, batch_size=64, seed=12),
                subset=0.8,
            ),
            ModelSpec(
                "vit",
                "vit",
                40,
                {"patch": 2, "dim": 32, "depth": 2, "heads": 2},
                TrainSettings(epochs=8, batch_size=64, seed=13),
                subset=0.8,
            ),
        ],
        query_model=ModelSpec(
            "query",
            "mobilenet",
            16,
            {"width": 4, "stages": [[2, 1], [4, 2]]},
            TrainSettings(epochs=8, batch_size=64, flip=False, seed=21),
        ),
        old_query_model=ModelSpec(
            "query-old",
            "mobilenet",
            16,
            {"width": 4, "stages": [[2, 1], [4, 2]]},
            TrainSettings(epochs=4, batch_size=64, flip=False, seed=22),
            subset=0.5,
        ),
        heads=HeadSettings(epochs=10, batch_size=128, hidden=64),
        head_seeds=(0, 1),
        unified_dim=32,
    ),
}


@dataclass
class Splits:
    train: ImageSet
    gallery: ImageSet
    query: ImageSet
    protocol: str


def load_splits(cfg: ExperimentConfig) -> Splits:
    """Train / gallery / query sets per the protocol (fixed permutation, seed 0)."""
    rng = np.random.default_rng(0)
    if cfg.dataset == "fashion-mnist":
        full, query = load_fashion_mnist("train"), load_fashion_mnist("test")
        order = rng.permutation(len(full))
        train, gallery = full.subset(order[:50000]), full.subset(order[50000:])
        protocol = (
            "Fashion-MNIST: models and heads train on 50k of the train split, the other "
            "10k train images are the gallery, the 10k test images are the queries"
        )
    elif cfg.dataset == "digits":
        full = load_digits()
        order = rng.permutation(len(full))
        cut1, cut2 = int(0.6 * len(full)), int(0.8 * len(full))
        train, gallery = full.subset(order[:cut1]), full.subset(order[cut1:cut2])
        query = full.subset(order[cut2:])
        protocol = "scikit-learn digits: 60% train, 20% gallery, 20% queries (disjoint)"
    else:
        raise ValueError(f"unknown dataset {cfg.dataset!r}; known: fashion-mnist, digits")
    train = train.subset(slice(0, cfg.train_limit))
    gallery = gallery.subset(slice(0, cfg.gallery_limit))
    query = query.subset(slice(0, cfg.query_limit))
    if cfg.train_limit or cfg.gallery_limit or cfg.query_limit:
        protocol += f" (subset: {len(train)} train, {len(gallery)} gallery, {len(query)} queries)"
    return Splits(train, gallery, query, protocol)


def _subset_index(n: int, fraction: float, seed: int) -> np.ndarray:
    if fraction >= 1.0:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).permutation(n)[: int(round(fraction * n))])


def _cached(path: Path, identity: dict, training: dict) -> tuple[EmbeddingNet, dict] | None:
    try:
        model, config = load_model(path)
    except CheckpointError:
        return None
    if config["identity"] == identity and config["training"] == training:
        log.info("reusing %s", path)
        return model, config
    return None


def get_model(
    ms: ModelSpec, cfg: ExperimentConfig, train: ImageSet, models_dir: Path, role: str
) -> tuple[EmbeddingNet, dict]:
    """Train a metric-learning model per ``ms`` (or reuse its cached checkpoint)."""
    identity = registered_identity(ms.architecture, cfg.spec, ms.embedding_dim, **ms.kwargs)
    index = _subset_index(len(train), ms.subset, ms.train.seed)
    training = {
        "data": train.name,
        "images": len(index),
        "subset": ms.subset,
        "loss": "normalized_softmax",
        "settings": ms.train.to_dict(),
    }
    path = models_dir / ms.name
    if (hit := _cached(path, identity, training)) is not None:
        return hit
    torch.manual_seed(ms.train.seed)
    model = create_model(ms.architecture, cfg.spec, ms.embedding_dim, **ms.kwargs)
    train_metric(model, train.images[index], train.labels[index], ms.train, desc=ms.name)
    config = save_model(path, model, identity, role, training)
    return model.eval(), config


def get_distilled(
    ms: ModelSpec,
    teacher_name: str,
    teacher_train: torch.Tensor,
    teacher_mirrored: torch.Tensor,
    teacher_fp: str,
    cfg: ExperimentConfig,
    train: ImageSet,
    models_dir: Path,
) -> tuple[EmbeddingNet, dict]:
    """The knowledge-distillation baseline: ``ms``'s architecture regressing a teacher.

    ``teacher_train`` and ``teacher_mirrored`` hold the teacher's embeddings of the training
    images and of their mirror images (the evaluation computes them once for the heads too).
    """
    n = len(train)
    if len(teacher_train) != n or len(teacher_mirrored) != n:
        raise ValueError(
            f"{teacher_name}: {len(teacher_train)} and {len(teacher_mirrored)} "
            f"teacher embeddings for {n} training images"
        )
    ms = replace(ms, name=f"kd-{teacher_name}", embedding_dim=teacher_train.shape[1])
    identity = registered_identity(ms.architecture, cfg.spec, ms.embedding_dim, **ms.kwargs)
    training = {
        "data": train.name,
        "images": n,
        "loss": "distill_l2",
        "teacher": teacher_fp,
        "settings": ms.train.to_dict(),
    }
    path = models_dir / ms.name
    if (hit := _cached(path, identity, training)) is not None:
        return hit
    torch.manual_seed(ms.train.seed)
    model = create_model(ms.architecture, cfg.spec, ms.embedding_dim, **ms.kwargs)
    train_distilled(model, train.images, teacher_train, teacher_mirrored, ms.train, desc=ms.name)
    config = save_model(path, model, identity, "query", training)
    return model.eval(), config
