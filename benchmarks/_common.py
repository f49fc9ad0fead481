"""What every benchmark shares: the machine record, timing, percentiles, output files.

Each benchmark writes ``<out>/<name>.json`` (the figures plus the machine they came from),
``<out>/<name>.png`` and replaces its own section of a RESULTS.md (between
``<!-- begin NAME -->`` and ``<!-- end NAME -->``), so re-running one benchmark leaves the
others' sections alone.
"""

from __future__ import annotations

import json
import os
import platform
import re
import resource
import shlex
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import click
import numpy as np

__all__ = [
    "machine_info",
    "machine_markdown",
    "percentiles",
    "timed",
    "rss_bytes",
    "blas_threads",
    "png_folder",
    "write_outputs",
    "pyplot",
    "output_options",
    "resolve_outputs",
    "CACHE_DIR",
    "DEFAULT_OUT",
    "DEFAULT_RESULTS",
]

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results"
DEFAULT_RESULTS = HERE / "RESULTS.md"
CACHE_DIR = Path(os.environ.get("CMCE_BENCH_CACHE", Path.home() / ".cache" / "cmce" / "bench"))
LIBRARIES = (
    "numpy",
    "torch",
    "hnswlib",
    "faiss-cpu",
    "onnxruntime",
    "executorch",
    "torchao",
    "ray",
    "cmce",
)
ORDER = ("latency", "search", "end_to_end", "build", "accuracy")  # sections in RESULTS.md
RESULTS_TITLE = (
    "# Benchmark results\n\nWritten by `python -m benchmarks.NAME`; each section "
    "names the machine and the command that produced it.\n"
)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _library_versions() -> dict[str, str]:
    out = {}
    for name in LIBRARIES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            continue
    return out


