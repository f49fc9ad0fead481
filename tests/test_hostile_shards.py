"""Hostile shards (issue 12): the loader proves an index's structure before hnswlib reads it,
and a sidecar's headers before it inflates them.

Every crafted gallery is opened and searched in a subprocess (tests/corpus/open_and_search.py),
so that a loader that crashes natively fails these tests by a signal instead of killing pytest.
"""

from __future__ import annotations

import json
import re
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from query_sdk import gallery_format as gf
from query_sdk.errors import FormatError

CORPUS = Path(__file__).parent / "corpus"
sys.path.insert(0, str(CORPUS))
import make_shards as corpus  # noqa: E402

LISTING = json.loads((CORPUS / "cases.json").read_text())
REPO = Path(__file__).parents[1]


def open_in_subprocess(folders: list[Path]) -> dict[str, dict]:
    """``{folder: result}`` of open_and_search.py; a folder that kills the process is
    ``{"result": "crash", "signal"}`` (or ``"exception"`` with the traceback), and the run goes
    on with the next folder."""
    results: dict[str, dict] = {}
    todo = [str(f) for f in folders]
    while todo:
        run = subprocess.run(
            [sys.executable, str(CORPUS / "open_and_search.py"), *todo],
            capture_output=True,
            text=True,
            timeout=600,
        )
        started = None
        for line in run.stdout.splitlines():
            d = json.loads(line)
            if d.pop("started", False):
                started = d["folder"]
            else:
                results[d.pop("folder")] = d
        if run.returncode == 0:
            break
        results[started] = (
            {"result": "crash", "signal": -run.returncode}
            if run.returncode < 0
            else {"result": "exception", "stderr": run.stderr[-2000:]}
        )
        todo = todo[todo.index(started) + 1 :]
    return results


def assert_refused(result: dict, file: str) -> None:
    """A FormatError (exit code 2) whose one-line message starts with the file's name."""
    assert result["result"] == "refused", result
    assert "FormatError" in result["bases"] and result["exit_code"] == FormatError.exit_code
    assert result["message"].split(": ", 1)[0].endswith(file), result["message"]
    assert "\n" not in result["message"]


def assert_searches(result: dict, labels: set[int]) -> None:
    """Loaded, and every query got k = 10 hits, all of them live labels of the gallery."""
    assert result["result"] == "ok", result
    assert result["hits"] == [10] * 8 and set(result["labels"]) <= labels


