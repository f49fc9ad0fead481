"""Training of embedding models: metric learning for gallery and query models, and the
knowledge-distillation baseline (a query model regressing one gallery model's embedding)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
from pytorch_metric_learning.losses import NormalizedSoftmaxLoss
from tqdm.auto import tqdm

from gallery_builder.models import EmbeddingNet

__all__ = ["TrainSettings", "train_metric", "train_distilled", "embed", "seed_everything"]


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


def _run(
    model: EmbeddingNet,
    images: torch.Tensor,
    s: TrainSettings,
    extra_params: list,
    loss_fn,
    desc: str,
) -> EmbeddingNet:
    """Shared loop: AdamW + one-cycle schedule over shuffled mini-batches, random mirroring."""
    gen = seed_everything(s.seed)
    params = list(model.parameters()) + extra_params
    opt = torch.optim.AdamW(params, lr=s.lr, weight_decay=s.weight_decay)
    steps_per_epoch = math.ceil(len(images) / s.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=s.lr, total_steps=s.epochs * steps_per_epoch, pct_start=0.15
    )
    model.train()
    bar = tqdm(total=s.epochs * steps_per_epoch, desc=desc, leave=False, unit="batch")
    for _ in range(s.epochs):
        order = torch.randperm(len(images), generator=gen)
        for start in range(0, len(images), s.batch_size):
            idx = order[start : start + s.batch_size]
            if len(idx) < 2:
                continue
            flip = torch.rand(len(idx), generator=gen) < 0.5 if s.flip else None
            batch = images[idx]
            if flip is not None:
                batch = torch.where(flip[:, None, None, None], batch.flip(2), batch)
            loss = loss_fn(model(batch), idx, flip)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    bar.close()
    return model.eval()


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
    return _run(
        model,
        torch.as_tensor(images),
        s,
        list(loss.parameters()),
        lambda emb, idx, _: loss(emb, labels_t[idx]),
        desc,
    )


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

    return _run(model, torch.as_tensor(images), s, [], loss_fn, desc)