def machine_info() -> dict:
    """CPU model, cores, load average, OS, Python and library versions, UTC time."""
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0))
        if hasattr(os, "sched_getaffinity")
        else os.cpu_count(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "libraries": _library_versions(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def machine_markdown(machine: dict) -> str:
    """One paragraph describing the machine, for a RESULTS.md section."""
    libs = ", ".join(f"{k} {v}" for k, v in machine["libraries"].items())
    load = " / ".join(f"{x:.2f}" for x in machine["load_average"])
    end = machine.get("load_average_end")
    load_end = f"; {' / '.join(f'{x:.2f}' for x in end)} at the end" if end else ""
    return (
        f"Machine: {machine['cpu']}, {machine['cores']} cores ({machine['os']}, Python "
        f"{machine['python']}), {machine['date']}. Load average (1/5/15 min) "
        f"{load} at the start{load_end}: the machine is shared with other jobs, so "
        f"absolute times are pessimistic and noisy; ratios within one run are the "
        f"robust figures. Libraries: {libs}."
    )


def percentiles(
    seconds: list[float] | np.ndarray, cpu_seconds: list[float] | np.ndarray | None = None
) -> dict[str, float]:
    """p50 / p90 / mean wall time in milliseconds, the number of samples, and the p50 of the
    process CPU time (on a busy machine wall time also holds waits for a core; CPU time not)."""
    ms = np.asarray(seconds, np.float64) * 1e3
    out = {
        "p50_ms": float(np.percentile(ms, 50)),
        "p90_ms": float(np.percentile(ms, 90)),
        "mean_ms": float(ms.mean()),
        "n": int(len(ms)),
    }
    if cpu_seconds is not None:
        out["cpu_p50_ms"] = float(np.percentile(np.asarray(cpu_seconds) * 1e3, 50))
    return out


def timed(fn: Callable[[int], object], n: int, warmup: int = 3) -> dict[str, float]:
    """:func:`percentiles` of ``fn(i)`` for i in range(n), after ``warmup`` untimed calls."""
    for i in range(min(warmup, n)):
        fn(i)
    wall, cpu = [], []
    for i in range(n):
        start, start_cpu = time.perf_counter(), time.process_time()
        fn(i)
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return percentiles(wall, cpu)


def png_folder(data, n: int, dest: Path) -> Path:
    """The first ``n`` images of an ImageSet as PNGs in ``dest/<label>/<index>.png``, as users
    bring images (kept for re-runs)."""
    from PIL import Image

    done = dest / ".complete"
    if done.is_file() and done.read_text() == f"{data.name} {n}":
        return dest
    shutil.rmtree(dest, ignore_errors=True)
    for i in range(min(n, len(data))):
        folder = dest / str(int(data.labels[i]))
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(
            data.images[i].squeeze(-1) if data.images[i].shape[-1] == 1 else data.images[i]
        ).save(folder / f"{i:06d}.png")
    done.write_text(f"{data.name} {n}")
    return dest


def rss_bytes() -> int:
    """Resident memory of this process now (Linux /proc; peak RSS elsewhere)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@contextmanager
def blas_threads(n: int) -> Iterator[None]:
    """Limit numpy's BLAS (and OpenMP) pools to ``n`` threads inside the block."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=n):
        yield


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _replace_section(text: str, name: str, body: str) -> str:
    """RESULTS.md with ``name``'s section replaced (or added), sections in ORDER."""
    sections = dict(re.findall(r"<!-- begin (\w+) -->\n(.*?)\n<!-- end \1 -->", text, re.S))
    sections[name] = body.strip()
    names = [n for n in ORDER if n in sections] + [n for n in sections if n not in ORDER]
    blocks = [f"<!-- begin {n} -->\n{sections[n]}\n<!-- end {n} -->" for n in names]
    return RESULTS_TITLE + "\n" + "\n\n".join(blocks) + "\n"


def _command(name: str) -> str:
    """The command line of this run (``python -m benchmarks.NAME ...``), if run as one."""
    if Path(sys.argv[0]).stem != name:
        return f"benchmarks.{name}.main (in-process)"
    return " ".join([f"python -m benchmarks.{name}", *map(shlex.quote, sys.argv[1:])])


def write_outputs(
    name: str, result: dict, section: str, out: Path, results_md: Path, figure=None
) -> dict[str, Path]:
    """Write ``<out>/<name>.json`` (+ ``.png`` from ``figure``) and ``name``'s RESULTS.md
    section (the machine paragraph is appended to ``section``). Returns the paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    result["machine"].setdefault("load_average_end", [round(x, 2) for x in os.getloadavg()])
    paths = {"json": out / f"{name}.json"}
    if figure is not None:
        paths["png"] = out / f"{name}.png"
        figure.savefig(paths["png"], dpi=110, bbox_inches="tight")
        pyplot().close(figure)
    results_md = Path(results_md)
    text = results_md.read_text() if results_md.is_file() else RESULTS_TITLE
    plot = ""
    if figure is not None:
        rel = os.path.relpath(paths["png"], results_md.parent)
        plot = f"\n\n![{name}]({rel})"
    command = result.setdefault("command", _command(name))
    body = f"{section.strip()}{plot}\n\nCommand: `{command}`. {machine_markdown(result['machine'])}"
    paths["json"].write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    results_md.parent.mkdir(parents=True, exist_ok=True)
    results_md.write_text(_replace_section(text, name, body))
    paths["results"] = results_md
    return paths


def output_options(fn):
    """``--smoke``, ``--out`` and ``--results`` for every benchmark command."""
    fn = click.option(
        "--results",
        "results_md",
        type=click.Path(path_type=Path),
        default=None,
        help="RESULTS.md to update [default: benchmarks/RESULTS.md; "
        "with --smoke: <out>/RESULTS.md].",
    )(fn)
    fn = click.option(
        "--out",
        type=click.Path(path_type=Path),
        default=None,
        help="Folder for the JSON and PNG [default: benchmarks/results; with "
        "--smoke: benchmarks/results/smoke].",
    )(fn)
    return click.option(
        "--smoke", is_flag=True, help="Tiny sizes: checks that the benchmark runs (CI), in seconds."
    )(fn)


def resolve_outputs(smoke: bool, out: Path | None, results_md: Path | None) -> tuple[Path, Path]:
    """Defaults of ``--out`` / ``--results``: smoke runs never touch the committed results."""
    if out is None:
        out = DEFAULT_OUT / "smoke" if smoke else DEFAULT_OUT
    if results_md is None:
        results_md = out / "RESULTS.md" if smoke else DEFAULT_RESULTS
    return Path(out), Path(results_md)


def bundle_variants(bundle: Path) -> list[tuple[str, str]]:
    """(backend, quantization) of every query artifact of ``bundle`` a backend could run."""
    from query_sdk.bundle_format import QUERY_ROLE, read_bundle_manifest
    from query_sdk.runtimes import BACKENDS

    by_target = {target: backend for backend, target in BACKENDS.items()}
    return [
        (by_target[a.target], a.quantization)
        for a in read_bundle_manifest(bundle).artifacts
        if a.role == QUERY_ROLE and a.target in by_target
    ]


def open_searchers(bundle: Path, gallery: Path, threads: int) -> Iterator[tuple[dict, object]]:
    """For every query artifact of ``bundle``: (row, Searcher), or (row with "error", None)
    where its backend cannot run here. Raises ClickException if none could be opened."""
    from query_sdk import Searcher
    from query_sdk.runtimes import BackendError

    opened = False
    for backend, quantization in bundle_variants(bundle):
        click.echo(f"{gallery}: {backend} {quantization}", err=True)
        row = {"backend": backend, "quantization": quantization}
        try:
            searcher = Searcher.open(
                bundle=bundle,
                gallery=gallery,
                backend=backend,
                threads=threads,
                quantization=quantization,
            )
        except BackendError as exc:
            yield {**row, "error": str(exc).split(";")[0]}, None
            continue
        opened = True
        yield row, searcher
    if not opened:
        raise click.ClickException(f"{bundle}: no query artifact runs on this machine")
