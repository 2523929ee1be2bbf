"""Progress and log events shared by the CLI and the Slicer modules.

All long work reports through an :class:`Events` emitter. Sinks turn events into a terminal progress
bar (:class:`TerminalSink`), JSON lines for a background process reader (:class:`JsonLinesSink`) or a
run directory's ``events.jsonl`` (:class:`FileSink`). One event is one JSON object per line, e.g.::

    {"type": "progress", "t": 1732358400.1, "stage": "sis", "step": 3, "total": 8, "rate": 1.9, "eta_s": 2.6}
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass
from enum import StrEnum
from pathlib import Path
from typing import IO, Protocol

__all__ = ["EventType", "Event", "Sink", "Events", "JsonLinesSink", "TerminalSink", "FileSink", "ListSink"]


class EventType(StrEnum):
    PROGRESS = "progress"
    LOG = "log"
    DONE = "done"
    ERROR = "error"
    CANCELLED = "cancelled"


@dataclass(frozen=True)
class Event:
    """One event. ``rate`` is steps per second within the stage; ``eta_s`` the seconds left in it."""

    type: EventType
    t: float
    stage: str | None = None
    step: int | None = None
    total: int | None = None
    loss: float | None = None
    rate: float | None = None
    eta_s: float | None = None
    msg: str | None = None
    level: str | None = None

    def to_json(self) -> str:
        return json.dumps({k: v for k, v in asdict(self).items() if v is not None}, allow_nan=False)

    @classmethod
    def from_json(cls, line: str) -> Event:
        data = json.loads(line)
        data["type"] = EventType(data["type"])
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


class Sink(Protocol):
    def __call__(self, event: Event) -> None: ...


@dataclass
class _StageClock:
    start_t: float
    start_step: int
    last_step: int
    last_emit_t: float = 0.0


class Events:
    """The emitter handed to long-running work.

    Progress events are throttled to one per ``min_interval`` seconds per stage (the first and last
    step of a stage always pass), so a fast loop cannot flood a pipe or a terminal.
    """

    def __init__(self, *sinks: Sink, min_interval: float = 0.1, clock=time.time) -> None:
        self.sinks: list[Sink] = list(sinks)
        self.min_interval = min_interval
        self._clock = clock
        self._stages: dict[str, _StageClock] = {}

    def add_sink(self, sink: Sink) -> None:
        self.sinks.append(sink)

    def emit(self, event: Event) -> None:
        for sink in self.sinks:
            sink(event)

    def progress(self, stage: str, step: int, total: int, *, loss: float | None = None, msg: str | None = None) -> None:
        """Report that ``step`` of ``total`` steps of ``stage`` are finished."""
        now = self._clock()
        clock = self._stages.get(stage)
        if clock is None or step < clock.last_step:  # a new pass of the stage (e.g. the next volume)
            clock = self._stages[stage] = _StageClock(start_t=now, start_step=step, last_step=step)
        clock.last_step = step
        last = step >= total
        if not last and step != clock.start_step and now - clock.last_emit_t < self.min_interval:
            return
        clock.last_emit_t = now
        rate = eta = None
        elapsed = now - clock.start_t
        if step > clock.start_step and elapsed > 0:
            rate = (step - clock.start_step) / elapsed
            eta = max(total - step, 0) / rate
        if loss is not None and loss != loss:  # NaN is not valid JSON; report it in the message instead
            msg, loss = f"{msg + '; ' if msg else ''}loss is NaN", None
        self.emit(Event(EventType.PROGRESS, now, stage, step, total, loss, rate, eta, msg))

    def log(self, msg: str, *, stage: str | None = None, level: str = "info") -> None:
        self.emit(Event(EventType.LOG, self._clock(), stage=stage, msg=msg, level=level))

    def warning(self, msg: str, *, stage: str | None = None) -> None:
        self.log(msg, stage=stage, level="warning")

    def done(self, msg: str | None = None) -> None:
        self.emit(Event(EventType.DONE, self._clock(), msg=msg))

    def error(self, msg: str) -> None:
        self.emit(Event(EventType.ERROR, self._clock(), msg=msg, level="error"))

    def cancelled(self, msg: str | None = None) -> None:
        self.emit(Event(EventType.CANCELLED, self._clock(), msg=msg))


class ListSink:
    """Collects events in memory (tests, and callers that want to inspect what happened)."""

    def __init__(self) -> None:
        self.events: list[Event] = []

    def __call__(self, event: Event) -> None:
        self.events.append(event)

    def of_type(self, event_type: EventType) -> list[Event]:
        return [e for e in self.events if e.type == event_type]


class JsonLinesSink:
    """One JSON object per line, flushed at once so a reading process sees it immediately."""

    def __init__(self, stream: IO[str] | None = None) -> None:
        self.stream = stream if stream is not None else sys.stdout

    def __call__(self, event: Event) -> None:
        self.stream.write(event.to_json() + "\n")
        self.stream.flush()


class FileSink:
    """Appends JSON lines to a file, e.g. ``RUN_DIR/events.jsonl`` (the run's history survives restarts)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def __call__(self, event: Event) -> None:
        with self.path.open("a", encoding="utf-8") as f:
            f.write(event.to_json() + "\n")


def _format_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class TerminalSink:
    """A progress bar per stage on a terminal; plain lines (at most every ``line_interval`` s) on a pipe."""

    def __init__(self, stream: IO[str] | None = None, *, width: int = 28, line_interval: float = 5.0) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.width = width
        self.line_interval = line_interval
        self.interactive = bool(getattr(self.stream, "isatty", lambda: False)())
        self._bar_open = False
        self._last_line_t: dict[str, float] = {}

    def __call__(self, event: Event) -> None:
        if event.type == EventType.PROGRESS:
            self._progress(event)
            return
        self._close_bar()
        prefix = {"warning": "WARNING: ", "error": "ERROR: "}.get(event.level or "", "")
        if event.type == EventType.CANCELLED:
            prefix = "Cancelled: "
        if event.msg:
            stage = f"[{event.stage}] " if event.stage else ""
            self.stream.write(f"{prefix}{stage}{event.msg}\n")
            self.stream.flush()

    def _progress(self, event: Event) -> None:
        total = max(event.total or 0, 1)
        frac = min((event.step or 0) / total, 1.0)
        parts = [f"[{event.stage}]"]
        if self.interactive:
            filled = int(round(frac * self.width))
            parts.append("|" + "#" * filled + "." * (self.width - filled) + "|")
        parts.append(f"{event.step}/{event.total} {frac:4.0%}")
        if event.rate:
            parts.append(f"{event.rate:.3g} it/s")
        if event.eta_s is not None and event.step != event.total:
            parts.append(f"ETA {_format_seconds(event.eta_s)}")
        if event.loss is not None:
            parts.append(f"loss {event.loss:.4g}")
        if event.msg:
            parts.append(event.msg)
        line = " ".join(parts)
        finished = (event.step or 0) >= total
        if self.interactive:
            self.stream.write("\r\033[K" + line + ("\n" if finished else ""))
            self._bar_open = not finished
        else:
            last = self._last_line_t.get(event.stage or "", float("-inf"))
            if not finished and event.t - last < self.line_interval:
                return
            self._last_line_t[event.stage or ""] = event.t
            self.stream.write(line + "\n")
        self.stream.flush()

    def _close_bar(self) -> None:
        if self._bar_open:
            self.stream.write("\n")
            self._bar_open = False
