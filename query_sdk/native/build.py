"""Build ``hnsw_query`` (the native shard-format check) with g++ and the stock hnswlib headers.

The headers come from the hnswlib source distribution on PyPI, the same version as the
installed Python hnswlib, fetched once with ``pip download`` into the cache
(``$CMCE_CACHE``, default ``~/.cache/cmce``; ``$CMCE_HNSWLIB_SDIST`` may point at a local
``hnswlib-<version>.tar.gz`` instead). They are never committed.
Flags match how pip builds hnswlib on Linux (``-O3 -march=native``), so both sides compute
distances with the same SIMD code.

Usage: ``python -m query_sdk.native.build`` prints the path of the built program.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from importlib.metadata import version
from pathlib import Path

__all__ = ["NativeBuildError", "SOURCE", "compiler", "hnswlib_headers", "build"]

SOURCE = Path(__file__).with_name("hnsw_query.cpp")
FLAGS = ("-O3", "-march=native", "-std=c++14")
_HEADER = re.compile(r"^hnswlib-[^/]+/hnswlib/([A-Za-z0-9_]+\.h)$")


class NativeBuildError(RuntimeError):
    """No compiler, no hnswlib sources, or the build failed; the message says which."""


def _cache() -> Path:
    return Path(os.environ.get("CMCE_CACHE", Path.home() / ".cache" / "cmce")).expanduser()


def compiler() -> str | None:
    """The C++ compiler to use (``$CXX`` or g++), or None if there is none."""
    return shutil.which(os.environ.get("CXX", "g++"))


def _download_sdist(hnswlib_version: str, dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--no-binary",
        "hnswlib",
        "--disable-pip-version-check",
        "-q",
        "-d",
        str(dest),
        f"hnswlib=={hnswlib_version}",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(dest.glob(f"hnswlib-{hnswlib_version}.tar.gz"))
    if done.returncode or not found:
        raise NativeBuildError(
            f"could not download the hnswlib {hnswlib_version} source "
            f"distribution from PyPI ({' '.join(cmd)}):\n{done.stderr[-2000:]}"
            "\nSet CMCE_HNSWLIB_SDIST to a local hnswlib-<version>.tar.gz."
        )
    return found[0]


def hnswlib_headers() -> Path:
    """An include folder holding ``hnswlib/*.h`` of the installed hnswlib version."""
    hnswlib_version = version("hnswlib")
    root = _cache() / f"hnswlib-{hnswlib_version}"
    include = root / "include"
    if (include / "hnswlib" / "hnswlib.h").is_file():
        return include
    sdist = os.environ.get("CMCE_HNSWLIB_SDIST")
    archive = Path(sdist) if sdist else _download_sdist(hnswlib_version, root / "sdist")
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".include-", dir=root))
    try:
        (staging / "hnswlib").mkdir()
        with tarfile.open(archive, "r:gz") as tar:
            for member in tar.getmembers():  # copy the headers only, by name: nothing escapes
                match = _HEADER.match(member.name)
                if match and member.isfile():
                    data = tar.extractfile(member).read()
                    (staging / "hnswlib" / match.group(1)).write_bytes(data)
        if not (staging / "hnswlib" / "hnswlib.h").is_file():
            raise NativeBuildError(f"{archive}: no hnswlib/hnswlib.h inside")
        shutil.rmtree(include, ignore_errors=True)
        os.replace(staging, include)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return include


def build(out: Path | None = None) -> Path:
    """Compile ``hnsw_query`` (cached by source, headers and flags); return its path."""
    cxx = compiler()
    if cxx is None:
        raise NativeBuildError(
            f"no C++ compiler found ({os.environ.get('CXX', 'g++')}); install g++ or set CXX"
        )
    include = hnswlib_headers()
    key = hashlib.sha256(SOURCE.read_bytes() + str(include).encode() + " ".join(FLAGS).encode())
    out = Path(out) if out else _cache() / "bin" / f"hnsw_query-{key.hexdigest()[:12]}"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    cmd = [cxx, *FLAGS, "-I", str(include), str(SOURCE), "-o", str(tmp)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise NativeBuildError(f"build failed: {' '.join(cmd)}\n{done.stderr[-4000:]}")
    os.replace(tmp, out)
    return out


if __name__ == "__main__":
    try:
        print(build(Path(sys.argv[1]) if len(sys.argv) > 1 else None))
    except NativeBuildError as exc:
        sys.exit(f"error: {exc}")
