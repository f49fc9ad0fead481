"""``kill -9`` during ``build``, ``add``, ``remove`` and ``reproject``: the gallery path always
holds the old gallery or the new one (``verify`` accepts it), and the next operation succeeds.

Each operation runs as the real ``cmce-build-gallery`` CLI in a subprocess. From the moment
the command starts, its file-system steps are counted: ``os.replace``, ``os.rename``,
``os.link``, ``os.unlink``, ``os.rmdir``, ``os.mkdir``, ``os.fsync``, ``shutil.rmtree`` and the
folder exchange of the swap. Kill point ``k`` SIGKILLs the process right before its ``k``-th
step (named points, deterministic: the same ``k`` is the same step on every run). A first,
uninterrupted run counts the steps and gives the new state; ``--points`` kill points are spread
evenly over the steps, plus every step of the swap. After each kill the gallery must be absent
(a build that never finished) or verify and equal the old or the new state (the manifest with
every file's sha256, minus its ``created`` time); then the next operation (the same one again,
or a ``remove`` when the new state had landed) must succeed and leave no ``.staging``, ``.old``,
``.lock`` or ``.tmp`` behind. Two ``add``s at once: the second is refused with a ``BusyError``
while the first holds the lock (it pauses inside its transaction), the gallery is the first
add's, and the second add afterwards succeeds. ``--no-exchange`` repeats the kills of ``add``
with the two-rename fallback swap used where ``renameat2(RENAME_EXCHANGE)`` is unavailable
(there, a kill between the two renames leaves the path missing until the next change's
recovery puts the old gallery back).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import click

from benchmarks._common import machine_info, output_options, resolve_outputs, write_outputs
from query_sdk.fileio import LOCK_SUFFIX, OLD_SUFFIX, STAGING_SUFFIX
from query_sdk.gallery_format import MANIFEST_FILE, verify_gallery

__all__ = ["Scenario", "run_cli", "gallery_state", "leftovers", "kill_point", "main"]

GALLERY_MODELS = ("resnet", "widecnn", "vit", "query")  # "query": the query model's own member
OPS = ("build", "add", "remove", "reproject")
ROOT = Path(__file__).resolve().parent.parent
KILL_ENV, PAUSE_ENV, STEPS_ENV, NO_EXCHANGE_ENV = (
    "CMCE_TEST_KILL_AT",
    "CMCE_TEST_PAUSE_AT",
    "CMCE_TEST_STEPS_FILE",
    "CMCE_TEST_NO_EXCHANGE",
)  # read by benchmarks._crash_child


def run_cli(
    args: list[str],
    kill_at: str = "",
    pause_at: str = "",
    steps_file: Path | None = None,
    no_exchange: bool = False,
    wait: bool = True,
) -> subprocess.CompletedProcess | subprocess.Popen:
    """Run ``cmce-build-gallery ARGS`` in a subprocess with counted steps (see module doc)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", KILL_ENV: kill_at, PAUSE_ENV: pause_at}
    env.pop("CMCE_DEBUG", None)
    if steps_file is not None:
        env[STEPS_ENV] = str(steps_file)
    if no_exchange:
        env[NO_EXCHANGE_ENV] = "1"
    cmd = [sys.executable, "-m", "benchmarks._crash_child", *map(str, args)]
    if not wait:
        return subprocess.Popen(
            cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
    return subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)


def gallery_state(gallery: Path) -> dict | None:
    """None if no gallery is at ``gallery`` (absent or an empty folder); else the manifest
    (minus ``created``) after :func:`verify_gallery` accepted every file. Raises if incomplete."""
    gallery = Path(gallery)
    if not gallery.exists() or (gallery.is_dir() and not any(gallery.iterdir())):
        return None
    verify_gallery(gallery)
    manifest = json.loads((gallery / MANIFEST_FILE).read_text())
    manifest.pop("created")
    return manifest


def leftovers(gallery: Path) -> list[str]:
    """Names a transaction may leave after a crash, still beside or inside ``gallery``."""
    gallery = Path(gallery)
    names = [f".{gallery.name}{s}" for s in (STAGING_SUFFIX, OLD_SUFFIX, LOCK_SUFFIX)]
    found = [n for n in names if (gallery.parent / n).exists()]
    return found + [str(p) for p in gallery.rglob("*.tmp")] if gallery.exists() else found


