"""The one error type of the exporter: bad input or a model a target cannot take."""

from __future__ import annotations

__all__ = ["ExportError", "UnsupportedOpError"]


class ExportError(ValueError):
    """Export cannot go on; the message names the file, value or op and what to do."""


class UnsupportedOpError(ExportError):
    """A target cannot take an op of the graph (never silently replaced by something else)."""

    def __init__(self, target: str, ops: list[str], detail: str = "") -> None:
        self.target, self.ops = target, sorted(set(ops))
        super().__init__(
            f"{target} cannot take op(s) {', '.join(self.ops)}" + (f": {detail}" if detail else "")
        )
