"""The native SDK's bindings and tools against the Python SDK, on a small real bundle (the digits
run's query model, ExecuTorch fp32) and gallery (1797 digits in 3 shards): the JNI class on the
host JVM, ``cmce-query-native`` against ``cmce-query``, and the aarch64 build under qemu-user."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from importlib.metadata import version
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from query_sdk import cli as query_cli
from query_sdk.native.build import (
    NativeBuildError,
    build_folder,
    build_library,
    hnswlib_headers,
)

NATIVE = Path(__file__).resolve().parents[1] / "query_sdk" / "native"
K = 10


@pytest.fixture(scope="module")
def native() -> Path:
    """The release build folder of libcmce_query (with jni/ and tools/)."""
    try:
        return build_library("release")
    except NativeBuildError as exc:
        pytest.fail(str(exc))


@pytest.fixture(scope="module")
def digits(digits_run, tmp_path_factory):
    """(bundle, gallery, PNG files + one undecodable file, Python SDK top-K ids per image)."""
    from export.bundle import ExportPlan, export_bundle
    from gallery_builder.data.datasets import load_digits
    from gallery_builder.gallery.build import BuildSettings, build
    from query_sdk.searcher import Searcher

    _, _, run = digits_run
    root = tmp_path_factory.mktemp("native-bindings")
    models = [run / "models" / n for n in ("resnet", "widecnn", "vit", "query")]
    heads = run / "heads" / "unified"
    build(models, heads, "digits", root / "gallery", BuildSettings(shard_size=700))
    plan = ExportPlan(
        run / "models" / "query",
        heads,
        [("executorch", "fp32")],
        "digits",
        root / "bundle",
        n_validation=256,
    )
    export_bundle(plan, progress=False)
    images = []
    for i, pixels in enumerate(load_digits().images[::150]):
        images.append(root / f"digit-{i}.png")
        Image.fromarray(pixels[..., 0]).save(images[-1])
    broken = root / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    searcher = Searcher.open(bundle=root / "bundle", gallery=root / "gallery", backend="executorch")
    expected = {str(p): [h.id for h in searcher.search(p, k=K)] for p in images}
    return root / "bundle", root / "gallery", images, broken, expected


def _damaged_gallery(gallery: Path, out: Path) -> Path:
    """A copy of the gallery whose first shard's index file is cut short."""
    shutil.copytree(gallery, out)
    index = sorted(out.glob("shard-*.hnsw"))[0]
    index.write_bytes(index.read_bytes()[:-100])
    return out


def _run(cmd: list, timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, **kw
    )


# ------------------------------------------------------------------------------- JNI


@pytest.mark.skipif(
    not shutil.which("javac"), reason="no JDK (apt-get install default-jdk-headless)"
)
def test_java_class_finds_what_the_python_sdk_finds(native, digits, tmp_path):
    bundle, gallery, images, _, expected = digits
    classes = tmp_path / "classes"
    sources = [*sorted((NATIVE / "java" / "org" / "cmce").glob("*.java"))]
    sources.append(NATIVE / "java" / "test" / "CmceQueryCheck.java")
    built = _run(["javac", "-Xlint:all", "-Werror", "-d", classes, *sources])
    assert built.returncode == 0, built.stderr
    java = ["java", f"-Djava.library.path={native / 'jni'}", "-cp", classes, "CmceQueryCheck"]

    # searchFile, searchEncoded, embedFile + search, 4 threads, refusals: checked inside
    done = _run([*java, "search", bundle, gallery, K, *images])
    assert done.returncode == 0, done.stderr
    lines = [line.split("\t") for line in done.stdout.splitlines()]
    assert [line[0] for line in lines] == [str(p) for p in images]
    for image, ids, scores in lines:
        assert ids.split(",") == expected[image], image
        assert np.all(np.diff([float(s) for s in scores.split(",")]) <= 0)

    opened = _run([*java, "open", bundle, gallery])
    dim = json.loads((bundle / "manifest.json").read_text())["embedding_dim"]
    assert opened.stdout.split() == ["ok", str(dim), "1797"], opened.stdout + opened.stderr

    from query_sdk.errors import FormatError
    from query_sdk.shards import Gallery

    bad = _damaged_gallery(gallery, tmp_path / "bad")
    with pytest.raises(FormatError) as python:
        Gallery.open(bad)
    refused = _run([*java, "open", bundle, bad])
    assert refused.returncode == 0, refused.stderr
    assert refused.stdout == f"error 2 FormatError\t{python.value}\n"
    assert "shard-00000.hnsw" in str(python.value)