class Scenario:
    """The four operations on one small gallery of digits PNGs, with the old and new states.

    ``run_dir`` holds the digits preset's models and heads (``cmce demo``-style layout)."""

    def __init__(self, run_dir: Path, work: Path, n_base: int = 300, n_add: int = 150) -> None:
        from PIL import Image

        from gallery_builder.data.datasets import load_digits

        self.run_dir, self.work = Path(run_dir), Path(work)
        self.models = [self.run_dir / "models" / n for n in GALLERY_MODELS]
        self.heads = self.run_dir / "heads" / "unified"
        self.new_heads = self.run_dir / "heads" / "to-query"
        digits = load_digits()
        images = self.work / "images"
        images.mkdir(parents=True, exist_ok=True)
        self.lists = {}
        spans = {
            "base": range(n_base),
            "add": range(n_base, n_base + n_add),
            "add2": range(n_base + n_add, n_base + 2 * n_add),
        }
        for name, rows in spans.items():
            lines = []
            for i in rows:
                path = images / f"{i}.png"
                if not path.exists():
                    Image.fromarray(digits.images[i, :, :, 0]).save(path)
                lines.append(f"{path},item-{i}")
            if name == "add":  # one broken file, so that the add changes skipped.jsonl
                (images / "broken.png").write_bytes(b"not a png")
                lines.append(f"{images / 'broken.png'},broken-{name}")
            self.lists[name] = self.work / f"{name}.txt"
            self.lists[name].write_text("\n".join(lines) + "\n")
        self.removed = ["item-3", f"item-{n_base // 2}", f"item-{n_base - 1}"]
        self.base = self.work / "base" / "gallery"
        if not (self.base / MANIFEST_FILE).exists():
            self.api("build", self.base)
        self.old_state = gallery_state(self.base)

    def cli_args(self, op: str, gallery: Path) -> list[str]:
        if op == "build":
            models = [a for m in self.models for a in ("--models", m)]
            return [
                "build",
                *models,
                "--heads",
                self.heads,
                "--images",
                self.lists["base"],
                "--out",
                gallery,
                "--shard-size",
                100,
            ]
        if op == "add":
            return ["add", "--gallery", gallery, "--images", self.lists["add"]]
        if op == "remove":
            ids = [a for i in self.removed for a in ("--ids", i)]
            return ["remove", "--gallery", gallery, *ids, "--yes"]
        if op == "reproject":
            return ["reproject", "--gallery", gallery, "--heads", self.new_heads]
        raise ValueError(op)

    def api(self, op: str, gallery: Path, resume: bool = False):
        """The same operation through the Python API (the recovery run)."""
        from gallery_builder.gallery import build as g

        if op == "build":
            settings = g.BuildSettings(shard_size=100)
            return g.build(
                self.models, self.heads, str(self.lists["base"]), gallery, settings, resume=resume
            )
        if op == "add":
            return g.add(gallery, str(self.lists["add"]))
        if op == "remove":
            return g.remove(gallery, self.removed)
        return g.reproject(gallery, self.new_heads)

    def fresh(self, op: str, folder: Path) -> Path:
        """A gallery path for one run: absent for build, a copy of the base gallery otherwise."""
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        gallery = folder / "gallery"
        if op != "build":
            shutil.copytree(self.base, gallery)
        return gallery

    def old(self, op: str) -> dict | None:
        return None if op == "build" else self.old_state


