"""Open gallery folders with ``Gallery.open`` and search them; one JSON line per folder.

    python tests/corpus/open_and_search.py FOLDER...

Meant to run in a subprocess, so that a loader that crashes natively on a crafted file kills
this process, not its caller: the caller sees the signal and which folder was last started.
Each line is ``{"folder", "result": "refused", "error", "bases", "exit_code", "message"}`` for
a :class:`~query_sdk.errors.CmceError`, or ``{"folder", "result": "ok", "count", "hits",
"labels"}`` after 8 seeded queries (``hits``: hits per query; ``labels``: every label
returned); both with ``seconds`` and the process's peak memory so far, ``maxrss_kb``. Any
other exception escapes with its traceback (a bug is a bug).
"""

from __future__ import annotations

import json
import resource
import sys
import time

import numpy as np

from query_sdk.errors import CmceError
from query_sdk.shards import Gallery


def open_and_search(folder: str) -> dict:
    try:
        gallery = Gallery.open(folder)
        rng = np.random.default_rng(0)
        queries = rng.standard_normal((8, gallery.manifest.dim)).astype(np.float32)
        queries /= np.linalg.norm(queries, axis=1, keepdims=True)
        k = max(1, min(10, gallery.count))
        hits = gallery.search(queries, k=k)
        labels, _ = gallery.search_labels(queries, k=k)
    except CmceError as e:
        return {
            "result": "refused",
            "error": type(e).__name__,
            "bases": [c.__name__ for c in type(e).__mro__],
            "exit_code": e.exit_code,
            "message": str(e),
        }
    return {
        "result": "ok",
        "count": gallery.count,
        "hits": [len(row) for row in hits],
        "labels": sorted(set(labels[labels >= 0].tolist())),
    }


if __name__ == "__main__":
    for folder in sys.argv[1:]:
        print(json.dumps({"folder": folder, "started": True}), flush=True)
        start = time.perf_counter()
        result = open_and_search(folder)
        result["seconds"] = time.perf_counter() - start
        result["maxrss_kb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(json.dumps({"folder": folder, **result}), flush=True)
