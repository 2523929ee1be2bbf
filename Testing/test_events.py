from __future__ import annotations

import io
import json

from separeg.runtime.events import Event, Events, EventType, JsonLinesSink, ListSink, TerminalSink


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_progress_rate_eta_and_throttle() -> None:
    clock, sink = FakeClock(), ListSink()
    events = Events(sink, min_interval=1.0, clock=clock)
    events.progress("sis", 0, 10)
    for step in range(1, 11):
        clock.now += 0.5
        events.progress("sis", step, 10)
    steps = [e.step for e in sink.events]
    assert steps == [0, 2, 4, 6, 8, 10]  # throttled to one per second; the last step always passes
    last = sink.events[-1]
    assert last.rate == 2.0 and last.eta_s == 0.0
    assert sink.events[1].eta_s == 4.0  # 8 steps left at 2 steps/s


def test_new_pass_of_a_stage_restarts_its_clock() -> None:
    clock, sink = FakeClock(), ListSink()
    events = Events(sink, min_interval=0.0, clock=clock)
    events.progress("sis", 0, 4)
    clock.now += 100
    events.progress("sis", 4, 4)
    events.progress("sis", 0, 4)  # next volume
    clock.now += 1
    events.progress("sis", 4, 4)
    assert sink.events[-1].rate == 4.0


def test_json_lines_round_trip_and_nan_loss() -> None:
    stream = io.StringIO()
    events = Events(JsonLinesSink(stream), min_interval=0.0)
    events.progress("inter", 1, 5, loss=float("nan"))
    events.warning("low memory", stage="inter")
    events.done("finished")
    lines = stream.getvalue().splitlines()
    parsed = [Event.from_json(line) for line in lines]
    assert [e.type for e in parsed] == [EventType.PROGRESS, EventType.LOG, EventType.DONE]
    assert parsed[0].loss is None and "NaN" in parsed[0].msg
    assert json.loads(lines[1])["level"] == "warning"


def test_terminal_sink_on_a_pipe_prints_plain_lines() -> None:
    stream = io.StringIO()
    events = Events(TerminalSink(stream), min_interval=0.0)
    events.progress("scan", 0, 2)
    events.progress("scan", 2, 2, loss=0.5)
    events.error("disk full")
    events.cancelled("stopped by user")
    text = stream.getvalue()
    assert "[scan] 2/2 100%" in text and "loss 0.5" in text
    assert "ERROR: disk full" in text and "Cancelled: stopped by user" in text
    assert "\r" not in text
