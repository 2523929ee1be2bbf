"""Ctrl-C during a long step is acknowledged at once, not after the step (11 s in pretraining, 40 s in a fine-tune)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

SCRIPT = """
import os, signal, sys, time
from separeg.runtime.training import StopRequest
with StopRequest() as stop:
    os.kill(os.getpid(), signal.SIGINT)  # the user presses Ctrl-C during a step
    time.sleep(0.3)
    sys.stderr.write("END OF STEP\\n")
    sys.stderr.flush()
    print(stop.requested)
"""


@pytest.mark.skipif(os.name != "posix", reason="POSIX signals")
def test_ctrl_c_is_acknowledged_before_the_step_ends() -> None:
    run = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "SIGINT"  # still a stop request, handled after the step
    ack = run.stderr.find("SIGINT received: stopping after this step, a checkpoint follows")
    assert 0 <= ack < run.stderr.find("END OF STEP"), run.stderr
