"""Core ML: an ML Program ``.mlpackage`` for a minimum OS (``deployment_target``, default iOS 17
/ macOS 14), fp32 or fp16 compute precision; on the fp16 program, int8 = per-channel symmetric
int8 weights (``coremltools.optimize.coreml.linear_quantize_weights``) and pal6/pal4 = each
weight tensor as a 64/16-entry fp16 look-up table found by k-means
(``palettize_weights``, per tensor, data-free).

Core ML multi-arrays take no uint8 before iOS 26, so the input is float32 holding the pixel
values 0..255 as the app has them (NHWC); scaling, mean/std and L2 normalisation stay inside.
Prediction needs macOS: elsewhere :func:`check_package` validates the saved package instead.
"""

from __future__ import annotations

import math
import platform
import re
from pathlib import Path

import numpy as np
from torch import nn

from query_sdk.bundle_format import COREML_DEPLOYMENT_TARGETS

from .errors import ExportError, UnsupportedOpError, one_line
from .graph import ModelIO, export_program

__all__ = [
    "INPUT_DTYPE",
    "MAX_BATCH",
    "QUANTIZATIONS",
    "export_coreml",
    "can_predict",
    "check_package",
]

INPUT_DTYPE = "float32"
MAX_BATCH = 64
QUANTIZATIONS = ("fp32", "fp16", "int8", "pal6", "pal4")
DEFAULT_DEPLOYMENT_TARGET = "iOS17"


def can_predict() -> bool:
    """Core ML predictions run on macOS only."""
    return platform.system() == "Darwin"


def export_coreml(
    module: nn.Module,
    io: ModelIO,
    quantization: str,
    calibration: np.ndarray | None,
    path: Path,
    deployment_target: str = DEFAULT_DEPLOYMENT_TARGET,
) -> list[str]:
    """Write ``path`` (.mlpackage) for ``deployment_target`` (one of the bundle format's
    COREML_DEPLOYMENT_TARGETS); returns remarks (compression figures)."""
    import coremltools as ct

    if quantization not in QUANTIZATIONS:
        raise ExportError(
            f"coreml: quantization {quantization!r} is not offered ({', '.join(QUANTIZATIONS)})"
        )
    if deployment_target not in COREML_DEPLOYMENT_TARGETS:
        raise ExportError(
            f"coreml: deployment target {deployment_target!r} is not offered "
            f"({', '.join(COREML_DEPLOYMENT_TARGETS)})"
        )
    program = export_program(module, io, MAX_BATCH).run_decompositions({})
    shape = ct.Shape(shape=(ct.RangeDim(1, MAX_BATCH, 1), *io.input_shape[1:]))
    try:
        model = ct.convert(
            program,
            inputs=[ct.TensorType(name=io.input_name, shape=shape, dtype=np.float32)],
            outputs=[ct.TensorType(name=io.output_name, dtype=np.float32)],
            convert_to="mlprogram",
            minimum_deployment_target=getattr(ct.target, deployment_target),
            compute_precision=ct.precision.FLOAT32
            if quantization == "fp32"
            else ct.precision.FLOAT16,
            skip_model_load=not can_predict(),
        )
    except Exception as exc:  # "Unsupported fx node x" / "convert function for op 'x' not ..."
        ops = re.findall(r"for op '([^']+)' not implemented|Unsupported fx node (\w+)", str(exc))
        ops = [a or b for a, b in ops]
        if ops:
            raise UnsupportedOpError("coreml", ops, str(exc)) from exc
        raise ExportError(f"coreml: conversion failed: {one_line(exc)}") from exc
    if quantization not in ("fp32", "fp16"):
        model = _compress_weights(model, quantization)
    model.save(str(path))
    return check_package(path, io, quantization)


def _compress_weights(model, quantization: str):
    """int8: linear per-channel symmetric; pal<n>: a 2**n-entry k-means palette per tensor."""
    import coremltools.optimize.coreml as cto

    if quantization == "int8":
        op_config = cto.OpLinearQuantizerConfig(
            mode="linear_symmetric", dtype="int8", granularity="per_channel", weight_threshold=1
        )
        return cto.linear_quantize_weights(model, cto.OptimizationConfig(global_config=op_config))
    op_config = cto.OpPalettizerConfig(
        mode="kmeans", nbits=int(quantization[3:]), granularity="per_tensor", weight_threshold=1
    )
    return cto.palettize_weights(model, cto.OptimizationConfig(global_config=op_config))


def check_package(path: Path, io: ModelIO, quantization: str) -> list[str]:
    """Validate a saved package without running it: it loads as a spec, names/shapes/types
    match ``io``, and weights are compressed as asked. Returns remarks; ExportError if not."""
    import coremltools as ct
    from coremltools.optimize.coreml import get_weights_metadata

    model = ct.models.MLModel(str(path), skip_model_load=True)
    spec = model.get_spec()
    (inp,), (out,) = spec.description.input, spec.description.output
    multi = ct.proto.FeatureTypes_pb2.ArrayFeatureType
    if inp.name != io.input_name or out.name != io.output_name:
        raise ExportError(
            f"{path.name}: I/O names {inp.name!r} -> {out.name!r}, expected "
            f"{io.input_name!r} -> {io.output_name!r}"
        )
    if inp.type.multiArrayType.dataType != multi.FLOAT32:
        raise ExportError(f"{path.name}: input type is not float32")
    if out.type.multiArrayType.dataType != multi.FLOAT32:
        raise ExportError(f"{path.name}: output type is not float32")
    ranges = inp.type.multiArrayType.shapeRange.sizeRanges
    got = [r.upperBound if r.lowerBound == r.upperBound else -1 for r in ranges]
    if got != list(io.input_shape):
        raise ExportError(f"{path.name}: input shape {got}, expected {list(io.input_shape)}")
    stored = _layer_weights(get_weights_metadata(model, weight_threshold=1))
    wrong = sorted(f"{n} ({kind})" for n, kind in stored.items() if kind != quantization)
    if not stored or wrong:
        raise ExportError(f"{path.name}: layer weights {wrong[:5]} are not {quantization} as asked")
    return [f"{len(stored)} layer weight tensors {quantization}"]


def _layer_weights(metadata) -> dict[str, str]:
    """How each layer weight is stored, in quantization names: the dtype of a weight that a
    conv/linear/matmul op reads directly ("fp32", "fp16"), of the data a constexpr op
    dequantizes ("int8"), or "pal<n>" for a look-up table of 2**n entries (iOS16/17: shape
    (2**n,); iOS18: (..., 2**n, 1))."""
    names = {np.dtype(np.float32): "fp32", np.dtype(np.float16): "fp16", np.dtype(np.int8): "int8"}
    stored = {}
    for name, w in metadata.items():
        for op in w.child_ops:
            role = {v: k for k, v in op.params_name_mapping.items()}.get(name)
            dense = op.op_type in ("conv", "linear", "matmul") and role in ("weight", "y")
            packed = op.op_type.startswith("constexpr_") and role in ("quantized_data", "data")
            if dense or packed:
                stored[name] = names.get(w.val.dtype, w.val.dtype.name)
            elif op.op_type == "constexpr_lut_to_dense" and role == "lut":
                entries = w.val.shape[0] if w.val.ndim == 1 else w.val.shape[-2]
                stored[name] = f"pal{math.log2(entries):g}"
    return stored
