"""Each module's ``ensureRequirements`` against a recording stand-in of Slicer's pip helpers (fake-only: the real
ones need the Qt application); the requirement list and checks themselves are the core's (separeg.requirements)."""

from __future__ import annotations

import importlib
import sys
import types
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
INSTALLS = {"SepaRegSegment": "SepaRegSegmentLib.Install", "SepaRegPretrain": "SepaRegPretrainLib.Install"}


def fake_slicer(monkeypatch, packaging: bool) -> types.SimpleNamespace:
    calls = types.SimpleNamespace(pip_ensure=[], pip_install=[], errors=[], asked=[])
    util = types.SimpleNamespace(
        pip_install=lambda args: calls.pip_install.append(list(args)),
        confirmOkCancelDisplay=lambda text, *a, **k: calls.asked.append(text) or True,
        errorDisplay=lambda text, *a, **k: calls.errors.append(text))
    module = types.ModuleType("slicer")
    module.util = util
    if packaging:
        module.packaging = types.SimpleNamespace(
            pip_ensure=lambda requirements, **kwargs: calls.pip_ensure.append((list(requirements), kwargs)))
    monkeypatch.setitem(sys.modules, "slicer", module)
    monkeypatch.setitem(sys.modules, "PyTorchUtils", None)  # no PyTorch extension: torch is here already
    return calls


@pytest.mark.parametrize("module", INSTALLS)
def test_slicer_5_12_uses_pip_ensure_with_constraints_and_skip_packages(monkeypatch, module: str) -> None:
    install = importlib.import_module(INSTALLS[module])
    missing = ["monai>=1.4,<1.7", "highdicom>=0.23,<0.28"]
    monkeypatch.setattr(install, "missing_requirements", lambda: list(missing))
    calls = fake_slicer(monkeypatch, packaging=True)
    assert install.ensureRequirements() is False  # the stand-in installs nothing: still missing, and said so
    [(requirements, kwargs)] = calls.pip_ensure
    assert requirements == missing and kwargs["skip_packages"] == ["numpy", "SimpleITK", "vtk", "torch", "pydicom"]
    pins = Path(kwargs["constraints"]).read_text()
    assert "numpy==" in pins and "torch==" in pins and "monai" not in pins
    assert "still missing" in calls.errors[0] and not calls.pip_install


@pytest.mark.parametrize("module", INSTALLS)
def test_older_slicer_asks_then_uses_pip_install_with_a_constraints_file(monkeypatch, module: str) -> None:
    install = importlib.import_module(INSTALLS[module])
    calls = fake_slicer(monkeypatch, packaging=False)
    monkeypatch.setattr(install, "missing_requirements", lambda: [] if calls.pip_install else ["scipy>=1.10,<2"])
    assert install.ensureRequirements() is True
    [args] = calls.pip_install
    assert args[0] == "-c" and Path(args[1]).name == "constraints.txt" and args[2:] == ["scipy>=1.10,<2"]
    assert "kept as they are" in calls.asked[0] and not calls.errors


def test_both_modules_carry_the_same_install_code() -> None:
    """The modules do not import each other, so each has a copy; they must not drift apart."""
    segment = (REPO / "SepaRegSegment" / "SepaRegSegmentLib" / "Install.py").read_text(encoding="utf-8")
    pretrain = (REPO / "SepaRegPretrain" / "SepaRegPretrainLib" / "Install.py").read_text(encoding="utf-8")
    assert segment == pretrain
