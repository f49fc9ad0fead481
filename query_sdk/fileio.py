"""The one file layer: atomic writes, folder transactions, bounded reads, bounded JSON.

Every file cmce writes goes through :func:`atomic_write` (or a helper on top of it): a temp file
in the same folder, fsync of the file, ``os.replace`` over the final name, fsync of the folder.
A crash leaves either the old file or the new one, plus at most a ``.<name>.<random>.tmp`` that
:func:`remove_temp_files` clears. Written files get the modes the umask gives (0644 under the
usual 022), so a web server running as another user can serve a gallery.

A folder that must change all-or-nothing (a gallery, a bundle) changes in a
:func:`folder_transaction`: under a lock it is staged as ``.<name>.staging`` beside it, changed
there, and swapped in whole. The path stays a real folder, never a symlink or missing, so the
SDK, the CLI, ``scp`` and static-file serving need to know nothing of this; see
:func:`folder_transaction` for the swap and its recovery.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import json
import os
import re
import shutil
import socket
import stat
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any, Literal

from .errors import BusyError, FormatError, StorageError

__all__ = [
    "TEMP_SUFFIX",
    "atomic_path",
    "atomic_write",
    "write_bytes_atomic",
    "write_json_atomic",
    "json_text",
    "fsync_dir",
    "fsync_path",
    "umask_mode",
    "check_regular_file",
    "read_regular_file",
    "parse_json",
    "read_json",
    "remove_temp_files",
    "staging_path",
    "folder_lock",
    "recover_folder",
    "folder_transaction",
]

TEMP_SUFFIX = ".tmp"
STAGING_SUFFIX = ".staging"
OLD_SUFFIX = ".old"
LOCK_SUFFIX = ".lock"
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
        fsync_path(folder)


def fsync_path(path: str | os.PathLike[str]) -> None:
    """fsync the file (or folder) at ``path`` by name, for writers that take a file name."""
    fd = os.open(path, os.O_RDONLY)
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
        fsync_path(tmp)
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


def _is_temp(name: str) -> bool:
    return name.startswith(".") and name.endswith(TEMP_SUFFIX)


def remove_temp_files(folder: str | os.PathLike[str], recursive: bool = False) -> list[Path]:
    """Delete the ``.<name>.<random>.tmp`` files :func:`atomic_write` leaves after a crash in
    ``folder`` (and its sub-folders with ``recursive``); returns what was removed."""
    removed = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    for p in folder.iterdir():
        if recursive and p.is_dir() and not p.is_symlink():
            removed += remove_temp_files(p, recursive)
        elif _is_temp(p.name) and p.is_file():
            with contextlib.suppress(OSError):
                p.unlink()
                removed.append(p)
    return removed


# ------------------------------------------------------------------------ folder transactions
def _beside(path: Path, suffix: str) -> Path:
    return path.with_name(f".{path.name}{suffix}")


def staging_path(path: str | os.PathLike[str]) -> Path:
    """Where :func:`folder_transaction` stages ``path``: ``.<name>.staging`` beside it."""
    return _beside(Path(path), STAGING_SUFFIX)


def _lock_once(lock: Path) -> int | None:
    """An fd holding the flock of ``lock``, or None while another process holds it."""
    import fcntl  # POSIX only; the SDK's readers never lock

    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    try:  # the holder before us may have deleted the file we locked: lock the current one
        same = os.fstat(fd).st_ino == os.stat(lock).st_ino
    except FileNotFoundError:
        same = False
    if not same:
        os.close(fd)
        return _lock_once(lock)
    return fd


@contextlib.contextmanager
def folder_lock(path: str | os.PathLike[str], timeout: float = 0.0) -> Iterator[None]:
    """Hold the lock of folder ``path``: ``fcntl.flock`` on ``.<name>.lock`` beside it.

    A second writer waits up to ``timeout`` seconds (default: none), then gets a
    :class:`BusyError` naming the folder and the pid and host holding it. The lock goes with
    the process (a killed holder releases it; its lock file stays and is reused); the holder
    deletes the lock file when it is done.
    """
    path = Path(path)
    lock = _beside(path, LOCK_SUFFIX)
    deadline = time.monotonic() + timeout
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        while (fd := _lock_once(lock)) is None:
            if time.monotonic() >= deadline:
                try:
                    holder = lock.read_text("utf-8", "replace").strip()
                except OSError:
                    holder = ""
                raise BusyError(
                    f"{path} is being changed by {holder or 'another process'} (lock "
                    f"{lock}); wait until it finishes, then run this again"
                )
            time.sleep(0.05)
    except OSError as exc:
        raise StorageError(f"{lock}: cannot take the lock: {exc.strerror or exc}") from exc
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        yield
    finally:
        with contextlib.suppress(OSError):
            lock.unlink()
        os.close(fd)  # releases the flock


def recover_folder(path: str | os.PathLike[str], keep_staging: bool = False) -> list[str]:
    """Clean up after a transaction on ``path`` that was killed; call it holding the lock.

    A ``.<name>.old`` goes back to ``path`` if ``path`` is missing (killed between the two
    renames of the fallback swap), else it is deleted; a ``.<name>.staging`` (an unfinished
    change) is deleted unless ``keep_staging`` (a build to resume); ``.tmp`` leftovers of
    :func:`atomic_write` are deleted in both. Returns a line per action.
    """
    path = Path(path)
    old, stage = _beside(path, OLD_SUFFIX), staging_path(path)
    done = []
    if old.exists():
        if not path.exists():
            os.rename(old, path)
            done.append(f"restored {path} from {old.name}")
        else:
            shutil.rmtree(old)
            done.append(f"deleted {old.name}")
    if stage.exists() and not keep_staging:
        shutil.rmtree(stage)
        done.append(f"deleted the unfinished {stage.name}")
    for folder in (path, stage):
        done += [f"deleted {p}" for p in remove_temp_files(folder, recursive=True)]
    if done:
        fsync_dir(path.parent)
    return done


def _copy_tree(src: Path, dst: Path, link: Callable[[str], bool]) -> None:
    """Stage ``src`` as ``dst``: files ``link`` accepts (by relative POSIX name) are hard-linked,
    the others copied (fsynced, umask modes); folders get umask modes."""
    dst.mkdir()
    for root, dirs, files in os.walk(src):
        rel = Path(root).relative_to(src)
        for d in dirs:
            (dst / rel / d).mkdir()
        for name in files:
            if _is_temp(name):
                continue
            source, target = Path(root) / name, dst / rel / name
            if link((rel / name).as_posix()):
                os.link(source, target)
                continue
            shutil.copyfile(source, target)
            os.chmod(target, umask_mode())
            fsync_path(target)


@functools.cache
def _renameat2() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # glibc < 2.28, musl without it
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_AT_FDCWD, _RENAME_EXCHANGE = -100, 2


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``);
    False where the system or file system cannot."""
    fn = _renameat2()
    if fn is None:
        return False
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def _swap_in(stage: Path, path: Path) -> None:
    """Make ``stage`` the folder at ``path`` without ever leaving ``path`` missing where the
    system allows it (atomic exchange); elsewhere with two renames that
    :func:`recover_folder` completes or undoes."""
    for root, _, _ in os.walk(stage):
        fsync_dir(root)
    if not path.exists():
        os.rename(stage, path)
    elif _exchange(stage, path):
        fsync_dir(path.parent)
        shutil.rmtree(stage)  # the old folder, now at the staging name
    else:
        old = _beside(path, OLD_SUFFIX)
        os.rename(path, old)
        os.rename(stage, path)
        fsync_dir(path.parent)
        shutil.rmtree(old)
    fsync_dir(path.parent)


