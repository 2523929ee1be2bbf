"""Stop requests for a training run: SIGINT/SIGTERM or a stop file, collected and checked between steps (the loop
in :mod:`separeg.runtime.training` checkpoints, then ends the run).

May import: the standard library only.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

__all__ = ["StopRequest"]


class StopRequest:
    """Collects stop requests: SIGINT/SIGTERM (first one only; a second Ctrl-C interrupts at once) or a stop file.

    Slicer stops a background run by creating the stop file (Windows has no SIGTERM for a process tree).
    """

    def __init__(self, stop_file: str | Path | None = None) -> None:
        self.stop_file = Path(stop_file) if stop_file else None
        self.signalled: str | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopRequest:
        if self.stop_file is not None and self.stop_file.exists():
            self.stop_file.unlink()  # a stale file from the last stop must not end this run at once
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. inside a test runner thread): stop file only
                pass
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: object) -> None:
        self.signalled = signal.Signals(signum).name
        signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))
        # Acknowledged at once (a step can take a minute): stderr, so --json's stdout stays JSON lines.
        again = "; Ctrl-C again interrupts at once" if signum == signal.SIGINT else ""
        os.write(2, f"\n{self.signalled} received: stopping after this step, a checkpoint follows{again}\n".encode())

    @property
    def requested(self) -> str | None:
        if self.signalled:
            return self.signalled
        if self.stop_file is not None and self.stop_file.exists():
            return f"stop file {self.stop_file}"
        return None
