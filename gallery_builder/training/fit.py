"""The one fit loop, and the embedding models' training with it: metric learning for gallery
and query models, and the knowledge-distillation baseline (a query model regressing one gallery
model's embedding). The transformation heads (:mod:`gallery_builder.training.heads`) train with
the same loop."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import ClassVar, Protocol

import numpy as np
import torch
from pytorch_metric_learning.losses import NormalizedSoftmaxLoss
from tqdm.auto import tqdm

from gallery_builder.models import EmbeddingNet
from query_sdk.errors import DataError

__all__ = [
    "FitSettings",
    "TrainSettings",
    "check_settings",
    "fit",
    "train_metric",
    "train_distilled",
    "embed",
    "seed_everything",
]


class FitSettings(Protocol):
    """What :func:`fit` reads from a recipe's settings (:class:`TrainSettings`, ``HeadSettings``).

    ``warmup`` is the share of the one-cycle schedule spent rising to ``lr``; the schedule is
    sized for ``spare_steps`` steps per epoch beyond the batches. Both are class constants of
    a recipe: its published figures were measured with them.
    """

    epochs: int
    batch_size: int
    lr: float
    weight_decay: float
    seed: int
    warmup: ClassVar[float]
    spare_steps: ClassVar[int]


def check_settings(s: FitSettings) -> None:
    """Raise ValueError naming the setting when :func:`fit` could not train with it."""
    if s.epochs < 1:
        raise ValueError(f"epochs must be at least 1, got {s.epochs}")
    if s.batch_size < 2:
        raise ValueError(
            f"batch size must be at least 2 (a batch of one sample is skipped), got {s.batch_size}"
        )
    if not s.lr > 0:
        raise ValueError(f"learning rate must be positive, got {s.lr}")


@dataclass
class TrainSettings:
    """Optimisation settings; defaults suit a 2-core CPU and 28x28 images."""

    epochs: int = 3
    batch_size: int = 256
    lr: float = 3e-3
    weight_decay: float = 5e-4
    temperature: float = 0.05
    flip: bool = True
    seed: int = 0
    warmup: ClassVar[float] = 0.15
    spare_steps: ClassVar[int] = 0

    def __post_init__(self) -> None:
        check_settings(self)

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
    flip: bool = False,
    progress: str | None = None,
) -> torch.Tensor:
    """Embeddings of uint8 NHWC images (optionally mirrored), in eval mode."""
    model.eval()
    images = torch.as_tensor(images)
    out = []
    quiet = {"disable": True} if progress is None else {}  # else TQDM_DISABLE still applies
    for start in tqdm(range(0, len(images), batch_size), desc=progress, leave=False, **quiet):
        batch = images[start : start + batch_size]
        out.append(model(batch.flip(2) if flip else batch))
    return torch.cat(out) if out else torch.empty(0, getattr(model, "embedding_dim", 0))


def fit(
    params: Iterable[torch.nn.Parameter],
    n: int,
    s: FitSettings,
    loss_fn: Callable[[torch.Tensor, torch.Generator], torch.Tensor],
    desc: str,
    modules: Iterable[torch.nn.Module],
) -> None:
    """Minimise ``loss_fn`` over ``n`` samples: AdamW with a one-cycle schedule over shuffled
    mini-batches, ``modules`` in train mode meanwhile and in eval mode after.

    ``loss_fn(idx, gen)`` is the loss of the samples ``idx``; ``gen`` is the loop's generator,
    for augmentation drawn in step with the batches. ``s.seed`` seeds it and the global RNGs
    (dropout), so a run repeats exactly. A last batch of one sample is skipped (batch norm).
    """
    if n < 2:
        raise DataError(f"{desc}: {n} training samples; training needs at least 2")
    gen = seed_everything(s.seed)
    opt = torch.optim.AdamW(params, lr=s.lr, weight_decay=s.weight_decay)
    batches = math.ceil(n / s.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt,
        max_lr=s.lr,
        total_steps=s.epochs * (batches + s.spare_steps),
        pct_start=s.warmup,
    )
    modules = list(modules)
    for m in modules:
        m.train()
    with tqdm(total=s.epochs * batches, desc=desc, leave=False, unit="batch") as bar:
        for _ in range(s.epochs):
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
    extra_params: list[torch.nn.Parameter],
    loss_fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor],
    desc: str,
) -> EmbeddingNet:
    """:func:`fit` an embedding model on uint8 NHWC images, each mirrored with probability 1/2
    when ``s.flip``; ``loss_fn(embeddings, idx, flip)`` sees which were (``flip`` is None
    without mirroring)."""
    images = torch.as_tensor(images)

    def batch_loss(idx: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        batch, flip = images[idx], None
        if s.flip:
            flip = torch.rand(len(idx), generator=gen) < 0.5
            batch = torch.where(flip[:, None, None, None], batch.flip(2), batch)
        return loss_fn(model(batch), idx, flip)

    fit([*model.parameters(), *extra_params], len(images), s, batch_loss, desc, [model])
    return model


def train_metric(
    model: EmbeddingNet,
    images: np.ndarray,
    labels: np.ndarray,
    s: TrainSettings,
    desc: str = "train",
) -> EmbeddingNet:
    """Metric learning with a normalised-softmax loss (pytorch-metric-learning)."""
    labels_t = torch.as_tensor(labels, dtype=torch.long)
    loss = NormalizedSoftmaxLoss(int(labels_t.max()) + 1, model.embedding_dim, s.temperature)
    params = list(loss.parameters())
    return _fit_model(model, images, s, params, lambda emb, idx, _: loss(emb, labels_t[idx]), desc)


def train_distilled(
    model: EmbeddingNet,
    images: np.ndarray,
    teacher: torch.Tensor,
    teacher_flipped: torch.Tensor,
    s: TrainSettings,
    desc: str = "distill",
) -> EmbeddingNet:
    """Knowledge distillation: regress the teacher's normalised embedding (cosine/L2 loss).

    ``teacher`` and ``teacher_flipped`` hold the teacher's embeddings of the images and of
    their mirror images, so mirroring stays a valid augmentation.
    """
    if teacher.shape[1] != model.embedding_dim:
        raise ValueError(
            f"the distilled model's embedding dim {model.embedding_dim} must equal the "
            f"teacher's {teacher.shape[1]}"
        )

    def loss_fn(emb, idx, flip):
        target = (
            teacher[idx]
            if flip is None
            else torch.where(flip[:, None], teacher_flipped[idx], teacher[idx])
        )
        return (emb - target).pow(2).sum(dim=1).mean()

    return _fit_model(model, images, s, [], loss_fn, desc)
