"""The one fit loop, and the embedding models' training with it: metric learning for gallery
and query models, and the knowledge-distillation baseline (a query model regressing one gallery
model's embedding). The transformation heads (:mod:`gallery_builder.training.heads`) train with
the same loop."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, replace
from typing import ClassVar, Protocol

import numpy as np
import torch
from pytorch_metric_learning.losses import NormalizedSoftmaxLoss
from tqdm.auto import tqdm

from gallery_builder.models import EmbeddingNet, recommended_lr
from gallery_builder.training.augment import Augment
from query_sdk.errors import DataError

__all__ = [
    "FitSettings",
    "TrainSettings",
    "check_settings",
    "planned_epochs",
    "fit",
    "train_metric",
    "train_distilled",
    "embed",
    "embed_views",
    "seed_everything",
]


class FitSettings(Protocol):
    """What :func:`fit` reads from a recipe's settings (:class:`TrainSettings`, ``HeadSettings``).

    ``epochs`` None means "as many as ``steps`` optimiser steps take" (:func:`planned_epochs`),
    so a budget scales with the data instead of being a fixed number of passes. ``warmup`` is
    the share of the one-cycle schedule spent rising to ``lr``; the schedule is sized for
    ``spare_steps`` steps per epoch beyond the batches. Both are class constants of a recipe:
    its published figures were measured with them.
    """

    epochs: int | None
    steps: int
    batch_size: int
    lr: float | None  # must be set by the time it fits
    weight_decay: float
    seed: int
    warmup: ClassVar[float]
    spare_steps: ClassVar[int]


def check_settings(s: FitSettings) -> None:
    """Raise ValueError naming the setting when :func:`fit` could not train with it."""
    if s.epochs is not None and s.epochs < 1:
        raise ValueError(f"epochs must be at least 1 (or unset, to follow steps), got {s.epochs}")
    if s.steps < 1:
        raise ValueError(f"steps must be at least 1, got {s.steps}")
    if s.batch_size < 2:
        raise ValueError(
            f"batch size must be at least 2 (a batch of one sample is skipped), got {s.batch_size}"
        )
    if s.lr is not None and not s.lr > 0:
        raise ValueError(f"learning rate must be positive, got {s.lr}")


def planned_epochs(s: FitSettings, n: int) -> int:
    """Epochs of a fit over ``n`` samples: ``s.epochs``, or the passes that make ``s.steps``
    optimiser steps (at least one, at most 500)."""
    if s.epochs is not None:
        return s.epochs
    return min(500, max(1, round(s.steps / math.ceil(n / s.batch_size))))


@dataclass
class TrainSettings:
    """Optimisation settings of an embedding model; defaults suit a 2-core CPU and small images.

    The budget is ``steps`` optimiser steps unless ``epochs`` is set: a small dataset gets more
    passes, a large one fewer, where a fixed epoch count under-trains small data. It rises to
    ``steps_per_class`` steps per training class on data with many classes and to
    ``min_epochs`` passes over the training images on large data (:meth:`for_data`).
    """

    epochs: int | None = None
    steps: int = 1000
    steps_per_class: float = 5.0
    min_epochs: float = 20.0
    batch_size: int = 256
    lr: float | None = None  # None: the architecture's (for_architecture)
    weight_decay: float = 5e-4
    temperature: float = 0.05
    augment: Augment = field(default_factory=Augment)
    seed: int = 0
    warmup: ClassVar[float] = 0.15
    spare_steps: ClassVar[int] = 0

    def __post_init__(self) -> None:
        check_settings(self)
        if not self.steps_per_class >= 0:
            raise ValueError(f"steps_per_class must be at least 0, got {self.steps_per_class}")
        if not self.min_epochs >= 0:
            raise ValueError(f"min_epochs must be at least 0, got {self.min_epochs}")

    def for_architecture(self, architecture: str) -> TrainSettings:
        """These settings with an unset learning rate set to the one ``architecture`` was
        registered with (:func:`gallery_builder.models.recommended_lr`)."""
        return self if self.lr is not None else replace(self, lr=recommended_lr(architecture))

    def for_data(self, classes: int, images: int) -> TrainSettings:
        """These settings with the step budget raised to ``steps_per_class`` steps per class
        and to ``min_epochs`` passes over ``images`` training images.

        A proxy loss over many classes learns next to nothing until each class has been seen
        often enough: on 1,000 Han characters (400 training classes, 43 fonts each) the query
        model's Recall@1 on unseen classes was 79 after 1,000 steps and 98.6 after 2,000, and
        with half the images and 500 steps it stayed at chance. On many images a fixed budget
        under-trains: on glyphs (24,814 training images, 10 passes at 1,000 steps) the query
        model's Recall@1 / MAP@R on unseen classes went 94.09 / 62.75 at 1,000 steps, 94.98 /
        65.16 at 2,000, 95.54 / 67.90 at 5,000; the gallery's resnet 95.35 / 66.21 → 95.88 /
        68.86 at 2,000.
        """
        floor = max(self.steps_per_class * classes, self.min_epochs * images / self.batch_size)
        return replace(self, steps=max(self.steps, math.ceil(floor)))

    def to_dict(self) -> dict:
        return asdict(self)


def seed_everything(seed: int) -> torch.Generator:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    return torch.Generator().manual_seed(seed)


@torch.no_grad()
def embed(
    model: torch.nn.Module,
    images: np.ndarray | torch.Tensor,
    batch_size: int = 1024,
    progress: str | None = None,
) -> torch.Tensor:
    """Embeddings of uint8 NHWC images, in eval mode."""
    model.eval()
    images = torch.as_tensor(images)
    out = []
    quiet = {"disable": True} if progress is None else {}  # else TQDM_DISABLE still applies
    for start in tqdm(range(0, len(images), batch_size), desc=progress, leave=False, **quiet):
        out.append(model(images[start : start + batch_size]))
    return torch.cat(out) if out else torch.empty(0, getattr(model, "embedding_dim", 0))


@torch.no_grad()
def embed_views(
    models: dict[str, torch.nn.Module],
    images: np.ndarray | torch.Tensor,
    augment: Augment,
    views: int,
    seed: int = 0,
    batch_size: int = 1024,
) -> dict[str, torch.Tensor]:
    """Each model's embeddings of ``views`` random views of every image, (views * N, d) per
    model: view ``v`` of image ``i`` is row ``v * N + i``, and every model sees the same view
    (heads learn from paired embeddings)."""
    for m in models.values():
        m.eval()
    images = torch.as_tensor(images)
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, list[torch.Tensor]] = {name: [] for name in models}
    for _ in tqdm(range(views), desc="views", leave=False):
        for start in range(0, len(images), batch_size):
            batch = augment(images[start : start + batch_size], gen)
            for name, m in models.items():
                out[name].append(m(batch))
    return {
        name: torch.cat(parts) if parts else torch.empty(0, models[name].embedding_dim)
        for name, parts in out.items()
    }


def fit(
    params: Iterable[torch.nn.Parameter],
    n: int,
    s: FitSettings,
    loss_fn: Callable[[torch.Tensor, torch.Generator], torch.Tensor],
    desc: str,
    modules: Iterable[torch.nn.Module],
    progress: bool = True,
) -> None:
    """Minimise ``loss_fn`` over ``n`` samples: AdamW with a one-cycle schedule over shuffled
    mini-batches, ``modules`` in train mode meanwhile and in eval mode after.

    ``loss_fn(idx, gen)`` is the loss of the samples ``idx``; ``gen`` is the loop's generator,
    for augmentation drawn in step with the batches. ``s.seed`` seeds it and the global RNGs
    (dropout), so a run repeats exactly. A last batch of one sample is skipped (batch norm).
    ``desc`` names the fit in errors and on its progress bar (shown if ``progress``).
    """
    if n < 2:
        raise DataError(f"{desc}: {n} training samples; training needs at least 2")
    if s.lr is None:
        raise ValueError(f"{desc}: learning rate unset (TrainSettings.for_architecture sets it)")
    gen = seed_everything(s.seed)
    opt = torch.optim.AdamW(params, lr=s.lr, weight_decay=s.weight_decay)
    batches, epochs = math.ceil(n / s.batch_size), planned_epochs(s, n)
    total = max(3, epochs * (batches + s.spare_steps))
    sched = torch.optim.lr_scheduler.OneCycleLR(  # a warm-up of one step divided by zero
        opt, max_lr=s.lr, total_steps=total, pct_start=max(s.warmup, 1.5 / total)
    )
    modules = list(modules)
    for m in modules:
        m.train()
    quiet = {} if progress else {"disable": True}  # else TQDM_DISABLE still applies
    with tqdm(total=epochs * batches, desc=desc, leave=False, unit="batch", **quiet) as bar:
        for _ in range(epochs):
            order = torch.randperm(n, generator=gen)
            for start in range(0, n, s.batch_size):
                idx = order[start : start + s.batch_size]
                if len(idx) < 2:
                    continue
                loss = loss_fn(idx, gen)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                bar.update()
                bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
    for m in modules:
        m.eval()


def _fit_model(
    model: EmbeddingNet,
    images: np.ndarray,
    s: TrainSettings,
    classes: int,
    extra_params: list[torch.nn.Parameter],
    loss_fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    desc: str,
    progress: bool,
) -> EmbeddingNet:
    """:func:`fit` an embedding model on random views (``s.augment``) of uint8 NHWC images of
    ``classes`` classes (the step budget follows them); ``loss_fn(embeddings, idx, views)``
    also gets the views themselves (for a teacher)."""
    images = torch.as_tensor(images)
    s = s.for_data(classes, len(images))

    def batch_loss(idx: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        views = s.augment(images[idx], gen)
        return loss_fn(model(views), idx, views)

    fit([*model.parameters(), *extra_params], len(images), s, batch_loss, desc, [model], progress)
    return model


def train_metric(
    model: EmbeddingNet,
    images: np.ndarray,
    labels: np.ndarray,
    s: TrainSettings,
    desc: str = "train",
    progress: bool = True,
) -> EmbeddingNet:
    """Metric learning with a normalised-softmax loss (pytorch-metric-learning)."""
    labels_t = torch.as_tensor(labels, dtype=torch.long)
    loss = NormalizedSoftmaxLoss(int(labels_t.max()) + 1, model.embedding_dim, s.temperature)
    return _fit_model(
        model,
        images,
        s,
        len(labels_t.unique()),
        list(loss.parameters()),
        lambda emb, idx, _: loss(emb, labels_t[idx]),
        desc,
        progress,
    )


def train_distilled(
    model: EmbeddingNet,
    images: np.ndarray,
    teacher: torch.nn.Module,
    s: TrainSettings,
    classes: int,
    desc: str = "distill",
    progress: bool = True,
) -> EmbeddingNet:
    """Knowledge distillation: regress the frozen teacher's embedding of the same random view
    (L2 between normalised embeddings), with the query model's budget (``s`` on images of
    ``classes`` classes) and augmentation."""
    dim = getattr(teacher, "embedding_dim", None)
    if dim != model.embedding_dim:
        raise ValueError(
            f"the distilled model's embedding dim {model.embedding_dim} must equal the "
            f"teacher's {dim}"
        )
    teacher.eval()

    def loss_fn(emb, idx, views):
        with torch.no_grad():
            target = teacher(views)
        return (emb - target).pow(2).sum(dim=1).mean()

    return _fit_model(model, images, s, classes, [], loss_fn, desc, progress)
