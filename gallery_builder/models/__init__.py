"""Embedding architectures: three gallery families, one light query network and
MobileNetV3-Small (the latency reference), plus checkpoint folders for them and for users' own
backbones (which run code, so they load only when trusted by name: ``load_model(path,
trust=[...])``)."""

from . import mobilenet, mobilenet_v3, resnet, vit, widecnn  # noqa: F401  (registers them)
from ._registry import (
    EmbeddingNet,
    create_model,
    list_models,
    model_role,
    native_input_spec,
    recommended_lr,
    register_model,
)
from .complexity import count_params, mflops
from .saving import (
    import_external,
    import_torchscript,
    load_model,
    registered_identity,
    save_model,
)

__all__ = [
    "EmbeddingNet",
    "create_model",
    "list_models",
    "model_role",
    "native_input_spec",
    "recommended_lr",
    "register_model",
    "count_params",
    "mflops",
    "load_model",
    "save_model",
    "registered_identity",
    "import_external",
    "import_torchscript",
]
