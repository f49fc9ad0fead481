"""Build the native SDK: ``libcmce_query`` with CMake (:func:`build_library`), and
``hnsw_query`` (the older shard-format check, :func:`build`) with g++; both on the stock hnswlib
headers.

The headers come from the hnswlib source distribution on PyPI, the same version as the
installed Python hnswlib, fetched once with ``pip download`` into the cache
(``$CMCE_CACHE``, default ``~/.cache/cmce``; ``$CMCE_HNSWLIB_SDIST`` may point at a local
``hnswlib-<version>.tar.gz`` instead). They are never committed.
Flags match how pip builds hnswlib on Linux (``-O3 -march=native``), so both sides compute
distances with the same SIMD code.

``build_library(variant)`` configures and builds ``query_sdk/native/CMakeLists.txt`` into
:func:`build_folder` (incremental: a second call only relinks what changed) with the ``cmake``
(>= 3.28) and ``ninja`` of this Python environment. Variants: ``release`` (the
default compiler); ``sanitize`` (clang, AddressSanitizer + UBSan on every target, the libFuzzer
target ``fuzz_gallery``, no model runtime).

Usage: ``python -m query_sdk.native.build [release|sanitize]`` prints the build folder;
``python -m query_sdk.native.build hnsw_query [OUT]`` the path of the shard-format check.
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

__all__ = [
    "NativeBuildError",
    "SOURCE",
    "VARIANTS",
    "compiler",
    "hnswlib_headers",
    "build",
    "build_folder",
    "build_library",
]

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "hnsw_query.cpp"
#: CMake cache settings per build variant of libcmce_query
VARIANTS: dict[str, dict[str, str]] = {
    "release": {"CMAKE_BUILD_TYPE": "Release"},
    # clang, AddressSanitizer + UBSan on everything, and the libFuzzer target fuzz_gallery
    "sanitize": {
        "CMAKE_BUILD_TYPE": "RelWithDebInfo",
        "CMCE_FUZZ": "ON",
        "CMCE_EMBEDDER": "OFF",
        "CMCE_BINDINGS": "OFF",
        "CMAKE_C_COMPILER": "clang",
        "CMAKE_CXX_COMPILER": "clang++",
    },
}
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


def _tool(name: str) -> str:
    """``name`` from this Python environment's bin folder (pip's cmake / ninja), else PATH."""
    local = Path(sys.executable).parent / name
    found = str(local) if local.is_file() else shutil.which(name)
    if found is None:
        raise NativeBuildError(f"no {name} found; pip install 'cmake>=3.28' ninja")
    return found


def _run(cmd: list[str], what: str) -> None:
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        out = (done.stdout + done.stderr)[-6000:]
        raise NativeBuildError(f"{what} failed: {' '.join(cmd)}\n{out}")


def build_folder(variant: str) -> Path:
    """``$CMCE_CACHE/native/<variant>-<12 hex digits>``: one folder per build variant, source
    checkout and Python environment (a CMake cache names its source folder and build tools,
    so a second checkout or a new venv must not reuse another's)."""
    key = hashlib.sha256(f"{HERE}\n{Path(sys.executable).absolute()}".encode()).hexdigest()
    return _cache() / "native" / f"{variant}-{key[:12]}"


def build_library(variant: str = "release", jobs: int = 2) -> Path:
    """Configure (once) and build libcmce_query's CMake project; return the build folder.

    The folder holds ``libcmce_query.so``, ``cmce_probe`` (and ``fuzz_gallery`` for the sanitize
    variant); ``ctest --test-dir <folder>`` runs the CMake tests. NativeBuildError says what
    is missing (compiler, cmake, hnswlib headers, libsodium, nlohmann-json) or what failed.
    """
    if variant not in VARIANTS:
        raise NativeBuildError(f"unknown variant {variant!r}; one of {sorted(VARIANTS)}")
    settings = VARIANTS[variant]
    for key in ("CMAKE_CXX_COMPILER",):
        if key in settings and shutil.which(settings[key]) is None:
            raise NativeBuildError(
                f"the {variant} build needs {settings[key]} (apt-get install clang)"
            )
    folder = build_folder(variant)
    if not (folder / "CMakeCache.txt").is_file():
        defines = {**settings, "CMCE_HNSWLIB_INCLUDE": str(hnswlib_headers())}
        defines["CMAKE_MAKE_PROGRAM"] = _tool("ninja")
        defines["CMCE_PYTHON"] = sys.executable  # whose executorch wheel the embedder links
        _run(
            [_tool("cmake"), "-S", str(HERE), "-B", str(folder), "-G", "Ninja"]
            + [f"-D{k}={v}" for k, v in defines.items()],
            "configuring libcmce_query",
        )
    _run([_tool("cmake"), "--build", str(folder), "-j", str(jobs)], "building libcmce_query")
    return folder


if __name__ == "__main__":
    try:
        if sys.argv[1:2] == ["hnsw_query"]:
            print(build(Path(sys.argv[2]) if len(sys.argv) > 2 else None))
        else:
            print(build_library(sys.argv[1] if len(sys.argv) > 1 else "release"))
    except NativeBuildError as exc:
        sys.exit(f"error: {exc}")
