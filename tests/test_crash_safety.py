"""Crash safety of gallery (and bundle) changes, issue 12: one staged-folder transaction with a
lock, recovery of what a killed run left, a swap that never leaves the path without a complete
folder, checksums for every file that matters, umask modes.

The file layer is tested alone first (no models: subprocesses killed at every step), then the
gallery commands on a small digits gallery with the session's tiny models.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from benchmarks.crash_safety import ROOT, Scenario, gallery_state, kill_point, leftovers
from export.bundle import staged_folder
from gallery_builder.gallery import build as build_module
from gallery_builder.gallery.build import add, remove
from query_sdk.errors import BusyError, StorageError
from query_sdk.fileio import (
    folder_lock,
    folder_transaction,
    recover_folder,
    staging_path,
    write_bytes_atomic,
)
from query_sdk.gallery_format import GalleryError, verify_gallery


def tree(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (relative POSIX name -> bytes)."""
    folder = Path(folder)
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()
    }


# ---------------------------------------------------------------------------- the file layer
OLD = {"manifest.json": b"old", "raw/part.bin": b"old part", "gone.txt": b"x"}
NEW = {"manifest.json": b"new", "raw/part.bin": b"new part", "added.txt": b"y"}
_CHANGE = """
import sys
from pathlib import Path
from benchmarks._crash_child import install
steps = install()
from query_sdk.fileio import folder_transaction, write_bytes_atomic
g = Path(sys.argv[1])
with folder_transaction(g, link=lambda name: name.endswith(".bin")) as stage:
    write_bytes_atomic(stage / "manifest.json", b"new")
    write_bytes_atomic(stage / "raw" / "part.bin", b"new part")
    write_bytes_atomic(stage / "added.txt", b"y")
    (stage / "gone.txt").unlink()
print(len(steps))
"""


def _make(folder: Path, files: dict[str, bytes]) -> Path:
    shutil.rmtree(folder, ignore_errors=True)
    for name, data in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    return folder


