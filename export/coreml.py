"""Core ML: an ML Program ``.mlpackage`` (iOS 17 / macOS 14), fp32 or fp16 compute precision;
int8 = per-channel symmetric int8 weights (``coremltools.optimize.coreml.linear_quantize_weights``)
on the fp16 program.

Core ML multi-arrays take no uint8 before iOS 26, so the input is float32 holding the pixel
values 0..255 as the app has them (NHWC); scaling, mean/std and L2 normalisation stay inside.
Prediction needs macOS: elsewhere :func:`check_package` validates the saved package instead.
"""

from __future__ import annotations

import platform
import re
from pathlib import Path

import numpy as np
from torch import nn

from .errors import ExportError, UnsupportedOpError
from .graph import ModelIO, export_program

__all__ = [
    "INPUT_DTYPE", "MAX_BATCH", "export_coreml", "run_coreml", "can_predict", "check_package",
]

INPUT_DTYPE = "float32"
MAX_BATCH = 64


def can_predict() -> bool:
    """Core ML predictions run on macOS only."""
    return platform.system() == "Darwin"


def export_coreml(
    module: nn.Module, io: ModelIO, quantization: str, calibration: np.ndarray | None, path: Path
) -> list[str]:
    """Write ``path`` (.mlpackage); returns remarks (compression figures)."""
    import coremltools as ct

    if quantization not in ("fp32", "fp16", "int8"):
        raise ExportError(f"coreml: quantization {quantization!r} is not offered")
    program = export_program(module, io, MAX_BATCH).run_decompositions({})
    shape = ct.Shape(shape=(ct.RangeDim(1, MAX_BATCH, 1), *io.input_shape[1:]))
    try:
        model = ct.convert(
            program,
            inputs=[ct.TensorType(name=io.input_name, shape=shape, dtype=np.float32)],
            outputs=[ct.TensorType(name=io.output_name, dtype=np.float32)],
            convert_to="mlprogram",
            minimum_deployment_target=ct.target.iOS17,
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
        raise ExportError(f"coreml: conversion failed: {exc}") from exc
    if quantization == "int8":
        model = _quantize_weights(model)
    model.save(str(path))
    return check_package(path, io, quantization)


def _quantize_weights(model):
    import coremltools.optimize.coreml as cto

    config = cto.OptimizationConfig(
        global_config=cto.OpLinearQuantizerConfig(
            mode="linear_symmetric", dtype="int8", granularity="per_channel", weight_threshold=1
        )
    )
    return cto.linear_quantize_weights(model, config)


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
    dense, packed = _layer_weights(get_weights_metadata(model, weight_threshold=1))
    want = {"fp32": np.float32, "fp16": np.float16, "int8": np.int8}[quantization]
    have = packed if quantization == "int8" else dense
    wrong = sorted(n for n, d in {**dense, **packed}.items() if d != want)
    if not have or wrong:
        raise ExportError(
            f"{path.name}: layer weights {wrong[:5]} are not {np.dtype(want).name} as asked"
        )
    return [f"{len(have)} layer weight tensors {np.dtype(want).name}"]


def _layer_weights(metadata) -> tuple[dict[str, np.dtype], dict[str, np.dtype]]:
    """Dtypes of the weights that conv/linear/matmul ops read directly, and of the quantized
    data that constexpr (de)quantization ops expand into weights."""
    dense, packed = {}, {}
    for name, w in metadata.items():
        for op in w.child_ops:
            role = {v: k for k, v in op.params_name_mapping.items()}.get(name)
            if op.op_type in ("conv", "linear", "matmul") and role in ("weight", "y"):
                dense[name] = w.val.dtype
            elif op.op_type.startswith("constexpr_") and role in ("quantized_data", "data"):
                packed[name] = w.val.dtype
    return dense, packed


def run_coreml(path: Path, inputs: np.ndarray) -> np.ndarray:
    """Predict with Core ML (macOS only), in batches of up to MAX_BATCH."""
    import coremltools as ct

    model = ct.models.MLModel(str(path))
    (inp,), (out,) = model.get_spec().description.input, model.get_spec().description.output
    return np.concatenate(
        [
            np.asarray(model.predict({inp.name: inputs[i : i + MAX_BATCH]})[out.name])
            for i in range(0, len(inputs), MAX_BATCH)
        ]
    )
