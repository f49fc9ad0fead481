"""The one error map of the CLIs and the one file layer: atomic writes, modes, bounded JSON."""

from __future__ import annotations

import errno
import json
import os
import stat
import subprocess
import sys

import click
import pytest
from click.testing import CliRunner

from query_sdk import errors
from query_sdk.fileio import (
    atomic_write,
    parse_json,
    read_json,
    read_regular_file,
    remove_temp_files,
    write_json_atomic,
)


def _command(exc: BaseException):
    @click.command()
    @errors.cli_errors
    def cmd() -> None:
        raise exc

    return cmd


@pytest.mark.parametrize(
    "exc",
    [
        errors.FormatError("g/manifest.json: missing key 'dim'"),
        errors.SignatureError("g/manifest.sig: does not match"),
        errors.CheckpointError("m/config.json: missing key 'identity'"),
        errors.TrustError("m: would import subprocess:run"),
        errors.DataError("imgs/a.png: cannot decode"),
        errors.ExportError("onnx cannot take op x"),
        errors.BackendError("coreml needs macOS"),
        errors.BusyError("g is locked"),
        errors.StorageError("g/x: disk full"),
    ],
)
def test_known_errors_are_one_line_with_their_exit_code(exc):
    r = CliRunner().invoke(_command(exc))
    assert r.exit_code == type(exc).exit_code
    assert r.output == f"error: {exc}\n"


def test_exit_codes_tell_the_kinds_apart():
    kinds = [
        errors.CmceError,
        errors.FormatError,
        errors.SignatureError,
        errors.CheckpointError,
        errors.DataError,
        errors.ExportError,
        errors.BackendError,
        errors.BusyError,
        errors.StorageError,
    ]
    assert len({k.exit_code for k in kinds}) == len(kinds)


def test_a_full_disk_is_one_line_but_a_bug_keeps_its_traceback():
    full = OSError(errno.ENOSPC, "No space left on device", "/g/shard-00000.hnsw")
    r = CliRunner().invoke(_command(full))
    assert r.exit_code == errors.StorageError.exit_code and "No space left" in r.output
    for bug in (ValueError("bad"), KeyError("identity"), FileNotFoundError(2, "gone")):
        r = CliRunner().invoke(_command(bug))
        assert r.exit_code == 1 and r.exception is bug  # not swallowed into "error: ..."


def test_debug_variable_shows_the_traceback(monkeypatch):
    monkeypatch.setenv("CMCE_DEBUG", "1")
    r = CliRunner().invoke(_command(errors.FormatError("x")))
    assert isinstance(r.exception, errors.FormatError)


def test_atomic_write_gets_the_umask_mode_and_replaces_whole(tmp_path):
    target = tmp_path / "manifest.json"
    target.write_text("old")
    old_mask = os.umask(0o022)
    try:
        write_json_atomic(target, {"b": 1, "a": [1, 2]})
    finally:
        os.umask(old_mask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    assert target.read_text() == json.dumps({"a": [1, 2], "b": 1}, indent=2) + "\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json"]


def test_a_failed_atomic_write_keeps_the_old_file_and_no_temp(tmp_path):
    target = tmp_path / "skipped.jsonl"
    target.write_text("old\n")
    with pytest.raises(RuntimeError), atomic_write(target) as f:
        f.write(b"half")
        raise RuntimeError("killed mid-write")
    assert target.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["skipped.jsonl"]


def test_a_full_disk_is_a_storage_error_naming_the_file(tmp_path):
    target = tmp_path / "shard.meta.npz"
    with pytest.raises(errors.StorageError, match="shard.meta.npz"), atomic_write(target) as f:
        f.write(b"x")
        raise OSError(errno.ENOSPC, "No space left on device")
    assert not target.exists() and list(tmp_path.iterdir()) == []


def test_leftover_temp_files_are_removed(tmp_path):
    (tmp_path / ".manifest.json.abc123.tmp").write_text("half")
    (tmp_path / "keep.tmp").write_text("a user's file")
    removed = remove_temp_files(tmp_path)
    assert [p.name for p in removed] == [".manifest.json.abc123.tmp"]
    assert [p.name for p in tmp_path.iterdir()] == ["keep.tmp"]


@pytest.mark.parametrize("text", ["[" * 100_000 + "]" * 100_000, '{"a":' * 100_000, "[" * 5000])
def test_deep_json_is_refused_without_recursion(text):
    with pytest.raises(errors.FormatError, match="nested deeper than 64"):
        parse_json(text, "manifest.json")


def test_json_within_the_depth_limit_parses_and_strings_do_not_count():
    doc = {"a": "[[[[[[[[[[" * 20, "b": [[[[1]]]]}
    assert parse_json(json.dumps(doc), "x") == doc


@pytest.mark.parametrize("bad", [b"\xff\xfe", b'{"a": NaN}', b'{"a": 1', b""])
def test_bad_json_names_the_file(bad):
    with pytest.raises(errors.FormatError, match="^cfg.json: not valid JSON"):
        parse_json(bad, "cfg.json")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_a_fifo_is_refused_without_hanging(tmp_path):
    fifo = tmp_path / "manifest.json"
    os.mkfifo(fifo)
    code = (
        "import sys\nfrom query_sdk.fileio import read_json\n"
        "from query_sdk.errors import CmceError\n"
        "try:\n    read_json(sys.argv[1])\nexcept CmceError as e:\n    print(e)\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code, str(fifo)], capture_output=True, text=True, timeout=30
    )
    assert "not a regular file" in r.stdout


def test_reads_are_bounded_by_size(tmp_path):
    big = tmp_path / "manifest.json"
    big.write_bytes(b" " * 2000)
    with pytest.raises(errors.FormatError, match="2000 bytes, more than the 1000"):
        read_regular_file(big, 1000, "manifest")
    with pytest.raises(errors.FormatError, match="missing"):
        read_json(tmp_path / "nothing.json")