def _change(folder: Path, kill_at: str = "", no_exchange: bool = False):
    env = {**os.environ, "CMCE_TEST_KILL_AT": kill_at}
    if no_exchange:
        env["CMCE_TEST_NO_EXCHANGE"] = "1"
    return subprocess.run(
        [sys.executable, "-c", _CHANGE, str(folder)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize("no_exchange", [False, True], ids=["exchange", "fallback"])
def test_kill_at_every_step_of_a_transaction_leaves_old_or_new(tmp_path, no_exchange):
    """SIGKILL before each file-system step of a real transaction: the path holds the old or the
    new folder (with the atomic exchange: at every step; with the two-rename fallback the path
    is missing only between its two renames), and the next transaction's recovery puts a
    complete folder back and leaves nothing behind."""
    g = tmp_path / "g"
    done = _change(_make(g, OLD), no_exchange=no_exchange)
    assert done.returncode == 0, done.stderr
    assert tree(g) == NEW
    steps = int(done.stdout.split()[-1])
    assert steps > 15
    seen, missing = [], []
    for k in range(1, steps + 1):
        proc = _change(_make(g, OLD), kill_at=str(k), no_exchange=no_exchange)
        assert proc.returncode == -signal.SIGKILL, (k, proc.stderr)
        if not g.exists():
            missing.append(k)
        else:
            assert tree(g) in (OLD, NEW), k
        with folder_lock(g):
            recover_folder(g)
        state = tree(g)
        assert state in (OLD, NEW), k
        seen.append("old" if state == OLD else "new")
        assert not leftovers(g), k
    assert "old" in seen and "new" in seen
    if no_exchange:
        assert len(missing) == 1 and seen[missing[0] - 1] == "old"  # recovery put .old back
    else:
        assert missing == []


def test_a_failed_change_never_touches_the_live_folder(tmp_path):
    """Copied files share no inode with the live folder: even an in-place append (what the old
    ``skipped.jsonl`` writer did) lands in the copy only; linked files are the same inode."""
    g = _make(tmp_path / "g", OLD)
    with (
        pytest.raises(RuntimeError, match="boom"),
        folder_transaction(g, link=lambda name: name.endswith(".bin")) as stage,
    ):
        with open(stage / "manifest.json", "ab") as f:
            f.write(b" edited in place")
        assert (stage / "raw/part.bin").stat().st_ino == (g / "raw/part.bin").stat().st_ino
        assert (stage / "manifest.json").stat().st_ino != (g / "manifest.json").stat().st_ino
        raise RuntimeError("boom")
    assert tree(g) == OLD
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g"]  # no staging, no lock left


def test_readers_never_find_the_folder_missing(tmp_path):
    """While 200 transactions swap a folder, a reader opening its manifest always finds one."""
    g = _make(tmp_path / "g", {"manifest.json": b"0"})
    stop, misses, reads = threading.Event(), [], []

    def reader():
        while not stop.is_set():
            try:
                reads.append((g / "manifest.json").read_bytes())
            except FileNotFoundError:
                misses.append(1)

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for i in range(1, 201):
            with folder_transaction(g) as stage:
                write_bytes_atomic(stage / "manifest.json", str(i).encode())
    finally:
        stop.set()
        thread.join()
    assert misses == [] and len(reads) > 200
    assert (g / "manifest.json").read_bytes() == b"200"


def test_a_second_writer_is_refused_naming_the_holder(tmp_path):
    g = _make(tmp_path / "g", OLD)
    with folder_lock(g):
        busy = rf"{g} is being changed by pid {os.getpid()} on"
        with pytest.raises(BusyError, match=busy), folder_transaction(g):
            pass
        with pytest.raises(BusyError), folder_lock(g, timeout=0.2):
            pass
    with folder_transaction(g):  # free again
        pass
    assert tree(g) == OLD


def test_bundle_and_gallery_folders_get_umask_modes(tmp_path):
    before = os.umask(0o027)
    try:
        with staged_folder(tmp_path / "bundle", force=False) as folder:
            write_bytes_atomic(folder / "manifest.json", b"{}")
            (folder / "heads").mkdir()
    finally:
        os.umask(before)
    bundle = tmp_path / "bundle"
    assert bundle.stat().st_mode & 0o777 == 0o750
    assert (bundle / "heads").stat().st_mode & 0o777 == 0o750
    assert (bundle / "manifest.json").stat().st_mode & 0o777 == 0o640


# ------------------------------------------------------------------------- gallery commands
@pytest.fixture(scope="module")
def scenario(digits_run, tmp_path_factory):
    """A 300-image digits gallery (3 shards) and its add / remove / reproject inputs."""
    _, _, run_dir = digits_run
    return Scenario(run_dir, tmp_path_factory.mktemp("crash"), n_base=300, n_add=100)


def _copy(scenario: Scenario, tmp_path: Path) -> Path:
    return scenario.fresh("add", tmp_path / "live")


def test_gallery_files_are_0644_and_folders_0755(scenario, tmp_path):
    old = os.umask(0o022)
    try:
        g = _copy(scenario, tmp_path)
        add(g, str(scenario.lists["add"]))
    finally:
        os.umask(old)
    for folder in (scenario.base, g):
        modes = {
            p.relative_to(folder).as_posix(): p.stat().st_mode & 0o777 for p in folder.rglob("*")
        }
        assert {m for n, m in modes.items() if (folder / n).is_dir()} == {0o755}, modes
        assert {m for n, m in modes.items() if (folder / n).is_file()} == {0o644}, modes
        assert folder.stat().st_mode & 0o777 == 0o755
        assert "raw/part-00000.npz" in modes and "skipped.jsonl" in modes


def test_failed_add_leaves_the_live_gallery_byte_identical(scenario, tmp_path, monkeypatch):
    """An error after skipped.jsonl and the new shards are written (the manifest write fails):
    every byte of the live gallery, skipped.jsonl included, is what it was."""
    g = _copy(scenario, tmp_path)
    before = tree(g)

    def full_disk(folder, manifest):
        assert "broken-add" in (Path(folder) / "skipped.jsonl").read_text()  # it was written
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(build_module, "write_manifest", full_disk)
    with pytest.raises(StorageError, match="No space left"):
        add(g, str(scenario.lists["add"]))
    assert tree(g) == before
    assert not leftovers(g)
    verify_gallery(g)


def test_add_on_a_full_disk_leaves_the_live_gallery_byte_identical(scenario, tmp_path):
    """The same on a real full file system: a tmpfs with room for the gallery and half of
    what the add writes (measured by the same add on an ordinary disk)."""

    def blocks(files: dict[str, bytes]) -> int:  # tmpfs gives each file whole pages
        return sum(-(-len(b) // 4096) * 4096 for b in files.values())

    probe = _copy(scenario, tmp_path)
    add(probe, str(scenario.lists["add"]))
    grows = blocks(tree(probe)) - blocks(tree(scenario.base))
    assert grows > 4 * 4096, grows
    mnt = tmp_path / "small-disk"
    mnt.mkdir()
    size = blocks(tree(scenario.base)) + grows // 2
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        g = mnt / "gallery"
        shutil.copytree(scenario.base, g)
        before = tree(g)
        with pytest.raises(StorageError, match="No space left"):
            add(g, str(scenario.lists["add"]))
        assert tree(g) == before
        assert not leftovers(g)
        verify_gallery(g)
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_verify_refuses_edited_server_side_files(scenario, tmp_path):
    """skipped.jsonl, build.json and the raw parts are in the manifest with their sha256."""
    g = _copy(scenario, tmp_path)
    names = json.loads((g / "manifest.json").read_text())["files"]
    assert {"skipped.jsonl", "build.json", "raw/part-00000.npz"} <= set(names)
    for name, edit in (
        ("skipped.jsonl", b'{"id": "smuggled", "position": 0, "reason": "x"}\n'),
        ("build.json", b" "),
        ("raw/part-00001.npz", b"\0"),
    ):
        original = (g / name).read_bytes()
        with open(g / name, "ab") as f:
            f.write(edit)
        with pytest.raises(GalleryError, match=name.replace(".", r"\.")):
            verify_gallery(g)
        (g / name).write_bytes(original)
    verify_gallery(g)


def test_remove_twice_reports_already_removed(scenario, tmp_path):
    g = _copy(scenario, tmp_path)
    first = remove(g, ["item-3", "item-4", "no-such-id"])
    assert first == {
        "removed": 2,
        "already_removed": [],
        "not_found": ["no-such-id"],
        "items": 298,
    }
    state = gallery_state(g)
    second = remove(g, ["item-3", "item-5"])
    assert second == {"removed": 1, "already_removed": ["item-3"], "not_found": [], "items": 297}
    third = remove(g, ["item-3", "item-4"])
    assert third["removed"] == 0 and third["already_removed"] == ["item-3", "item-4"]
    assert gallery_state(g)["shards"] != state["shards"]
    with pytest.raises(build_module.DataError, match="none of the ids"):
        remove(g, ["no-such-id"])


def test_leftovers_of_a_killed_run_are_recovered_before_the_work(scenario, tmp_path):
    """A leftover .G.old and .G.staging (and a .tmp inside) do not fail the next change."""
    g = _copy(scenario, tmp_path)
    shutil.copytree(g, g.with_name(".live.old"))
    shutil.copytree(g, staging_path(g))
    (g / ".manifest.json.abc123.tmp").write_bytes(b"half")
    result = remove(g, ["item-7"])
    assert result["removed"] == 1
    assert not leftovers(g)
    verify_gallery(g)


def test_a_busy_gallery_refuses_a_second_add_before_any_work(scenario, tmp_path):
    g = _copy(scenario, tmp_path)
    before = tree(g)
    with folder_lock(g), pytest.raises(BusyError, match=f"pid {os.getpid()}"):
        add(g, str(scenario.lists["add"]))
    assert tree(g) == before


def test_kill_9_during_build_add_and_remove_leaves_old_or_new(scenario, tmp_path):
    """The real CLI, SIGKILLed at named steps: mid-encode of a build (then --resume finishes
    it), just before and just after the swap of an add, mid-remove."""
    new = {}
    for op in ("build", "add", "remove"):
        ref = scenario.fresh(op, tmp_path / f"ref-{op}") if op != "build" else None
        ref = ref or tmp_path / f"ref-{op}" / "gallery"
        scenario.api(op, ref)
        new[op] = gallery_state(ref)
    for op, point, expected in (
        ("build", "replace#3", None),
        ("add", "_exchange#1", "old"),
        ("add", "rmtree#1", "new"),
        ("remove", "replace#2", "old"),
    ):
        row = kill_point(scenario, op, point, new[op], tmp_path / "point")
        assert row["killed"], row
        assert row["after_kill"] == (expected or "old"), row
        assert row["ok"], row