@contextlib.contextmanager
def folder_transaction(
    path: str | os.PathLike[str],
    start: Literal["copy", "empty", "resume"] = "copy",
    link: Callable[[str], bool] = lambda name: False,
    keep_on_error: bool = False,
    timeout: float = 0.0,
) -> Iterator[Path]:
    """Change folder ``path`` all-or-nothing: yields a staging folder that replaces ``path``
    when the block succeeds, and is dropped (or kept, with ``keep_on_error``) when it fails.

    Steps: take :func:`folder_lock` (``timeout``: how long a second writer waits before its
    :class:`BusyError`); :func:`recover_folder` what a killed run left; stage ``path`` as
    ``.<name>.staging`` (``start``: ``copy`` of ``path``, ``empty``, or ``resume`` a kept
    staging folder); run the block; fsync; swap in.

    The copy shares no inode that anyone writes: files ``link`` accepts (relative POSIX names)
    are hard-linked and must only ever be *replaced* (:func:`atomic_write` does), never edited in
    place; all other files are copied. Readers keep opening ``path`` itself: the swap is one
    ``renameat2(RENAME_EXCHANGE)`` on Linux, so ``path`` always holds a complete folder (the old
    one or the new one). Where the exchange is unavailable, ``path`` moves to ``.<name>.old``
    and the stage takes its place; a kill between the two renames leaves ``path`` missing for
    readers until the next transaction's recovery puts ``.old`` back. We chose this over
    versioned folders behind a symlink: the gallery stays one plain folder that ``scp``,
    ``rsync -a``, ``tar`` and a static file server (``FollowSymLinks`` off) copy or serve as it
    is, with no old versions to collect. A reader that read the manifest before a swap and a
    shard after it gets a checksum error naming the file (never a crash); opening again reads
    the new gallery. A symlink ``path`` changes the folder it points to.
    """
    path = Path(path)
    if path.is_symlink():  # change the folder it points to; the link stays a link
        path = path.resolve()
    stage = staging_path(path)
    with folder_lock(path, timeout):
        recover_folder(path, keep_staging=start == "resume")
        try:
            if start == "copy":
                if not path.is_dir():
                    raise FormatError(f"{path}: no such folder to change")
                _copy_tree(path, stage, link)
            else:
                if start == "empty" and stage.exists():
                    shutil.rmtree(stage)
                stage.mkdir(exist_ok=True)
        except OSError as exc:
            shutil.rmtree(stage, ignore_errors=True)
            if exc.errno in _STORAGE_ERRNOS:
                raise StorageError(f"{stage}: staging failed: {exc.strerror or exc}") from exc
            raise
        try:
            yield stage
            _swap_in(stage, path)
        except BaseException as exc:
            if not keep_on_error:
                shutil.rmtree(stage, ignore_errors=True)
            if isinstance(exc, OSError) and exc.errno in _STORAGE_ERRNOS:
                raise StorageError(f"{path}: the change failed: {exc.strerror or exc}") from exc
            raise
