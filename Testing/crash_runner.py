"""Run the ``separeg`` CLI and SIGKILL it half-way through one chosen file write (crash-resume tests).

Usage::

    SEPAREG_KILL_DURING=torch.save:best.pt:1 python Testing/crash_runner.py finetune DATA --out RUN ...

``SEPAREG_KILL_DURING`` is ``FUNCTION:MATCH:N``: the Nth call of ``torch.save`` or ``numpy.savez_compressed``
whose destination contains ``MATCH`` serialises in memory, writes the first half of the bytes to its real
destination (the temporary file of an atomic write), flushes and kills this process with SIGKILL: what a
power cut or the OOM killer leaves in the middle of a write. ``progress:STAGE:STEP:PASS`` kills when STAGE
reports STEP in its PASS-th pass (for stages too quick to kill from outside). Timing plays no part.
"""

from __future__ import annotations

import io
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch


def _destination(target: object) -> str:
    """The file a save goes to: a path, a file object, or separeg's hashing writer around a file object."""
    if isinstance(target, (str, os.PathLike)):
        return str(target)
    inner = getattr(target, "file", target)
    return str(getattr(inner, "name", inner))


def _write_half_and_die(data: bytes, target: object) -> None:
    half = data[: len(data) // 2]
    if hasattr(target, "write"):
        target.write(half)
        target.flush()
    else:
        Path(target).write_bytes(half)
    os.kill(os.getpid(), signal.SIGKILL)


def _faulty(real: Callable, match: str, nth: int, target_arg: int,
            save_to_buffer: Callable[[io.BytesIO, tuple, dict], None]) -> Callable:
    """``real`` with the fault: ``target_arg`` is the position of the destination among its arguments."""
    calls = 0

    def save(*args, **kwargs):
        nonlocal calls
        target = args[target_arg]
        if match in _destination(target):
            calls += 1
            if calls == nth:
                buffer = io.BytesIO()
                save_to_buffer(buffer, args, kwargs)
                _write_half_and_die(buffer.getvalue(), target)
        return real(*args, **kwargs)

    return save


def _kill_at_progress(stage: str, step: int, nth_pass: int) -> None:
    """SIGKILL when ``stage`` reports ``step`` in its ``nth_pass`` (a pass restarts when the step goes down, e.g.
    the next volume of the sis stage); before any throttling, so however quick the stage."""
    from separeg.runtime.events import Events

    real = Events.progress
    passes, last = 0, None

    def progress(self, name: str, at: int, total: int, **kwargs) -> None:
        nonlocal passes, last
        if name == stage:
            passes += 1 if last is None or at < last else 0
            last = at
            if passes == nth_pass and at >= step:
                os.kill(os.getpid(), signal.SIGKILL)
        real(self, name, at, total, **kwargs)

    Events.progress = progress


def install(spec: str) -> None:
    function, match, nth, *rest = spec.split(":")
    if function == "progress":
        _kill_at_progress(match, int(nth), int(rest[0]) if rest else 1)
    elif function == "torch.save":
        real = torch.save
        torch.save = _faulty(real, match, int(nth), 1, lambda buf, a, k: real(a[0], buf, *a[2:], **k))
    elif function == "numpy.savez_compressed":
        real = np.savez_compressed
        np.savez_compressed = _faulty(real, match, int(nth), 0, lambda buf, a, k: real(buf, *a[1:], **k))
    else:
        raise SystemExit(f"SEPAREG_KILL_DURING: unknown function {function!r}")


if __name__ == "__main__":
    if os.environ.get("SEPAREG_KILL_DURING"):
        install(os.environ["SEPAREG_KILL_DURING"])
    from separeg.cli import main

    sys.exit(main(sys.argv[1:]))
