"""The one error hierarchy of cmce, and the one way every CLI reports it.

Every error that bad input, a damaged file or an unsuitable environment can cause is a
:class:`CmceError`; its message names the file, the value and the fix. Anything else that
escapes is a bug and keeps its traceback.

>>> try:
...     raise FormatError("manifest.json: missing key 'dim'")
... except CmceError as e:
...     (type(e).__name__, e.exit_code)
('FormatError', 2)
"""

from __future__ import annotations

import errno
import functools
import os
import sys
from collections.abc import Callable
from typing import TypeVar

__all__ = [
    "CmceError",
    "FormatError",
    "SignatureError",
    "CheckpointError",
    "TrustError",
    "DataError",
    "ExportError",
    "BackendError",
    "BusyError",
    "StorageError",
    "cli_errors",
]


class CmceError(Exception):
    """Base of every expected failure; ``exit_code`` is what the CLIs exit with."""

    exit_code = 1


class FormatError(CmceError):
    """A file is not what its format says: a gallery, bundle, shard, sidecar or manifest that
    is missing, damaged, crafted or inconsistent."""

    exit_code = 2


class SignatureError(FormatError):
    """A manifest signature is missing, malformed or does not verify."""

    exit_code = 3


class CheckpointError(CmceError):
    """A model or heads folder is missing, damaged or does not fit what it is used with."""

    exit_code = 4


class TrustError(CheckpointError):
    """A checkpoint would import or run code, and nobody said to trust it."""


class DataError(CmceError):
    """Input data cannot be used: an image, an image folder, a dataset, a class split."""

    exit_code = 5


class ExportError(CmceError):
    """An export cannot go on: a model a target cannot take, or an artifact that fails its
    check."""

    exit_code = 6


class BackendError(CmceError):
    """A model runtime is missing, cannot run on this machine, or refuses an artifact."""

    exit_code = 7


class BusyError(CmceError):
    """Another process holds the lock of a gallery being changed."""

    exit_code = 8


class StorageError(CmceError):
    """Writing failed (disk full, read-only, no permission); nothing already there was lost."""

    exit_code = 9


# OS conditions of the machine, not of our code: one line, not a traceback.
_OS_CONDITIONS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}

F = TypeVar("F", bound=Callable)


def cli_errors(fn: F) -> F:
    """Decorate a CLI command: a :class:`CmceError` (and a full disk, read-only or
    forbidden path) becomes ``error: <message>`` on stderr and the class's exit code;
    Ctrl-C exits 130. Anything else keeps its traceback (a bug is a bug). ``CMCE_DEBUG=1``
    shows tracebacks for everything."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            sys.exit(130)
        except (CmceError, OSError) as e:
            if os.environ.get("CMCE_DEBUG") or (
                isinstance(e, OSError) and e.errno not in _OS_CONDITIONS
            ):
                raise
            code = e.exit_code if isinstance(e, CmceError) else StorageError.exit_code
            print(f"error: {e}", file=sys.stderr)
            sys.exit(code)

    return wrapper  # type: ignore[return-value]
