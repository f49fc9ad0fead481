"""The one error type of the exporter: bad input or a model a target cannot take."""

from __future__ import annotations

from query_sdk.errors import ExportError

__all__ = ["ExportError", "UnsupportedOpError"]


class UnsupportedOpError(ExportError):
    """A target cannot take an op of the graph (never silently replaced by something else)."""

    def __init__(self, target: str, ops: list[str], detail: str = "") -> None:
        ops = set(ops)  # "x" and "x.default" name the same op: keep the longer
        self.target = target
        self.ops = sorted(o for o in ops if not any(p != o and p.startswith(o + ".") for p in ops))
        super().__init__(
            f"{target} cannot take op(s) {', '.join(self.ops)}" + (f": {detail}" if detail else "")
        )
