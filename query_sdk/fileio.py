"""The one file layer: atomic writes, bounded reads of regular files, JSON with bounded depth.

Every file cmce writes goes through :func:`atomic_write` (or a helper on top of it): a temp file
in the same folder, fsync of the file, ``os.replace`` over the final name, fsync of the folder.
A crash leaves either the old file or the new one, plus at most a ``.<name>.<random>.tmp`` that
:func:`remove_temp_files` clears. Written files get the modes the umask gives (0644 under the
usual 022), so a web server running as another user can serve a gallery.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import stat
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from .errors import FormatError, StorageError

__all__ = [
    "TEMP_SUFFIX",
    "atomic_path",
    "atomic_write",
    "write_bytes_atomic",
    "write_json_atomic",
    "json_text",
    "fsync_dir",
    "umask_mode",
    "check_regular_file",
    "read_regular_file",
    "parse_json",
    "read_json",
    "remove_temp_files",
]

TEMP_SUFFIX = ".tmp"
MAX_JSON_DEPTH = 64
MAX_JSON_BYTES = 64 << 20
_STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO}


def umask_mode(base: int = 0o666) -> int:
    """``base`` with the process umask applied (0o644 for files under the usual 022)."""
    mask = os.umask(0)
    os.umask(mask)
    return base & ~mask


def fsync_dir(folder: str | os.PathLike[str]) -> None:
    """fsync a folder so that renames inside it survive a power cut (no-op where unsupported)."""
    with contextlib.suppress(OSError, AttributeError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """A temp path beside ``path`` for a writer that takes a file name; on success it
    replaces ``path``.

    The temp file is fsynced, given the umask's mode, ``os.replace``d over ``path`` and the
    folder fsynced. On any error the temp file is removed and ``path`` is untouched; a full
    disk, read-only folder or missing permission raises :class:`StorageError` naming ``path``.
    """
    path = Path(path)
    try:
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
        os.close(fd)
    except OSError as exc:
        raise StorageError(f"{path}: cannot write here: {exc.strerror or exc}") from exc
    tmp = Path(name)
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.chmod(tmp, umask_mode())
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(exc, OSError) and exc.errno in _STORAGE_ERRNOS:
            raise StorageError(f"{path}: writing failed: {exc.strerror or exc}") from exc
        raise
    fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike[str], mode: str = "wb") -> Iterator[IO]:
    """Open a temp file beside ``path`` for writing; on success it replaces ``path``
    (see :func:`atomic_path`)."""
    with (
        atomic_path(path) as tmp,
        open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f,
    ):
        yield f


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_write`)."""
    with atomic_write(path) as f:
        f.write(data)


def json_text(obj: Any) -> str:
    """The canonical JSON text of cmce's files: sorted keys, indent 2, no NaN, newline."""
    return json.dumps(obj, sort_keys=True, indent=2, allow_nan=False) + "\n"


def write_json_atomic(path: str | os.PathLike[str], obj: Any) -> None:
    """Write ``obj`` as canonical JSON (:func:`json_text`) to ``path`` atomically."""
    write_bytes_atomic(path, json_text(obj).encode("utf-8"))


def check_regular_file(
    path: str | os.PathLike[str],
    what: str = "file",
    error: Callable[[str], Exception] = FormatError,
) -> os.stat_result:
    """``stat`` of ``path`` if it is a regular file (following symlinks); otherwise ``error``
    naming it: a FIFO, device or folder would hang or mislead a reader."""
    path = Path(path)
    try:
        st = path.stat()
    except FileNotFoundError:
        raise error(f"{path}: {what} missing") from None
    except OSError as exc:
        raise error(f"{path}: cannot read the {what}: {exc.strerror or exc}") from None
    if not stat.S_ISREG(st.st_mode):
        raise error(f"{path}: the {what} is not a regular file")
    return st


def read_regular_file(
    path: str | os.PathLike[str],
    max_bytes: int,
    what: str = "file",
    error: Callable[[str], Exception] = FormatError,
) -> bytes:
    """The bytes of a regular file of at most ``max_bytes``; ``error`` naming it otherwise."""
    path = Path(path)
    st = check_regular_file(path, what, error)
    if st.st_size > max_bytes:
        raise error(
            f"{path}: the {what} is {st.st_size} bytes, more than the {max_bytes} "
            "a valid one can have"
        )
    with open(path, "rb") as f:
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise error(f"{path}: the {what} grew past {max_bytes} bytes while being read")
    return data


_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_INNERMOST = re.compile(r"\[\]|\{\}")


def _deeper_than(text: str, limit: int) -> bool:
    """Whether JSON ``text`` nests arrays/objects deeper than ``limit`` (strings skipped):
    each pass of C-speed regexes peels the innermost level, at most ``limit + 1`` passes."""
    brackets = _NOT_BRACKET.sub("", _STRING.sub("", text))
    for _ in range(limit):
        peeled = _INNERMOST.sub("", brackets)
        if peeled == brackets:  # empty, or unbalanced: the JSON parser says what is wrong
            return False
        brackets = peeled
    return bool(brackets)


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"non-finite number {name} is not JSON")


def parse_json(
    data: bytes | str,
    where: str,
    error: Callable[[str], Exception] = FormatError,
    max_depth: int = MAX_JSON_DEPTH,
) -> Any:
    """Parse JSON from an untrusted file: UTF-8, no NaN/Infinity, nesting at most
    ``max_depth`` (checked before parsing, so a deep file cannot exhaust the stack);
    ``error`` naming ``where`` otherwise."""
    try:
        text = data.decode("utf-8") if isinstance(data, bytes) else data
    except UnicodeDecodeError as exc:
        raise error(f"{where}: not valid JSON (not UTF-8 text: {exc})") from None
    if _deeper_than(text, max_depth):
        raise error(f"{where}: JSON nested deeper than {max_depth} levels")
    try:
        return json.loads(text, parse_constant=_refuse_constant)
    except RecursionError:  # unbalanced and deep: the peeling above cannot see it
        raise error(f"{where}: JSON nested deeper than {max_depth} levels") from None
    except ValueError as exc:
        raise error(f"{where}: not valid JSON: {exc}") from None


def read_json(
    path: str | os.PathLike[str],
    what: str = "JSON file",
    error: Callable[[str], Exception] = FormatError,
    max_bytes: int = MAX_JSON_BYTES,
) -> Any:
    """:func:`parse_json` of a regular file of at most ``max_bytes``."""
    data = read_regular_file(path, max_bytes, what, error)
    return parse_json(data, str(path), error)


def remove_temp_files(folder: str | os.PathLike[str]) -> list[Path]:
    """Delete the ``.<name>.<random>.tmp`` files :func:`atomic_write` leaves after a crash in
    ``folder`` (not recursive); returns what was removed."""
    removed = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    for p in folder.iterdir():
        if p.name.startswith(".") and p.name.endswith(TEMP_SUFFIX) and p.is_file():
            with contextlib.suppress(OSError):
                p.unlink()
                removed.append(p)
    return removed
