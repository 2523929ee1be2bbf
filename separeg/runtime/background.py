"""Run a ``separeg`` command in a background process and read its events: what the Slicer modules build on.

Standard library only (Slicer imports this before it knows whether torch is installed). The process is started
with ``--json``, so every line it prints is one :class:`~separeg.runtime.events.Event`; a reader thread puts the lines
on a queue, and the owner calls :meth:`BackgroundRun.poll` from its own (GUI) thread, e.g. from a 100 ms timer, so
MRML and Qt are only touched on the main thread (SLICER_NOTES §3).

Stopping is portable: :meth:`BackgroundRun.stop` creates the run's stop file, which the training commands check
between steps (they checkpoint, then exit with code 130); a command that does not finish within the grace period,
or one without a stop file (contour), is ended by killing the whole process tree. Killing only the process is
not enough: ``PythonSlicer`` is a launcher whose child is the real Python.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from enum import StrEnum
from pathlib import Path

from separeg.runtime.events import Event, EventType

__all__ = ["RunState", "Signal", "BackgroundRun", "cli_command", "parse_line", "default_python", "core_root",
           "EXIT_CODES", "kill_process_tree"]

logger = logging.getLogger(__name__)

# cli.py's exit codes.
EXIT_CODES = {0: "done", 1: "error", 2: "bad command line", 130: "cancelled"}


class RunState(StrEnum):
    IDLE = "idle"
    RUNNING = "running"
    STOPPING = "stopping"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


class Signal:
    """A pure-Python signal: ``qt.Signal`` crashes PythonQt (SlicerNNUnet's ``Signal.py`` does the same)."""

    def __init__(self, *types: type) -> None:
        self._types = types
        self._slots: list[Callable] = []

    def connect(self, slot: Callable) -> None:
        self._slots.append(slot)

    def disconnect(self, slot: Callable) -> None:
        self._slots.remove(slot)

    def emit(self, *args) -> None:
        for slot in list(self._slots):
            slot(*args)


def default_python() -> str:
    """The interpreter for background runs: Slicer's ``PythonSlicer`` launcher in Slicer, else this Python."""
    import shutil

    return shutil.which("PythonSlicer") or sys.executable


def core_root() -> Path:
    """The folder that holds the ``separeg`` package: the working folder of a background run."""
    return Path(__file__).resolve().parents[2]


def cli_command(python: str | os.PathLike, command: str, *args: str | os.PathLike) -> list[str]:
    """``[python, -m, separeg.cli, command, *args, --json]`` with every argument a string (paths may hold spaces)."""
    return [str(python), "-m", "separeg.cli", command, *(str(a) for a in args), "--json"]


def kill_process_tree(pid: int) -> None:
    """Kill a process and all its descendants, on every platform (psutil when installed)."""
    try:
        import psutil
    except ImportError:
        psutil = None
    if psutil is not None:
        try:
            parent = psutil.Process(pid)
            family = parent.children(recursive=True) + [parent]
        except psutil.NoSuchProcess:
            return
        for proc in family:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(family, timeout=5)
    elif sys.platform == "win32":
        subprocess.run(["taskkill", "/PID", str(pid), "/T", "/F"], capture_output=True, check=False)
    else:
        # started with start_new_session=True, so the process group holds exactly the run's processes
        try:
            os.killpg(os.getpgid(pid), signal.SIGKILL)
        except ProcessLookupError:
            pass


class BackgroundRun:
    """One background ``separeg`` process: start, poll events, stop.

    Args:
        argv: the full command line, e.g. from :func:`cli_command`.
        cwd: working folder; put the folder that holds ``separeg/`` here when it is not installed.
        env: variables added to (not replacing) the current environment.
        stop_file: the file passed as ``--stop-file``; ``None`` for commands that cannot stop cleanly.
        stop_grace_s: how long :meth:`stop` waits for a clean stop before killing the process tree.
        log_path: when set, every line the process prints is also appended here (kept after a crash).

    Signals (emitted from :meth:`poll`, i.e. in the caller's thread): ``event(Event)`` for each event,
    ``finished(RunState, str)`` once, with the final state and a message.
    """

    def __init__(self, argv: Sequence[str], *, cwd: str | os.PathLike | None = None,
                 env: Mapping[str, str] | None = None, stop_file: str | os.PathLike | None = None,
                 stop_grace_s: float = 120.0, log_path: str | os.PathLike | None = None,
                 popen: Callable[..., subprocess.Popen] = subprocess.Popen, clock: Callable[[], float] = time.monotonic,
                 ) -> None:
        self.argv = [str(a) for a in argv]
        self.cwd = str(cwd) if cwd is not None else None
        self.env = dict(env or {})
        self.stop_file = Path(stop_file) if stop_file is not None else None
        self.stop_grace_s = stop_grace_s
        self.log_path = Path(log_path) if log_path is not None else None
        self._popen = popen
        self._clock = clock
        self._process: subprocess.Popen | None = None
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._reader: threading.Thread | None = None
        self._stop_deadline: float | None = None
        self._killed = False
        self.state = RunState.IDLE
        self.last_event: Event | None = None
        self.final_event: Event | None = None
        self.message = ""
        self.event = Signal(Event)
        self.finished = Signal(RunState, str)

    # ------------------------------------------------------------------------------------------------ control
    def start(self) -> None:
        if self.state is not RunState.IDLE:
            raise RuntimeError(f"this run was already started ({self.state})")
        env = {**os.environ, **self.env, "PYTHONUNBUFFERED": "1", "PYTHONIOENCODING": "utf-8"}
        platform_args: dict = ({"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP} if sys.platform == "win32"
                               else {"start_new_session": True})
        if self.stop_file is not None and self.stop_file.exists():
            self.stop_file.unlink()
        self._process = self._popen(self.argv, cwd=self.cwd, env=env, stdin=subprocess.DEVNULL,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, encoding="utf-8",
                                    errors="replace", bufsize=1, **platform_args)
        self.state = RunState.RUNNING
        self._reader = threading.Thread(target=self._read, name="separeg-reader", daemon=True)
        self._reader.start()
        logger.info("started %s (pid %s)", " ".join(self.argv), self._process.pid)

    def stop(self) -> None:
        """Ask for a clean stop (stop file), or kill at once when the command has no stop file."""
        if self.state is not RunState.RUNNING:
            return
        self.state = RunState.STOPPING
        if self.stop_file is None:
            self.kill()
            return
        self.stop_file.parent.mkdir(parents=True, exist_ok=True)
        self.stop_file.write_text("stop requested\n", encoding="utf-8")
        self._stop_deadline = self._clock() + self.stop_grace_s

    def kill(self) -> None:
        """End the process tree now (no checkpoint beyond the last one)."""
        if self._process is not None and self._process.poll() is None:
            self._killed = True
            kill_process_tree(self._process.pid)

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    @property
    def running(self) -> bool:
        return self.state in (RunState.RUNNING, RunState.STOPPING)

    # ----------------------------------------------------------------------------------------------- reading
    def _read(self) -> None:
        assert self._process is not None and self._process.stdout is not None
        log = self.log_path.open("a", encoding="utf-8") if self.log_path is not None else None
        try:
            for line in self._process.stdout:
                if log is not None:
                    log.write(line)
                    log.flush()
                self._lines.put(line.rstrip("\r\n"))
        finally:
            if log is not None:
                log.close()
            self._lines.put(None)  # end of output

    def poll(self) -> list[Event]:
        """Events printed since the last call (emitted through ``event`` too); ends the run when the process has."""
        events: list[Event] = []
        ended = False
        while True:
            try:
                line = self._lines.get_nowait()
            except queue.Empty:
                break
            if line is None:
                ended = True
                break
            event = parse_line(line)
            if event is None:
                continue
            events.append(event)
            self.last_event = event
            if event.type in (EventType.DONE, EventType.ERROR, EventType.CANCELLED):
                self.final_event = event
            self.event.emit(event)
        if self.state is RunState.STOPPING and self._stop_deadline is not None and self._clock() > self._stop_deadline:
            logger.warning("no clean stop within %.0f s; killing the process tree", self.stop_grace_s)
            self._stop_deadline = None
            self.kill()
        if ended:
            self._finish()
        return events

    def wait(self, timeout: float | None = None, interval: float = 0.05) -> RunState:
        """Poll until the run ends (for tests and scripts; a GUI polls from a timer instead)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.running:
            self.poll()
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"{' '.join(self.argv)} still running after {timeout} s")
            time.sleep(interval)
        return self.state

    def _finish(self) -> None:
        assert self._process is not None
        code = self._process.wait()
        final = self.final_event
        if code == 0:
            self.state = RunState.DONE
        elif code == 130 or self._killed or (final is not None and final.type is EventType.CANCELLED):
            self.state = RunState.CANCELLED
        else:
            self.state = RunState.FAILED
        if final is not None and final.msg:
            self.message = final.msg
        elif self.state is RunState.CANCELLED:
            self.message = "stopped" + (" (process killed)" if self._killed else "")
        elif self.state is RunState.FAILED:
            what = EXIT_CODES.get(code, "crashed")
            last = self.last_event.msg if self.last_event is not None and self.last_event.msg else ""
            self.message = f"the process ended with exit code {code} ({what})" + (f": {last}" if last else "")
        if self.stop_file is not None and self.stop_file.exists():
            self.stop_file.unlink()
        logger.info("%s: %s", self.state, self.message)
        self.finished.emit(self.state, self.message)


def parse_line(line: str) -> Event | None:
    """One printed line as an event: JSON lines are events; other text (warnings, tracebacks) becomes a log event."""
    text = line.strip()
    if not text:
        return None
    if text.startswith("{"):
        try:
            return Event.from_json(text)
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            pass
    return Event(type=EventType.LOG, t=time.time(), msg=line, level="output")