def kill_point(
    scenario: Scenario, op: str, kill_at: str, new_state: dict, folder: Path, no_exchange=False
) -> dict:
    """One kill: run ``op`` killed at ``kill_at``, check the path, recover, check again."""
    gallery = scenario.fresh(op, folder)
    proc = run_cli(scenario.cli_args(op, gallery), kill_at=kill_at, no_exchange=no_exchange)
    row = {"op": op, "kill_at": kill_at, "killed": proc.returncode == -signal.SIGKILL}
    if not row["killed"]:
        row["error"] = f"exit {proc.returncode}: {proc.stderr.strip()[-300:]}"
        return row
    old_folder = gallery.with_name(f".{gallery.name}{OLD_SUFFIX}")
    try:
        state = gallery_state(gallery)
        if state is None and no_exchange and old_folder.is_dir() and op != "build":
            row["after_kill"] = "missing until recovery"  # between the fallback's two renames
        else:
            row["after_kill"] = (
                "old" if state == scenario.old(op) else "new" if state == new_state else "OTHER"
            )
    except Exception as exc:  # a damaged gallery: exactly what must not happen
        row["after_kill"] = f"BROKEN: {exc}"
    # the next operation: the same one again if it had not landed, else a remove
    row["next_op"] = "remove" if row["after_kill"] == "new" else op
    try:
        scenario.api(row["next_op"], gallery, resume=True)
        after = gallery_state(gallery)
        row["recovered"] = after is not None if row["after_kill"] == "new" else after == new_state
    except Exception as exc:
        row["recovered"] = False
        row["error"] = f"next {row['next_op']}: {exc}"
    row["leftovers"] = leftovers(gallery)
    allowed = ("old", "new", "missing until recovery") if no_exchange else ("old", "new")
    row["ok"] = row["after_kill"] in allowed and row["recovered"] and not row["leftovers"]
    shutil.rmtree(folder, ignore_errors=True)
    return row


def _points(steps: list[str], n: int) -> list[int]:
    """``n`` step numbers (1-based) spread evenly from the first step on the gallery (before it,
    the steps are the libraries' own, e.g. torch's cache folder) to the last, plus each step of
    the swap (the exchange or the renames) and the step after it."""
    total = len(steps)
    first = next((i + 1 for i, s in enumerate(steps) if "gallery" in s), 1)
    spread = {round(first + i * (total - first) / max(n - 1, 1)) for i in range(n)}
    swap = {i + 1 for i, s in enumerate(steps) if s.startswith(("_exchange", "rename"))}
    return sorted(spread | swap | {k + 1 for k in swap if k < total})


def concurrent_adds(scenario: Scenario, folder: Path, add_state: dict) -> dict:
    """Two adds at once: the first pauses inside its transaction (before its swap) while the
    second runs; the second must be refused, the gallery must be the first add's, and the
    second add, run again afterwards, must succeed."""
    gallery = scenario.fresh("add", folder)
    signal_file = folder / "pause"
    first = run_cli(
        scenario.cli_args("add", gallery), pause_at=f"_exchange#1@{signal_file}", wait=False
    )
    deadline = time.monotonic() + 300
    while not Path(f"{signal_file}.paused").exists():
        if first.poll() is not None or time.monotonic() > deadline:
            raise click.ClickException(f"the first add did not pause: {first.stderr.read()}")
        time.sleep(0.05)
    second = run_cli(["add", "--gallery", gallery, "--images", scenario.lists["add2"]])
    Path(f"{signal_file}.go").touch()
    first.wait(timeout=600)
    first_state = gallery_state(gallery)
    retry = run_cli(["add", "--gallery", gallery, "--images", scenario.lists["add2"]])
    from query_sdk.gallery_format import read_manifest

    return {
        "first_exit": first.returncode,
        "second_exit": second.returncode,
        "second_message": second.stderr.strip().splitlines()[-1] if second.stderr else "",
        "gallery_is_the_first_add": first_state == add_state,
        "retry_exit": retry.returncode,
        "items_at_end": read_manifest(gallery).count,
        "verified_at_end": gallery_state(gallery) is not None,
        "leftovers": leftovers(gallery),
    }


