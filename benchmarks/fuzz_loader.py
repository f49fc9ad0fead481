"""Fuzz the gallery loader: manifest + shard index + sidecar, through ``Gallery.open`` and a search.

    python benchmarks/fuzz_loader.py -max_total_time=600      # atheris (libFuzzer flags)
    python benchmarks/fuzz_loader.py --plain 20000            # seeded random mutator, no atheris

An input is one selector byte and the bytes of one file of the seed gallery
(``tests/corpus/base``): 0 = ``manifest.json``, 1 = the ``.hnsw`` index, 2 = the ``.meta.npz``
sidecar. The other two files come from the seed, and for an index or sidecar the manifest is
re-hashed, so that the mutation reaches the structure checks instead of stopping at a
checksum. The gallery is written to a temp folder (tmpfs where there is one), opened with
``Gallery.open`` and searched once. A :class:`~query_sdk.errors.CmceError` is the loader doing
its job; any other exception is a finding (atheris reports it and stops), and so is a crash,
a hang (``-timeout``) or a memory blow-up (``-rss_limit_mb``).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SEED = ROOT / "tests" / "corpus" / "base"
FILES = ("manifest.json", "shard-00000.hnsw", "shard-00000.meta.npz")
SEED_BYTES = [(SEED / name).read_bytes() for name in FILES]

try:
    import atheris
except ImportError:  # the plain mutator below needs no atheris
    atheris = None

if atheris is not None:
    with atheris.instrument_imports(include=["query_sdk"]):
        from query_sdk.errors import CmceError
        from query_sdk.shards import Gallery
else:
    from query_sdk.errors import CmceError
    from query_sdk.shards import Gallery

# one folder per process, named by its pid: libFuzzer ends the process without Python's atexit,
# so each run removes what runs that are gone left behind
_SCRATCH = Path("/dev/shm" if Path("/dev/shm").is_dir() else tempfile.gettempdir())
_TMP = _SCRATCH / f"cmce-fuzz-{os.getpid()}"


def _remove_stale() -> None:
    for folder in _SCRATCH.glob("cmce-fuzz-*"):
        pid = folder.name.removeprefix("cmce-fuzz-").removesuffix("-seeds")
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            shutil.rmtree(folder, ignore_errors=True)


def rehash(manifest: bytes, index: bytes, meta: bytes) -> bytes:
    """The seed manifest with the sizes and sha256 of ``index`` and ``meta``."""
    d = json.loads(manifest)
    files = d["shards"][0]["files"]
    for name, data in ((FILES[1], index), (FILES[2], meta)):
        files[name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    return json.dumps(d).encode()


def test_one_input(data: bytes) -> None:
    if not data:
        return
    files = list(SEED_BYTES)
    which = data[0] % 3
    files[which] = data[1:]
    if which:
        files[0] = rehash(files[0], files[1], files[2])
    for name, content in zip(FILES, files, strict=True):
        (_TMP / name).write_bytes(content)
    try:
        gallery = Gallery.open(_TMP)
        dim = gallery.manifest.dim  # a mutated manifest may name another dim (and no shards)
        gallery.search(np.full((1, dim), dim**-0.5, np.float32), k=5)
    except CmceError:
        pass


def mutate(data: bytes, rng: random.Random) -> bytes:
    """One to four random edits: flip, set, insert, delete bytes, or truncate."""
    b = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op, pos = rng.randrange(5), rng.randrange(len(b) + 1)
        if op == 0 and pos < len(b):
            b[pos] ^= 1 << rng.randrange(8)
        elif op == 1 and pos < len(b):
            b[pos] = rng.choice((0, 1, 0x7F, 0x80, 0xFF, rng.randrange(256)))
        elif op == 2:
            b[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        elif op == 3:
            del b[pos : pos + rng.randint(1, 8)]
        else:
            del b[pos:]
    return bytes(b)


def plain(runs: int, seed: int = 0) -> None:
    """Without atheris: ``runs`` seeded random mutations of the seed files."""
    rng, start = random.Random(seed), time.perf_counter()
    for i in range(runs):
        which = i % 3
        test_one_input(bytes([which]) + mutate(SEED_BYTES[which], rng))
    print(f"Done {runs} runs in {time.perf_counter() - start:.0f} second(s); 0 findings")


def main() -> None:
    _remove_stale()
    _TMP.mkdir()
    if "--plain" in sys.argv:
        plain(int(sys.argv[sys.argv.index("--plain") + 1]))
        return
    if atheris is None:
        sys.exit("atheris is not installed (pip install atheris); or run with --plain N")
    corpus = _TMP.parent / f"{_TMP.name}-seeds"
    corpus.mkdir()
    for which, content in enumerate(SEED_BYTES):
        (corpus / f"seed-{which}").write_bytes(bytes([which]) + content)
    # whole seed files from the start (libFuzzer otherwise grows inputs from a few hundred bytes)
    args = ["-len_control=0", "-max_len=65536", "-timeout=10", "-rss_limit_mb=1024", *sys.argv[1:]]
    atheris.Setup([sys.argv[0], *args, str(corpus)], test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