@pytest.fixture(scope="module")
def corpus_results(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    folders = {
        (kind, name): corpus.materialise(kind, name, root / kind / name)
        for kind in ("cases", "accepted")
        for name in LISTING[kind]
    }
    results = open_in_subprocess(list(folders.values()))
    return {key: results[str(folder)] for key, folder in folders.items()}


BASE_LABELS = set(range(1000, 1000 + corpus.N))


@pytest.mark.parametrize("name", sorted(LISTING["cases"]))
def test_corpus_case_refused(corpus_results, name):
    """Each crafted case (the probe's and more): a FormatError naming the file, never a
    signal and never a search."""
    assert_refused(corpus_results["cases", name], LISTING["cases"][name]["file"])


@pytest.mark.parametrize("name", sorted(LISTING["accepted"]))
def test_corpus_harmless_case_searches(corpus_results, name):
    """Crafted but harmless files (self-link, stale link slots, classes, a deleted item) are
    not over-refused: they load and every search returns 10 live labels."""
    live = BASE_LABELS - ({1009} if name == "one_deleted" else set())
    assert_searches(corpus_results["accepted", name], live)


def test_corpus_is_small_and_covers_the_probe():
    size = sum(p.stat().st_size for p in CORPUS.rglob("*") if p.is_file())
    assert size < 500_000 and len(LISTING["cases"]) >= 50
    levels = corpus.Index.parse((CORPUS / "base" / corpus.INDEX).read_bytes()).levels()
    assert levels.max() >= 2 and (levels == 1).any() and (levels == 0).any()
    assert {"upper_link_to_level0_element", "sidecar_deflated_bomb"} <= set(LISTING["cases"])


def flipped(base: Path, dest: Path, position: int, xor: int) -> Path:
    """``base`` with one byte of its index xor-ed, the manifest re-hashed."""
    dest.mkdir(parents=True)
    index = bytearray((base / corpus.INDEX).read_bytes())
    index[position] ^= xor
    meta = (base / corpus.META).read_bytes()
    (dest / corpus.INDEX).write_bytes(bytes(index))
    (dest / corpus.META).write_bytes(meta)
    (dest / "manifest.json").write_bytes(corpus.manifest(bytes(index), meta))
    return dest


def test_150_random_upper_level_flips(tmp_path):
    """The probe's 150 seeded single-byte flips in the upper-level area (manifest re-hashed;
    4 of 150 crashed the old loader): none crashes; each is refused naming the index, or is
    harmless and every search still returns 10 valid labels."""
    base = CORPUS / "base"
    start = corpus.Index.parse((base / corpus.INDEX).read_bytes()).upper_offset()
    end = (base / corpus.INDEX).stat().st_size
    rng = np.random.default_rng(12)
    positions = rng.integers(start, end, 150)
    xors = rng.integers(1, 256, 150)
    folders = [
        flipped(base, tmp_path / f"flip-{i}", int(p), int(x))
        for i, (p, x) in enumerate(zip(positions, xors, strict=True))
    ]
    results = open_in_subprocess(folders)
    outcomes = [results[str(f)]["result"] for f in folders]
    assert set(outcomes) <= {"refused", "ok"}, sorted(set(outcomes))
    for folder in folders:
        result = results[str(folder)]
        if result["result"] == "refused":
            assert_refused(result, corpus.INDEX)
        else:
            assert_searches(result, BASE_LABELS)
    assert outcomes.count("refused") > 100  # most flips in link data break a proof


def sidecar_case(tmp_path: Path, name: str, meta: bytes) -> Path:
    dest = corpus.materialise("cases", "sidecar_not_a_zip", tmp_path / name)
    index = (dest / corpus.INDEX).read_bytes()
    (dest / corpus.META).write_bytes(meta)
    (dest / "manifest.json").write_bytes(corpus.manifest(index, meta))
    return dest


def test_sidecar_bomb_refused_in_bounded_memory(tmp_path):
    """A 256 KB sidecar whose labels.npy deflates to 256 MiB (the probe's 1.9 MB -> 2 GB took
    2.2 GB and 11 s): refused from the zip directory before a byte is inflated, in a fraction
    of a second and without the process growing by more than a few MB."""
    base_meta = (CORPUS / "base" / corpus.META).read_bytes()
    bomb = sidecar_case(tmp_path, "bomb", corpus.deflated_bomb(base_meta, "labels", 256 << 20))
    plain = corpus.materialise("accepted", "with_classes", tmp_path / "plain")
    assert (bomb / corpus.META).stat().st_size < 1 << 20
    peak = {}
    for folder in (plain, bomb):  # one process each: ru_maxrss is a process's peak
        (result,) = open_in_subprocess([folder]).values()
        peak[folder.name] = result["maxrss_kb"]
        if folder is bomb:
            assert_refused(result, corpus.META)
            assert "compressed" in result["message"] and result["seconds"] < 1.0
    assert peak["bomb"] < peak["plain"] + 20_000, peak  # KiB: far below 256 MiB


def deep_payload(depth: int) -> np.ndarray:
    return np.array(['{"a":' + "[" * depth + "]" * depth + "}"] + [""] * (corpus.N - 1))


def test_deep_and_huge_payloads_refused(tmp_path):
    """Payload JSON nested 1000 deep (a RecursionError for json.loads in a smaller stack) is
    refused by the bounded-depth parser; nested 100k deep, its item is over the 64 KiB a
    sidecar holds per payload and is refused from the .npy header."""
    arrays = corpus.read_arrays((CORPUS / "base" / corpus.META).read_bytes())
    folders = [
        sidecar_case(tmp_path, f"deep-{d}", corpus.sidecar({**arrays, "payload": deep_payload(d)}))
        for d in (1000, 100_000)
    ]
    results = open_in_subprocess(folders)
    deep, huge = (results[str(f)] for f in folders)
    assert_refused(deep, corpus.META)
    assert "payload[0]: JSON nested deeper than 64 levels" in deep["message"]
    assert_refused(huge, corpus.META)
    assert "array 'payload' refused: dtype <U200006" in huge["message"]


def test_trailing_megabyte_refused_before_it_is_read(tmp_path):
    """1 MiB appended to an index: refused from the header and the file size, before the
    body is read (more than any element count of the header's levels could take)."""
    dest = corpus.materialise("cases", "trailing_bytes", tmp_path / "trailing")
    index = (CORPUS / "base" / corpus.INDEX).read_bytes() + bytes(1 << 20)
    meta = (dest / corpus.META).read_bytes()
    (dest / corpus.INDEX).write_bytes(index)
    (dest / "manifest.json").write_bytes(corpus.manifest(index, meta))
    (result,) = open_in_subprocess([dest]).values()
    assert_refused(result, corpus.INDEX)
    assert "(trailing bytes)" in result["message"]


def test_classes_written_read_and_kept(tmp_path):
    """write_shard(classes=...) stores them in the sidecar, read_meta returns them, deleting
    items keeps them; a sidecar without them (every older gallery) reads as None."""
    rng = np.random.default_rng(0)
    v = rng.standard_normal((6, 4)).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    ids, classes = [f"x{i}" for i in range(6)], ["cat", "dog", "", "cat", "émeu", "dog"]
    shard = gf.write_shard(
        tmp_path, 0, v, np.arange(6), ids, np.zeros(6), None, 4, 20, classes=classes
    )
    assert gf.read_meta(tmp_path / shard.meta_file, 6).classes == classes
    after = gf.update_shard_deletions(tmp_path, shard, {1, 2}, 4)
    meta = gf.read_meta(tmp_path / after.meta_file, 6)
    assert meta.classes == classes and meta.deleted.tolist() == [0, 1, 1, 0, 0, 0]
    assert gf.read_meta(CORPUS / "base" / corpus.META).classes is None
    with pytest.raises(
        gf.GalleryError, match=r"array 'ids' refused: shape \(64,\), expected \(6,\)"
    ):
        gf.read_meta(CORPUS / "base" / corpus.META, 6)


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(classes=["a"] * 5), "classes must be a list of 6 strings"),
        (dict(classes=["a"] * 5 + ["b" * 1025]), r"classes\[5\] must be a string .* at most 1024"),
        (dict(ids=[f"x{i}" for i in range(5)] + ["y" * 1025]), r"ids\[5\] must be .* at most 1024"),
        (dict(payload=[None] * 5 + [{"a": "b" * 70000}]), r"payload\[5\] is 70008 characters"),
    ],
)
def test_write_shard_refuses_what_the_reader_would(tmp_path, change, message):
    """The writer refuses what the reader's bounds refuse, so a build never writes a gallery
    its own SDK cannot open."""
    v = np.eye(6, 4, dtype=np.float32) + np.eye(6, 4, k=-4, dtype=np.float32)
    args = dict(ids=[f"x{i}" for i in range(6)], payload=None, classes=None) | change
    with pytest.raises(ValueError, match=message):
        gf.write_shard(
            tmp_path, 0, v, np.arange(6), uncertainty=np.zeros(6), M=4, ef_construction=20, **args
        )


def _inherited_rss_mb() -> int:
    """Linux keeps a process's peak RSS across fork + exec, so the fuzzer's own measure starts
    from this (torch-laden) pytest process's peak: its memory limit must sit on top of it."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024


def test_fuzz_target_short_run(tmp_path):
    """The atheris target over manifest + index + sidecar runs clean for a few seconds: every
    mutated gallery is refused with a CmceError or searched; nothing else escapes."""
    pytest.importorskip("atheris")
    run = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "fuzz_loader.py"),
            "-max_total_time=10",
            f"-rss_limit_mb={_inherited_rss_mb() + 1024}",
            f"-artifact_prefix={tmp_path}/",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    done = re.search(r"Done (\d+) runs in (\d+) second", run.stderr)
    assert done and int(done[1]) > 1000, run.stderr[-3000:]
    for finding in ("Uncaught Python exception", "deadly signal", "==ERROR", "Timeout"):
        assert finding not in run.stderr
    assert not list(tmp_path.glob("crash-*")) and not list(tmp_path.glob("oom-*"))
