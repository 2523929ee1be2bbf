"""Each module's ``ensureRequirements`` against a recording stand-in of Slicer's pip helpers and of the PyTorch
extension (fake-only: the real ones need the Qt application). The logic is the core's, once
(:mod:`separeg.slicer_install`, Slicer passed in); the requirement list and checks are :mod:`separeg.requirements`."""

from __future__ import annotations

import importlib
import sys
import types
from pathlib import Path

import pytest

from separeg import slicer_install
from separeg.requirements import TORCH_REQUIREMENT

REPO = Path(__file__).resolve().parent.parent
INSTALLS = {"SepaRegSegment": "SepaRegSegmentLib.Install", "SepaRegPretrain": "SepaRegPretrainLib.Install"}


def fake_slicer(monkeypatch, packaging: bool, confirm: bool = True) -> types.SimpleNamespace:
    calls = types.SimpleNamespace(pip_ensure=[], pip_install=[], errors=[], asked=[], slicer=None)
    util = types.SimpleNamespace(
        pip_install=lambda args: calls.pip_install.append(list(args)),
        confirmOkCancelDisplay=lambda text, *a, **k: calls.asked.append(text) or confirm,
        errorDisplay=lambda text, *a, **k: calls.errors.append(text))
    module = types.ModuleType("slicer")
    module.util = util
    if packaging:
        module.packaging = types.SimpleNamespace(
            pip_ensure=lambda requirements, **kwargs: calls.pip_ensure.append((list(requirements), kwargs)))
    monkeypatch.setitem(sys.modules, "slicer", module)
    monkeypatch.setitem(sys.modules, "PyTorchUtils", None)  # no PyTorch extension: torch is here already
    calls.slicer = module
    return calls


@pytest.mark.parametrize("module", INSTALLS)
def test_slicer_5_12_uses_pip_ensure_with_constraints_and_skip_packages(monkeypatch, module: str) -> None:
    install = importlib.import_module(INSTALLS[module])
    missing = ["monai>=1.4,<1.7", "highdicom>=0.23,<0.28"]
    monkeypatch.setattr(slicer_install, "missing_requirements", lambda: list(missing))
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
    monkeypatch.setattr(slicer_install, "missing_requirements",
                        lambda: [] if calls.pip_install else ["scipy>=1.10,<2"])
    assert install.ensureRequirements() is True
    [args] = calls.pip_install
    assert args[0] == "-c" and Path(args[1]).name == "constraints.txt" and args[2:] == ["scipy>=1.10,<2"]
    assert "kept as they are" in calls.asked[0] and not calls.errors


@pytest.mark.parametrize("module", INSTALLS)
def test_each_module_passes_slicer_into_the_one_core_install(monkeypatch, module: str) -> None:
    """The modules do not import each other; neither carries install code of its own, both call the core's."""
    install = importlib.import_module(INSTALLS[module])
    assert install.ensure_requirements is slicer_install.ensure_requirements
    calls = fake_slicer(monkeypatch, packaging=True)
    received = []
    monkeypatch.setattr(install, "ensure_requirements", lambda slicer, ask: received.append((slicer, ask)) or True)
    assert install.ensureRequirements(ask=False) is True
    assert received == [(calls.slicer, False)]
    source = (REPO / module / f"{module}Lib" / "Install.py").read_text(encoding="utf-8")
    assert "pip" not in source and "PyTorchUtils" not in source and len(source.splitlines()) < 20


class FakePyTorchUtilsLogic:
    installed = False
    requests: list[dict] = []

    @staticmethod
    def torchInstalled() -> bool:
        return FakePyTorchUtilsLogic.installed

    def installTorch(self, **kwargs):
        FakePyTorchUtilsLogic.requests.append(kwargs)
        return types.ModuleType("torch")


@pytest.mark.parametrize("confirm", [True, False])
def test_torch_comes_from_the_pytorch_extension_after_asking(monkeypatch, confirm: bool) -> None:
    calls = fake_slicer(monkeypatch, packaging=True, confirm=confirm)
    monkeypatch.setitem(sys.modules, "PyTorchUtils", types.SimpleNamespace(PyTorchUtilsLogic=FakePyTorchUtilsLogic))
    monkeypatch.setattr(FakePyTorchUtilsLogic, "requests", [])
    monkeypatch.setattr(slicer_install, "missing_requirements", lambda: [])
    assert slicer_install.ensure_requirements(calls.slicer) is confirm
    assert "needs PyTorch" in calls.asked[0] and not calls.errors
    expected = [{"askConfirmation": False, "torchVersionRequirement": TORCH_REQUIREMENT}] if confirm else []
    assert FakePyTorchUtilsLogic.requests == expected
    monkeypatch.setattr(FakePyTorchUtilsLogic, "installed", True)  # already there: nothing asked, nothing installed
    calls.asked.clear()
    assert slicer_install.ensure_torch(calls.slicer) is True and not calls.asked
    assert len(FakePyTorchUtilsLogic.requests) == len(expected)