# ------------------------------------------------------------------------------- the CLI


def _both(native: Path, args: list) -> tuple[subprocess.CompletedProcess, ...]:
    """(cmce-query --backend executorch, in-process; cmce-query-native) on the same args."""
    args = [str(a) for a in args]
    r = CliRunner().invoke(query_cli.main, ["--backend", "executorch", *args])
    python = subprocess.CompletedProcess(args, r.exit_code, r.stdout, r.stderr)
    return python, _run([native / "tools" / "cmce-query-native", *args])


def _same_records(python: list, native: list) -> None:
    assert [r["image"] for r in native] == [r["image"] for r in python]
    for p, n in zip(python, native, strict=True):
        assert ("error" in n) == ("error" in p), (p, n)
        if "error" in p:
            continue
        assert [h["id"] for h in n["hits"]] == [h["id"] for h in p["hits"]], p["image"]
        assert [h["payload"] for h in n["hits"]] == [h["payload"] for h in p["hits"]]
        for key in ("score", "uncertainty"):
            got = np.array([h[key] for h in n["hits"]])
            assert np.abs(got - [h[key] for h in p["hits"]]).max() <= 1e-5, (p["image"], key)


def test_native_cli_answers_like_cmce_query(native, digits):
    bundle, gallery, images, broken, expected = digits
    common = ["--bundle", bundle, "--gallery", gallery]

    python, ours = _both(native, [*common, "--json", *images, broken])
    assert python.returncode == ours.returncode == 1, (python.stderr, ours.stderr)
    records = json.loads(ours.stdout)
    _same_records(json.loads(python.stdout), records)
    assert [h["id"] for h in records[0]["hits"]] == expected[str(images[0])]
    assert records[-1]["image"] == str(broken) and "broken.png" in records[-1]["error"]

    python, ours = _both(
        native, [*common, "--k", "3", "--max-uncertainty", "q0.5", "--json", *images[:4]]
    )
    assert python.returncode == ours.returncode == 0, (python.stderr, ours.stderr)
    _same_records(json.loads(python.stdout), json.loads(ours.stdout))

    python, ours = _both(native, [*common, "--k", "5", "--shards", "0,2", *images[:3]])
    assert python.returncode == ours.returncode == 0, (python.stderr, ours.stderr)
    ranks = [[line.split()[:2] for line in out.stdout.splitlines()] for out in (python, ours)]
    assert ranks[0] == ranks[1]


@pytest.mark.parametrize(
    "args, code",
    [
        (["--k", "0"], 2),
        (["--max-uncertainty", "q0.123"], 2),
        (["--max-uncertainty", "lots"], 2),
        (["--shards", "0,0"], 2),
        (["--quantization", "int8"], 2),  # the bundle has fp32 only: a BundleError
    ],
)
def test_native_cli_refuses_like_cmce_query(native, digits, args, code):
    bundle, gallery, images, _, _ = digits
    python, ours = _both(native, ["--bundle", bundle, "--gallery", gallery, *args, images[0]])
    assert python.returncode == ours.returncode == code, (python.stderr, ours.stderr)
    assert ours.stdout == ""
    first = [
        out.stderr.splitlines()[0 if out.stderr.startswith("error:") else -1]
        for out in (python, ours)
    ]
    assert first[1].split(":")[0] == first[0].split(":")[0], first


def test_native_cli_refuses_a_damaged_gallery(native, digits, tmp_path):
    bundle, gallery, images, _, _ = digits
    bad = _damaged_gallery(gallery, tmp_path / "bad")
    python, ours = _both(native, ["--bundle", bundle, "--gallery", bad, images[0]])
    assert python.returncode == ours.returncode == 2
    assert ours.stderr == python.stderr and ours.stderr.startswith("error: shard-00000.hnsw: ")
    assert ours.stderr.count("\n") == 1


# ---------------------------------------------------------------------------- benchmark


def test_native_benchmark_smoke_agrees_with_the_python_sdk(native, digits, tmp_path):
    from test_benchmarks import positive_times, run_smoke

    from benchmarks.native_e2e import main

    bundle, gallery, _, _, _ = digits
    data = run_smoke(
        main,
        tmp_path,
        *("--bundle", bundle, "--gallery", gallery, "--one-index", tmp_path / "one"),
        *("--lib", native / "libcmce_query.so", "--quantization", "fp32", "--images", "digits"),
    )
    (fp32,) = data["variants"]
    parity = fp32["parity"]
    assert parity["queries"] == 30 and parity["identical_top_k_same_vector"] == 30
    # both SDKs re-normalise the model's output alike: the same vectors, the same hits
    assert parity["identical_top_k"] == 30 and parity["differing_score_gaps"] == []
    assert parity["cosine_min"] >= 0.9999
    shards = [(s["shards"], s["threads"], s["items"]) for s in data["search"]]
    assert shards == [(3, 1, 1797), (3, 2, 1797), (1, 1, 1797)]
    assert all(positive_times(s["native"]) for s in data["search"])
    assert set(data["shards_ratio"]) == {"1", "2"}