@click.command()
@output_options
@click.option(
    "--run",
    "run_dir",
    type=click.Path(path_type=Path),
    default=None,
    help="A digits-preset run folder (models/, heads/); default: run the preset into --work.",
)
@click.option("--points", default=12, show_default=True, help="Kill points per operation.")
@click.option(
    "--no-exchange", is_flag=True, help="Also kill `add` at every point with the fallback swap."
)
@click.option("--work", type=click.Path(path_type=Path), default=None, help="Scratch folder.")
def main(smoke, out, results_md, run_dir, points, no_exchange, work) -> None:
    """Kill -9 at spread points of build/add/remove/reproject; check old-or-new and recovery.

    \b
    Examples:
      python -m benchmarks.crash_safety --smoke
      python -m benchmarks.crash_safety --points 12 --no-exchange
    """
    out, results_md = resolve_outputs(smoke, out, results_md)
    if smoke:
        points = 3
    work = Path(work or tempfile.mkdtemp(prefix="cmce-bench-crash-")).resolve()
    if run_dir is None:
        run_dir = work / "digits-run"
        if not (run_dir / "heads" / "to-query").is_dir():
            from gallery_builder.evaluation.experiment import PRESETS
            from gallery_builder.evaluation.run import run_experiment

            run_experiment(PRESETS["digits"](), run_dir)
    start = time.perf_counter()
    scenario = Scenario(run_dir, work)
    reference = scenario.fresh("add", work / "points" / "reference")
    scenario.api("add", reference)
    concurrent = concurrent_adds(scenario, work / "points" / "concurrent", gallery_state(reference))
    click.echo(json.dumps(concurrent), err=True)
    rows, totals = [], {}
    runs = [(op, False) for op in OPS] + ([("add", True)] if no_exchange else [])
    for op, fallback in runs:
        folder = work / "points" / op
        gallery = scenario.fresh(op, folder)
        steps_file = work / f"steps-{op}.txt"
        proc = run_cli(scenario.cli_args(op, gallery), steps_file=steps_file, no_exchange=fallback)
        if proc.returncode != 0:
            raise click.ClickException(f"{op} failed: {proc.stderr.strip()[-500:]}")
        new_state = gallery_state(gallery)
        steps = steps_file.read_text().splitlines()
        totals[f"{op}{' (fallback)' if fallback else ''}"] = len(steps)
        for k in _points(steps, points):
            row = kill_point(scenario, op, str(k), new_state, folder, fallback)
            row.update(step=steps[k - 1], fallback=fallback)
            click.echo(json.dumps(row), err=True)
            rows.append(row)
    seconds = time.perf_counter() - start
    by_op = {}
    for r in rows:
        key = f"{r['op']}{' (fallback)' if r['fallback'] else ''}"
        c = by_op.setdefault(key, Counter())
        c["points"] += 1
        c["ok"] += bool(r.get("ok"))
        c[f"after kill: {r.get('after_kill', 'not killed')}"] += 1
    result = {
        "benchmark": "crash_safety",
        "smoke": smoke,
        "machine": machine_info(),
        "steps": totals,
        "summary": {k: dict(v) for k, v in by_op.items()},
        "points": rows,
        "concurrent_adds": concurrent,
        "seconds": seconds,
    }
    lines = [
        "| operation | file-system steps | kill points | old state after kill | new state after "
        "kill | path missing until the next op recovers it | next op ok, nothing left over |",
        "|---|---|---|---|---|---|---|",
    ]
    for key, c in by_op.items():
        lines.append(
            f"| {key} | {totals[key]} | {c['points']} | {c['after kill: old']} | "
            f"{c['after kill: new']} | {c['after kill: missing until recovery']} | "
            f"{c['ok']} of {c['points']} |"
        )
    section = (
        "### Crash safety: kill -9 during gallery changes\n\n"
        + "\n".join(lines)
        + f"\n\nTwo adds at once: the second exits {concurrent['second_exit']} "
        f"(`{concurrent['second_message']}`); the retry exits {concurrent['retry_exit']}; "
        f"{concurrent['items_at_end']} items at the end, leftovers {concurrent['leftovers']}. "
        f"{len(rows)} kills in {seconds:.0f} s."
    )
    write_outputs("crash_safety", result, section, out, results_md)
    bad = [r for r in rows if not r.get("ok")]
    if bad or concurrent["second_exit"] != 8 or concurrent["retry_exit"] != 0:
        raise click.ClickException(f"{len(bad)} points failed: {bad[:3]}")


if __name__ == "__main__":
    main()
