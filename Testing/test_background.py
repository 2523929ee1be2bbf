"""BackgroundRun with real processes: events, failures, clean stop through the stop file, process-tree kill."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

from separeg.runtime.background import BackgroundRun, RunState, cli_command, parse_line
from separeg.runtime.events import EventType

EMIT = """
import json, sys, time
for i in range(3):
    print(json.dumps({"type": "progress", "t": time.time(), "stage": "demo", "step": i + 1, "total": 3}))
print("a plain warning line", file=sys.stderr)
print(json.dumps({"type": "done", "t": time.time(), "msg": "all good"}))
"""

FAIL = """
import json, sys, time
print(json.dumps({"type": "error", "t": time.time(), "msg": "no usable CT in /data"}))
sys.exit(1)
"""

# Waits for the stop file like the training commands: between steps, then exits 130 after a "checkpoint".
STOPPABLE = """
import json, os, sys, time
stop = sys.argv[1]
for step in range(600):
    print(json.dumps({"type": "progress", "t": time.time(), "stage": "train", "step": step, "total": 600}))
    if os.path.exists(stop):
        open(sys.argv[2], "w").write(str(step))
        print(json.dumps({"type": "cancelled", "t": time.time(), "msg": f"stopped at step {step}; checkpoint saved"}))
        sys.exit(130)
    time.sleep(0.05)
"""

# Ignores the stop file and has a child: only a tree kill ends both.
STUBBORN = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
open(sys.argv[1], "w").write(str(child.pid))
print('{"type": "log", "t": 0, "msg": "started"}', flush=True)
time.sleep(120)
"""


def test_events_and_plain_lines_arrive_in_order() -> None:
    run = BackgroundRun([sys.executable, "-c", EMIT])
    seen = []
    finished = []
    run.event.connect(seen.append)
    run.finished.connect(lambda state, msg: finished.append((state, msg)))
    run.start()
    assert run.wait(timeout=60) is RunState.DONE
    assert [e.step for e in seen if e.type is EventType.PROGRESS] == [1, 2, 3]
    assert any(e.type is EventType.LOG and e.msg == "a plain warning line" for e in seen)
    assert finished == [(RunState.DONE, "all good")]


def test_a_failed_run_reports_its_error_message(tmp_path: Path) -> None:
    run = BackgroundRun([sys.executable, "-c", FAIL], log_path=tmp_path / "log.txt")
    run.start()
    assert run.wait(timeout=60) is RunState.FAILED
    assert run.message == "no usable CT in /data"
    assert "no usable CT" in (tmp_path / "log.txt").read_text()


def test_a_crash_without_events_reports_the_exit_code() -> None:
    run = BackgroundRun([sys.executable, "-c", "import sys; print('Traceback: boom'); sys.exit(3)"])
    run.start()
    assert run.wait(timeout=60) is RunState.FAILED
    assert "exit code 3" in run.message and "Traceback: boom" in run.message


def test_stop_file_stops_cleanly(tmp_path: Path) -> None:
    stop = tmp_path / "dir with spaces é" / "STOP"
    marker = tmp_path / "stopped_at"
    run = BackgroundRun([sys.executable, "-c", STOPPABLE, stop, marker], stop_file=stop)
    run.start()
    while not any(e.type is EventType.PROGRESS and e.step >= 3 for e in run.poll()):
        time.sleep(0.02)
    run.stop()
    assert run.state is RunState.STOPPING
    assert run.wait(timeout=60) is RunState.CANCELLED
    assert "checkpoint saved" in run.message
    assert int(marker.read_text()) >= 3
    assert not stop.exists()  # removed, so the next run does not stop at once


@pytest.mark.skipif(sys.platform == "win32", reason="checks the child pid with os.kill(pid, 0)")
def test_a_run_that_ignores_the_stop_file_is_killed_with_its_children(tmp_path: Path) -> None:
    pid_file = tmp_path / "child.pid"
    run = BackgroundRun([sys.executable, "-c", STUBBORN, pid_file], stop_file=tmp_path / "STOP", stop_grace_s=0.5)
    run.start()
    while not pid_file.exists() or not pid_file.read_text():
        run.poll()
        time.sleep(0.02)
    child = int(pid_file.read_text())
    run.stop()
    assert run.wait(timeout=60) is RunState.CANCELLED
    assert "killed" in run.message
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    else:
        pytest.fail("the child process survived the tree kill")


def test_parse_line_and_cli_command() -> None:
    assert parse_line("") is None
    assert parse_line('{"type": "done", "t": 1.0, "msg": "ok"}').type is EventType.DONE
    odd = parse_line("{not json")
    assert odd.type is EventType.LOG and odd.msg == "{not json"
    argv = cli_command("py", "contour", Path("/a b/ct.nii.gz"), "--out", Path("/o"))
    assert argv == ["py", "-m", "separeg.cli", "contour", "/a b/ct.nii.gz", "--out", "/o", "--json"]
    with pytest.raises(RuntimeError, match="already started"):
        run = BackgroundRun([sys.executable, "-c", "pass"])
        run.start()
        run.wait(timeout=30)
        run.start()


def test_device_list_always_offers_auto_and_cpu() -> None:
    from separeg.runtime.devices import list_devices

    devices = list_devices()
    assert devices[0][0] == "auto" and devices[-1] == ("cpu", "CPU")
    assert all(d.startswith(("cuda:", "mps")) for d, _ in devices[1:-1])
