"""ExecuTorch: ``torch.export`` -> XNNPACK-lowered ``.pte``; int8 through PT2E quantization.

int8 is static, per-channel symmetric weights and asymmetric activations
(``XNNPACKQuantizer`` + ``get_symmetric_quantization_config(is_per_channel=True)``), calibrated
on real images. Ops XNNPACK does not take (the uint8 -> float cast of preprocessing, the norm of
the final L2 normalisation) stay in the program and run on ExecuTorch's portable kernels with
the same arithmetic; an op for which the runtime has no kernel is an error naming it.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .errors import ExportError, UnsupportedOpError, one_line
from .graph import ModelIO, export_program

__all__ = ["MAX_BATCH", "export_executorch"]

# Upper bound asked for the dynamic batch (memory is planned for it). The XNNPACK lowering may
# lower it further (a batch equal to a channel count is excluded): the SDK's runtime reads the
# bound the program really has, which the manifest records.
MAX_BATCH = 64


def _quantize(module: nn.Module, io: ModelIO, calibration: np.ndarray) -> nn.Module:
    """PT2E: prepare with the XNNPACK quantizer, calibrate, convert."""
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    quantizer = XNNPACKQuantizer()
    quantizer.set_global(get_symmetric_quantization_config(is_per_channel=True))
    prepared = prepare_pt2e(export_program(module, io, MAX_BATCH).module(), quantizer)
    with torch.no_grad():
        for start in range(0, len(calibration), MAX_BATCH):
            prepared(torch.from_numpy(calibration[start : start + MAX_BATCH]))
    return convert_pt2e(prepared)


def _check_kernels(program, target: str = "executorch") -> None:
    """Every op left outside the delegate needs a kernel in the ExecuTorch runtime."""
    from executorch.runtime import Runtime

    known = Runtime.get().operator_registry.operator_names
    missing = [
        f"{op.name}.{op.overload}" if op.overload else op.name
        for plan in program.executorch_program.execution_plan
        for op in plan.operators
        if (f"{op.name}.{op.overload}" if op.overload else op.name) not in known
    ]
    if missing:
        raise UnsupportedOpError(
            target, missing, "neither XNNPACK nor this ExecuTorch runtime's kernels implement them"
        )


def delegated_ops(program) -> list[str]:
    """Ops that run outside the XNNPACK delegate (portable kernels), for the report."""
    return sorted(
        {
            op.name
            for plan in program.executorch_program.execution_plan
            for op in plan.operators
            if op.name != "executorch_prim::et_view"
        }
    )


def export_executorch(
    module: nn.Module, io: ModelIO, quantization: str, calibration: np.ndarray | None, path: Path
) -> list[str]:
    """Write ``path`` (.pte); returns the ops that run outside XNNPACK (portable kernels)."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    if quantization == "int8":
        if calibration is None:
            raise ExportError("executorch int8 needs calibration images")
        module = _quantize(module, io, calibration)
    elif quantization != "fp32":
        raise ExportError(f"executorch: quantization {quantization!r} is not offered (fp32, int8)")
    ep = export_program(module, io, MAX_BATCH)
    try:
        edge = to_edge_transform_and_lower(ep, partitioner=[XnnpackPartitioner()])
        program = edge.to_executorch()
    except Exception as exc:
        ops = _op_names_in(str(exc))
        if ops:
            raise UnsupportedOpError("executorch", ops, str(exc)) from exc
        raise ExportError(f"executorch: lowering failed: {one_line(exc)}") from exc
    _check_kernels(program)
    Path(path).write_bytes(program.buffer)
    return delegated_ops(program)


def _op_names_in(message: str) -> list[str]:
    """``aten.xxx`` op names an ExecuTorch error message mentions."""
    return re.findall(r"\baten[.:]+[A-Za-z0-9_]+(?:\.[A-Za-z0-9_]+)?", message)
