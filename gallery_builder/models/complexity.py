"""Parameter and FLOP counts, so reports show how light the query side is."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from query_sdk.spec import InputSpec


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def mflops(model: nn.Module, input_spec: InputSpec) -> float:
    """Forward FLOPs (multiply and add counted separately) for one image, in millions."""
    x = torch.zeros(1, *input_spec.shape, dtype=torch.uint8)
    was_training = model.training
    model.eval()
    # The fused inference path of nn.TransformerEncoderLayer hides its matmuls from the counter.
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    model.train(was_training)
    return counter.get_total_flops() / 1e6
