"""The exporter's errors: bad input or a model a target cannot take, each one line.

Messages of the converters (torch.onnx, ExecuTorch, coremltools, onnxruntime) run to many lines;
:func:`one_line` keeps the first, and the full message stays on the chained exception
(``CMCE_DEBUG=1`` shows it with the traceback).
"""

from __future__ import annotations

from query_sdk.errors import ExportError

__all__ = ["ExportError", "UnsupportedOpError", "one_line"]

_MAX_CHARS = 300


def one_line(exc: BaseException | str) -> str:
    """The first non-empty line of an exception's message, at most 300 characters."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = lines[0] if lines else type(exc).__name__
    more = len(lines) > 1 or len(text) > _MAX_CHARS
    return text[:_MAX_CHARS] + (" ... (CMCE_DEBUG=1 shows all)" if more else "")


class UnsupportedOpError(ExportError):
    """A target cannot take an op of the graph (never silently replaced by something else)."""

    def __init__(self, target: str, ops: list[str], detail: str = "") -> None:
        ops = set(ops)  # "x" and "x.default" name the same op: keep the longer
        self.target = target
        self.ops = sorted(o for o in ops if not any(p != o and p.startswith(o + ".") for p in ops))
        super().__init__(
            f"{target} cannot take op(s) {', '.join(self.ops)}"
            + (f": {one_line(detail)}" if detail else "")
        )
