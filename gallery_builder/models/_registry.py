"""Model registry and the embedding network every architecture is wrapped in.

Adding an architecture is one decorated constructor (as in timm): ``@register_model("name")``
on a function ``(input_spec, embedding_dim, **kwargs) -> EmbeddingNet``.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from query_sdk.spec import InputSpec

__all__ = [
    "EmbeddingNet",
    "register_model",
    "create_model",
    "list_models",
    "model_role",
    "native_input_spec",
    "recommended_lr",
]

_MODELS: dict[str, tuple[Callable[..., EmbeddingNet], str, InputSpec | None, float]] = {}
#: The learning rate an architecture trains with unless told otherwise: the CNNs learn at 1e-2
#: on small images (on 6 images per class their loss did not take off at 3e-3).
DEFAULT_LR = 1e-2


class EmbeddingNet(nn.Module):
    """Image -> L2-normalised embedding, preprocessing included.

    Takes images as the app has them: uint8 (or float in 0..255) NHWC tensors matching
    ``input_spec``. Scaling, mean/std normalisation and the final L2 normalisation are part of
    the module, so an exported graph needs no maths around it.
    """

    def __init__(
        self,
        backbone: nn.Module,
        feature_dim: int,
        embedding_dim: int | None,
        input_spec: InputSpec,
    ) -> None:
        """``embedding_dim=None`` keeps the backbone's features (no projection layer)."""
        super().__init__()
        self.input_spec = input_spec
        self.embedding_dim = embedding_dim or feature_dim
        shape = (1, input_spec.channels, 1, 1)
        self.register_buffer("mean", torch.tensor(input_spec.mean).view(shape), persistent=False)
        self.register_buffer("std", torch.tensor(input_spec.std).view(shape), persistent=False)
        self.backbone = backbone
        self.embed = nn.Linear(feature_dim, embedding_dim) if embedding_dim else nn.Identity()

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 NHWC images -> normalised float NCHW."""
        x = images.permute(0, 3, 1, 2).float() / 255.0
        return (x - self.mean) / self.std

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.embed(self.backbone(self.preprocess(images))), dim=-1)


def register_model(
    name: str, role: str, native_input: InputSpec | None = None, lr: float = DEFAULT_LR
) -> Callable:
    """Decorator filing an architecture constructor under ``name``; role is gallery or query.

    ``native_input`` names the only input an architecture takes (e.g. 224x224 RGB); None means
    it adapts to any input spec. ``lr`` is the learning rate it trains with by default.
    """
    if role not in ("gallery", "query"):
        raise ValueError(f"role must be 'gallery' or 'query', got {role!r}")

    def wrap(fn: Callable[..., EmbeddingNet]) -> Callable[..., EmbeddingNet]:
        if name in _MODELS:
            raise ValueError(f"architecture {name!r} is already registered")
        _MODELS[name] = (fn, role, native_input, lr)
        return fn

    return wrap


def list_models(pattern: str = "*", role: str | None = None) -> list[str]:
    """Registered architecture names matching a glob pattern (and role, if given)."""
    return sorted(
        n for n, (_, r, *_) in _MODELS.items() if fnmatch.fnmatch(n, pattern) and role in (None, r)
    )


def model_role(name: str) -> str:
    _check_known(name)
    return _MODELS[name][1]


def native_input_spec(name: str) -> InputSpec | None:
    """The fixed input an architecture was registered with, or None if it takes any."""
    _check_known(name)
    return _MODELS[name][2]


def recommended_lr(name: str) -> float:
    """The learning rate an architecture was registered to train with."""
    _check_known(name)
    return _MODELS[name][3]


def create_model(
    name: str, input_spec: InputSpec, embedding_dim: int = 128, **kwargs
) -> EmbeddingNet:
    """Build a registered architecture for ``input_spec`` with fresh weights."""
    _check_known(name)
    return _MODELS[name][0](input_spec, embedding_dim, **kwargs)


def _check_known(name: str) -> None:
    if name not in _MODELS:
        raise ValueError(f"unknown architecture {name!r}; known: {', '.join(list_models())}")
