"""Embedding architectures: three gallery families and one light query network, plus
checkpoint folders for them and for users' own backbones."""

from . import mobilenet, resnet, vit, widecnn  # noqa: F401  (registers the architectures)
from ._registry import EmbeddingNet, create_model, list_models, model_role, register_model
from .complexity import count_params, mflops
from .saving import (
    import_external,
    import_torchscript,
    load_model,
    registered_identity,
    save_model,
)

__all__ = [
    "EmbeddingNet", "create_model", "list_models", "model_role", "register_model",
    "count_params", "mflops", "load_model", "save_model", "registered_identity",
    "import_external", "import_torchscript",
]