# ------------------------------------------------------------------------------- aarch64

CROSS = ("aarch64-linux-gnu-g++", "qemu-aarch64")
KEEP = ("lib", "include", "share")  # of the aarch64 executorch wheel: the C++ runtime
# The cross toolchain's loader and C library, together: with the loader alone, the C library
# came from the arm64 multiarch libc6 (another glibc build) and pthread_create spun forever.
SYSROOT = "/usr/aarch64-linux-gnu"
QEMU = ("qemu-aarch64", "-L", SYSROOT, "-E", f"LD_LIBRARY_PATH={SYSROOT}/lib")


def _aarch64_executorch() -> Path:
    """The aarch64 executorch wheel of the installed version (PyPI), its lib/, include/ and
    share/ unpacked once into the cache; returns the folder holding ``executorch/``."""
    wanted = version("executorch")
    cache = Path(os.environ.get("CMCE_CACHE", Path.home() / ".cache" / "cmce")).expanduser()
    root = cache / f"executorch-{wanted}-aarch64"
    config = root / "executorch" / "lib" / "cmake" / "executorch" / "executorch-config.cmake"
    if config.is_file():
        return root
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q"]
    cmd += ["--platform", "manylinux_2_28_aarch64", "-d", str(root / "wheel")]
    done = _run([*cmd, f"executorch=={wanted}"])
    assert done.returncode == 0, done.stderr
    (wheel,) = (root / "wheel").glob("executorch-*.whl")
    with zipfile.ZipFile(wheel) as z:
        for name in z.namelist():
            parts = name.split("/")
            wanted = len(parts) > 2 and parts[0] == "executorch" and parts[1] in KEEP
            if wanted and ".." not in parts and parts[-1]:  # files only, nothing escapes root
                (root / name).parent.mkdir(parents=True, exist_ok=True)
                (root / name).write_bytes(z.read(name))
    shutil.rmtree(root / "wheel")
    return root


def _cross_build() -> Path:
    """libcmce_query + cmce-query-native for aarch64 (Debian's cross compiler)."""
    cmake = Path(sys.executable).with_name("cmake")
    folder = build_folder("aarch64")
    et = _aarch64_executorch() / "executorch" / "lib" / "cmake" / "executorch"
    if not (folder / "CMakeCache.txt").is_file():
        configure = [cmake, "-S", NATIVE, "-B", folder, "-G", "Ninja"]
        configure += [f"-DCMAKE_TOOLCHAIN_FILE={NATIVE / 'toolchains' / 'aarch64-linux-gnu.cmake'}"]
        configure += [f"-DCMCE_HNSWLIB_INCLUDE={hnswlib_headers()}", "-DCMCE_NATIVE_ARCH=OFF"]
        configure += [f"-Dexecutorch_DIR={et}", f"-DCMAKE_MAKE_PROGRAM={cmake.with_name('ninja')}"]
        done = _run(configure)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    # a cold cross build of the library and the ExecuTorch link takes minutes on 2 cores
    done = _run([cmake, "--build", folder, "-j2", "--target", "cmce-query-native"], timeout=1800)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return folder


@pytest.mark.skipif(
    not all(shutil.which(t) for t in CROSS),
    reason="no aarch64 cross toolchain (apt-get install g++-aarch64-linux-gnu qemu-user "
    "libsodium-dev:arm64 zlib1g-dev:arm64)",
)
def test_aarch64_build_under_qemu_finds_what_x86_64_finds(native, digits):
    bundle, gallery, images, _, expected = digits
    folder = _cross_build()
    cli = folder / "tools" / "cmce-query-native"
    assert b"\xb7\x00" == cli.read_bytes()[18:20]  # e_machine EM_AARCH64
    args = ["--bundle", bundle, "--gallery", gallery, "--json", *images]
    arm = _run([*QEMU, cli, *args])
    assert arm.returncode == 0, arm.stderr
    x86 = _run([native / "tools" / "cmce-query-native", *args])
    _same_records(json.loads(x86.stdout), json.loads(arm.stdout))
    for record in json.loads(arm.stdout):
        assert [h["id"] for h in record["hits"]] == expected[record["image"]]
