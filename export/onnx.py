"""ONNX: ``torch.onnx.export`` (the torch.export-based exporter, opset 18, dynamic batch); int8 as
static QDQ quantization with ``onnxruntime.quantization`` (its pre-processing first, per-channel
symmetric int8 weights, uint8 activations, calibrated on real images).

Weights are quantized with ``reduce_range`` (7-bit values in int8): onnxruntime's x86 kernels
without VNNI multiply uint8 x int8 with an instruction that saturates 16-bit sums, which cost
the fused int8 graph most of its accuracy (digits model: mean cosine 0.936 -> 0.999 with
reduce_range; Fashion-MNIST demo: 0.9983 -> 0.9996), while the unfused QDQ graph was accurate.

Both files are then stripped of what only debugging needs (intermediate shape annotations,
per-node stack traces and doc strings): a third of a small int8 model's file otherwise.

ORT format (optional): each ONNX file saved again by onnxruntime as ``.ort`` for reduced mobile
builds, with basic graph optimizations only (constant folding, redundant nodes): no fusions
specific to the x86 CPU kernels, so any device and execution provider can take it; plus the
operators config (``ort-required-operators.config``) such a build is made with.
"""

from __future__ import annotations

import contextlib
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process
from torch import nn

from .errors import ExportError, UnsupportedOpError, one_line
from .graph import ModelIO, export_program

__all__ = ["OPSET", "export_onnx", "export_ort", "write_required_operators"]

OPSET = 18
_BATCH = 256


def _export_fp32(module: nn.Module, io: ModelIO, path: Path) -> None:
    program = export_program(module, io)
    try:
        torch.onnx.export(
            program,
            None,
            str(path),
            input_names=[io.input_name],
            output_names=[io.output_name],
            opset_version=OPSET,
            dynamo=True,
            external_data=False,
            verbose=False,
        )
    except Exception as exc:
        ops = re.findall(r"\b(?:aten|prims)[.:]+[A-Za-z0-9_]+(?:\.[A-Za-z0-9_]+)?", str(exc))
        if ops:
            raise UnsupportedOpError("onnx", ops, "no ONNX translation for it") from exc
        raise ExportError(f"onnx: torch.onnx.export failed: {one_line(exc)}") from exc


class _Reader(CalibrationDataReader):
    """onnxruntime calibration reader over an image array, in batches."""

    def __init__(self, name: str, images: np.ndarray) -> None:
        self._batches: Iterator[dict[str, np.ndarray]] = (
            {name: images[i : i + _BATCH]} for i in range(0, len(images), _BATCH)
        )

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)


def _quantize(fp32: Path, io: ModelIO, calibration: np.ndarray, path: Path) -> list[str]:
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        prepped = Path(tmp) / "prepped.onnx"
        quant_pre_process(str(fp32), str(prepped), skip_symbolic_shape=True)
        quantize_static(
            str(prepped),
            str(path),
            _Reader(io.input_name, calibration),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            extra_options={"WeightSymmetric": True, "ActivationSymmetric": False},
            reduce_range=True,
        )
    return ["int8 weights use 7 bits (reduce_range): see the module docstring"]


def export_onnx(
    module: nn.Module, io: ModelIO, quantization: str, calibration: np.ndarray | None, path: Path
) -> list[str]:
    """Write ``path`` (.onnx) in the given quantization ("fp32" or "int8"); returns remarks."""
    path = Path(path)
    notes: list[str] = []
    if quantization == "fp32":
        _export_fp32(module, io, path)
    elif quantization == "int8":
        if calibration is None:
            raise ExportError("onnx int8 needs calibration images")
        with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
            fp32 = Path(tmp) / "fp32.onnx"
            _export_fp32(module, io, fp32)
            notes = _quantize(fp32, io, calibration, path)
    else:
        raise ExportError(f"onnx: quantization {quantization!r} is not offered (fp32, int8)")
    _strip_debug_info(path)
    _session(path)  # every op must have an onnxruntime kernel
    return notes


def _strip_debug_info(path: Path) -> None:
    """Rewrite ``path`` without value_info, node metadata and doc strings (not needed to run)."""
    model = onnx.load(str(path))
    del model.graph.value_info[:]
    for node in model.graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
    model.graph.doc_string = ""
    onnx.save(model, str(path))


def export_ort(onnx_path: Path, path: Path) -> list[str]:
    """Write ``path`` (.ort): the ONNX file in ORT format (see the module docstring)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(path)
    options.add_session_config_entry("session.save_model_format", "ORT")
    try:
        ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types
        raise ExportError(
            f"{path.name}: onnxruntime could not write ORT format: {one_line(exc)}"
        ) from exc
    _session(path)
    return [f"ORT format of {Path(onnx_path).name}, basic graph optimizations"]


def write_required_operators(folder: Path, files: list[str], name: str) -> None:
    """Write ``folder/name``: the operators of the ``.ort`` ``files`` (in ``folder``), the
    config a reduced ORT build takes (``build.py --include_ops_by_config``)."""
    from onnxruntime.tools.ort_format_model import create_config_from_models

    with contextlib.chdir(folder):  # the config names the models by their relative paths
        create_config_from_models([Path(f) for f in files], Path(name), enable_type_reduction=False)


def _session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # NOT_IMPLEMENTED: Could not find an implementation for X(n) ...
        ops = re.findall(r"implementation for (\w+)\(", str(exc))
        if ops:
            raise UnsupportedOpError("onnx (onnxruntime CPU)", ops, str(exc)) from exc
        raise ExportError(f"{path.name}: onnxruntime cannot load it: {one_line(exc)}") from exc
