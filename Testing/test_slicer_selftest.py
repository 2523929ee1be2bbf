"""The modules' ScriptedLoadableModuleTest self-tests, run inside a real Slicer when SLICER_EXECUTABLE is set.

Slicer runs as ctest does it (``--testing`` exits non-zero on a failure; SLICER_NOTES §7), with both module
folders added and this repository on Slicer's Python path so that ``separeg`` imports. Slicer's Python needs
the core's packages (the modules offer to install them on first use; under ``--testing`` they do not ask).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SLICER = os.environ.get("SLICER_EXECUTABLE")


@pytest.mark.skipif(not SLICER, reason="SLICER_EXECUTABLE is not set (3D Slicer is not installed here)")
@pytest.mark.parametrize("module", ["SepaRegSegment", "SepaRegPretrain"])
def test_module_self_test_in_slicer(module: str) -> None:
    code = (f"import sys; sys.path.insert(0, {str(REPO)!r}); import slicer.testing; "
            f"slicer.testing.runUnitTest([{str(REPO / module)!r}], {module!r})")
    command = [SLICER, "--no-splash", "--testing", "--no-main-window", "--additional-module-paths",
               str(REPO / "SepaRegPretrain"), str(REPO / "SepaRegSegment"), "--python-code", code]
    result = subprocess.run(command, capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, (result.stdout + result.stderr)[-5000:]
