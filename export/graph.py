"""The torch modules that get exported: the query graph (image -> vector in the space) and the
gallery heads (raw gallery embedding -> vector in the space).

In ``unified`` mode the query head T_q is fused behind the query model into one module, so an
app runs one model. Preprocessing (uint8 NHWC -> scaled, mean/std-normalised NCHW) and the final
L2 normalisation are inside :class:`EmbeddingNet` already. For export, batch norms that follow a
linear or convolution layer are folded into it (eval-mode arithmetic, not an approximation);
validation always compares with the unfolded checkpoint as loaded.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

from gallery_builder.models import load_model
from gallery_builder.models.checkpoint import CheckpointError
from gallery_builder.models.saving import Trust
from gallery_builder.training.heads import Head, check_gallery_models, check_query_model, load_heads
from query_sdk.spec import InputSpec

from .errors import ExportError, one_line

__all__ = [
    "QueryGraph",
    "ExportSource",
    "load_export_source",
    "load_gallery_model",
    "fold_batch_norms",
    "drop_broadcast_expands",
    "export_program",
    "ModelIO",
    "query_io",
    "head_io",
]


class QueryGraph(nn.Module):
    """uint8 NHWC images -> L2-normalised vectors in the space: Q, then T_q in unified mode."""

    def __init__(self, model: nn.Module, query_head: Head | None) -> None:
        super().__init__()
        self.model = model
        self.query_head = query_head

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.model(images)
        return x if self.query_head is None else self.query_head(x)


@dataclass(frozen=True)
class ModelIO:
    """Names, shapes (-1 = dynamic batch) and input dtype of an exported model."""

    input_name: str
    input_shape: tuple[int, ...]
    input_dtype: str
    output_name: str
    output_shape: tuple[int, ...]

    def example(self, batch: int = 2) -> np.ndarray:
        """A zero batch of the input, for tracing."""
        return np.zeros((batch, *self.input_shape[1:]), dtype=self.input_dtype)


def query_io(spec: InputSpec, dim: int, input_dtype: str = "uint8") -> ModelIO:
    """The query graph's I/O: images (N, H, W, C) -> embedding (N, dim)."""
    return ModelIO("images", (-1, *spec.shape), input_dtype, "embedding", (-1, dim))


def head_io(in_dim: int, dim: int) -> ModelIO:
    """A gallery head's I/O: raw gallery embedding (N, in_dim) float32 -> embedding (N, dim)."""
    return ModelIO("raw_embedding", (-1, in_dim), "float32", "embedding", (-1, dim))


@dataclass
class ExportSource:
    """What one export starts from: the fp32 reference graph, gallery heads, and the identity."""

    graph: QueryGraph  # as loaded (reference for validation)
    heads: dict[str, Head]  # gallery model name -> its head (empty without heads)
    input_spec: InputSpec
    embedding_dim: int
    space_id: str
    mode: str
    query_fingerprint: str
    heads_config: dict | None


def load_export_source(model_dir: Path, heads_dir: Path | None, trust: Trust = ()) -> ExportSource:
    """Load the query checkpoint (and heads) and check they belong together.

    Without heads the space is the query model's own ("to-query", space id = its fingerprint).
    With unified heads T_q is fused behind Q and the space id is the heads'. The gallery-side
    heads come along (by gallery model name) for :func:`load_gallery_model`. ``trust`` names
    the model code that may run (see ``load_model``).
    """
    model, qcfg = load_model(Path(model_dir), trust)
    if qcfg["role"] != "query":
        raise ExportError(f"{model_dir}: a {qcfg['role']!r} model; export takes the query model")
    if heads_dir is None:
        return ExportSource(
            graph=QueryGraph(model, None).eval(),
            heads={},
            heads_config=None,
            input_spec=model.input_spec,
            embedding_dim=model.embedding_dim,
            space_id=qcfg["fingerprint"],
            mode="to-query",
            query_fingerprint=qcfg["fingerprint"],
        )
    heads, hcfg = load_heads(Path(heads_dir))
    try:
        check_query_model(hcfg, qcfg)
    except CheckpointError as exc:
        raise ExportError(f"{heads_dir} and {model_dir} do not belong together: {exc}") from exc
    return ExportSource(
        graph=QueryGraph(model, heads.query).eval(),
        heads={n: heads.gallery[n.replace(".", "_")] for n in heads.names},
        heads_config=hcfg,
        input_spec=model.input_spec,
        embedding_dim=heads.dim,
        space_id=hcfg["space_id"],
        mode=heads.mode,
        query_fingerprint=qcfg["fingerprint"],
    )


