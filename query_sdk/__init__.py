"""The query SDK: what runs at the edge. Torch-free (numpy, hnswlib, one model runtime).

>>> from query_sdk import Searcher                                   # doctest: +SKIP
>>> s = Searcher.open(bundle="bundle/", gallery="gallery/", backend="onnxruntime", threads=1)
>>> s.search("query.png", k=10)                                      # -> [Hit(id, score, ...)]

The on-disk formats are defined here too (``gallery_format``, ``bundle_format``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

__all__ = ["Searcher", "Hit", "Gallery"]

if TYPE_CHECKING:
    from .searcher import Searcher
    from .shards import Gallery, Hit


def __getattr__(name: str):
    # lazy, so that `import query_sdk.spec` (used by the builder) stays light
    if name == "Searcher":
        from .searcher import Searcher

        return Searcher
    if name in ("Hit", "Gallery"):
        from . import shards

        return getattr(shards, name)
    raise AttributeError(f"module 'query_sdk' has no attribute {name!r}")
