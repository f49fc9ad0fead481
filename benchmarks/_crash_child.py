"""The child of :mod:`benchmarks.crash_safety`: the real ``cmce-build-gallery`` CLI with its
file-system steps counted, killed (SIGKILL) or paused at one of them.

Environment (read only by this harness, never by cmce):
``CMCE_TEST_KILL_AT`` / ``CMCE_TEST_PAUSE_AT``: a point, ``17`` (the 17th step) or
``rename#2`` (the 2nd ``rename``); the pause point is followed by ``@FILE``: the child creates
``FILE.paused`` and waits until ``FILE.go`` exists. ``CMCE_TEST_STEPS_FILE``: write the steps
there at exit. ``CMCE_TEST_NO_EXCHANGE``: use the two-rename fallback swap.
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import query_sdk.fileio as fileio

STEPS = {os: ("replace", "rename", "link", "unlink", "rmdir", "mkdir", "fsync")}
STEPS[shutil] = ("rmtree",)
STEPS[fileio] = ("_exchange",)


def _point(spec: str) -> tuple[str, int]:
    name, _, n = spec.rpartition("#")
    return name, int(n or 0)


def install() -> list[str]:
    """Count every step from now on; returns the list the steps are appended to."""
    kill = _point(os.environ.get("CMCE_TEST_KILL_AT", ""))
    pause_spec, _, pause_file = os.environ.get("CMCE_TEST_PAUSE_AT", "").partition("@")
    pause = _point(pause_spec)
    steps: list[str] = []
    seen: dict[str, int] = {}

    def hit(at: tuple[str, int], name: str) -> bool:
        want, n = at
        return n > 0 and (seen[name] == n if want == name else not want and len(steps) == n)

    def counted(module, name: str) -> None:
        real = getattr(module, name)

        def step(*args, **kwargs):
            seen[name] = seen.get(name, 0) + 1
            arg = args[0] if args else ""
            shown = os.path.basename(arg) if isinstance(arg, (str, os.PathLike)) else arg
            steps.append(f"{name} {shown}")
            if hit(kill, name):
                os.kill(os.getpid(), signal.SIGKILL)
            if hit(pause, name):
                Path(f"{pause_file}.paused").touch()
                while not Path(f"{pause_file}.go").exists():
                    time.sleep(0.05)
            return real(*args, **kwargs)

        setattr(module, name, step)

    if os.environ.get("CMCE_TEST_NO_EXCHANGE"):
        fileio._exchange = lambda a, b: False
    for module, names in STEPS.items():
        for name in names:
            counted(module, name)
    return steps


if __name__ == "__main__":
    import gallery_builder.gallery.build  # noqa: F401  (imported before counting starts)
    from gallery_builder.cli.build import main

    counted_steps = install()
    if os.environ.get("CMCE_TEST_STEPS_FILE"):
        out = Path(os.environ["CMCE_TEST_STEPS_FILE"])
        atexit.register(lambda: out.write_text("\n".join(counted_steps)))
    sys.argv = ["cmce-build-gallery", *sys.argv[1:]]
    main()