def load_gallery_model(
    model_dir: Path, source: ExportSource, trust: Trust = ()
) -> tuple[str, nn.Module]:
    """A gallery model whose head is to be exported: ``(name, model)``; the name is its folder
    name, as in the heads checkpoint. ExportError unless the heads were trained for it."""
    if source.heads_config is None:
        raise ExportError("exporting a gallery head needs --heads (the heads checkpoint)")
    model, config = load_model(Path(model_dir), trust)
    name = Path(model_dir).name
    try:
        check_gallery_models(source.heads_config, {name: config})
    except CheckpointError as exc:
        raise ExportError(f"{model_dir}: {exc}") from exc
    return name, model


def fold_batch_norms(module: nn.Module) -> nn.Module:
    """An eval-mode copy with every BatchNorm that directly follows a Conv2d/Linear inside an
    ``nn.Sequential`` folded into that layer (replaced by Identity)."""
    module = copy.deepcopy(module).eval()
    for seq in [m for m in module.modules() if isinstance(m, nn.Sequential)]:
        for i in range(len(seq) - 1):
            layer, norm = seq[i], seq[i + 1]
            if isinstance(layer, nn.Conv2d) and isinstance(norm, nn.BatchNorm2d):
                seq[i], seq[i + 1] = fuse_conv_bn_eval(layer, norm), nn.Identity()
            elif isinstance(layer, nn.Linear) and isinstance(norm, nn.BatchNorm1d):
                seq[i], seq[i + 1] = fuse_linear_bn_eval(layer, norm), nn.Identity()
    return module


_BROADCASTING = {"div.Tensor", "mul.Tensor", "add.Tensor", "sub.Tensor"}


def drop_broadcast_expands(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Remove ``expand``/``expand_as`` nodes whose users are broadcasting binary ops anyway.

    ``F.normalize`` expands the norm before dividing; with a dynamic batch that leaves a
    stride-0 tensor ExecuTorch refuses. Dividing by the unexpanded (N, 1) norm broadcasts to the
    same numbers. Changes ``gm`` in place and returns it.
    """
    aten = torch.ops.aten
    for node in list(gm.graph.nodes):
        if node.target not in (aten.expand.default, aten.expand_as.default):
            continue
        shape = node.meta["val"].shape
        users = list(node.users)
        if users and all(
            isinstance(u.target, torch._ops.OpOverload)
            and f"{u.target._opname}.{u.target._overloadname}" in _BROADCASTING
            and all(
                a is node or (isinstance(a, torch.fx.Node) and a.meta["val"].shape == shape)
                for a in u.args[:2]
            )
            for u in users
        ):
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm


def export_program(
    module: nn.Module, io: ModelIO, max_batch: int | None = None
) -> torch.export.ExportedProgram:
    """``torch.export`` with a dynamic batch (up to ``max_batch``), broadcast expands dropped."""
    batch = (
        torch.export.Dim("batch", min=1, max=max_batch) if max_batch else torch.export.Dim("batch")
    )
    example = (torch.from_numpy(io.example()),)
    try:
        ep = torch.export.export(module, example, dynamic_shapes=({0: batch},))
    except Exception as exc:  # torch.export names the op / construct it cannot trace
        raise ExportError(f"torch.export failed: {one_line(exc)}") from exc
    drop_broadcast_expands(ep.graph_module)
    return ep
