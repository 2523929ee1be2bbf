"""The stock-Slicer tier: both panels open, list the shipped models and ask before installing, in a Slicer Python that
has only what Slicer ships (issue 30: torch and safetensors at import time left the panels empty with a traceback).

A fresh Slicer's Python has the standard library, numpy, SimpleITK, vtk, pydicom (with pillow), packaging, requests
and pip (Slicer's ``SuperBuild/External_python-*.cmake``), and Slicer's own ``slicer``, ``qt``, ``ctk``. Slicer 5.12
adds highdicom and dcmqi (SLICER_NOTES §1); highdicom counts as absent here so that the tier also stands for 5.10.
So every third-party package the core or the modules import anywhere (found by reading their source, so a new
dependency is covered without editing this file) is blocked unless it is in :data:`STOCK`: today torch, safetensors,
monai, scikit-image, scikit-learn, scipy, matplotlib, highdicom and psutil. Installing SepaReg from the Extensions
Manager brings the PyTorch extension (its build dependency, ``Resources/ExtensionsIndex/SepaReg.json``) but not torch.

The panels run in a subprocess (this file run as a script), because the pytest process has imported torch already:
there a ``sys.meta_path`` finder makes each blocked import raise ``ModuleNotFoundError``, ``importlib.metadata``
reports the blocked distributions as not installed, ``slicer`` / ``qt`` / the ``.ui`` widgets are the stand-ins of
``slicer_panel_fakes.py``, the PyTorch extension's ``PyTorchUtils`` and Slicer 5.12's ``slicer.packaging.pip_ensure``
are recording stand-ins, and the model folder is empty (only the shipped models exist). It then builds each module as
Slicer does (module class, ``<M>Widget(parent).setup()``), records what a planner sees on first open, and starts each
task from its button, with the background runs replaced by a recorder.

What a planner sees on first open in a Slicer without torch (``pytest -s`` prints it, ``test_print_first_open``):

- SepaReg Segment: Model "hn-oar-7", described "resnet18-slim x 2 (ensemble), 7 organs, 36 + 160 training case(s).
  <release limits>:
  Brainstem, SpinalCord, Parotid_R, Parotid_L, Esophagus, Larynx, Bone_Mandible"; "0 corrected case(s) stored";
  start "separeg-encoder-hn-ct", "hn-oar-7 (model: its network and shared organs)" or "Random initialisation";
  device "Automatic (GPU when available)" or "CPU" (no GPU can be listed without torch); status "Idle"; every
  button but Stop enabled.
- SepaReg Pretrain: "Ready to fine-tune from, in SepaReg Segment (no pretraining needed): separeg-encoder-hn-ct
  (resnet18-slim): OpenKBP (...)"; methods simsiam, byol, simclr, mocov3; encoders ResNet-50 (paper), ResNet-18,
  ResNet-18 slim, Swin; the six stages; the same two devices; status "Idle".
- Any task button (Auto-contour, Update model, Fine-tune, Export; Scan, Start): "SepaReg needs PyTorch. Install it
  now?", PyTorch through the extension, then Slicer's pip_ensure dialog for monai, safetensors, scikit-image,
  scikit-learn, scipy, matplotlib, highdicom (on 5.12 highdicom is there already); declining starts nothing.
  Without the PyTorch extension: "SepaReg needs PyTorch: install the PyTorch extension ... and restart Slicer."
- Evaluate runs in Slicer's process (scipy for the metrics): it asks first like every task.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
MODULES = ("SepaRegSegment", "SepaRegPretrain")
# Third-party packages a stock Slicer Python has (see the module docstring), and the project's own.
STOCK = {"numpy", "SimpleITK", "vtk", "pydicom", "PIL", "packaging", "requests", "pip", "setuptools",
         "slicer", "qt", "ctk", "vtkmodules", "DicomRtImportExportPlugin"}  # the last: SlicerRT, looked up when used
OWN = {"separeg", "SepaRegSegmentLib", "SepaRegPretrainLib", "SepaRegSegment", "SepaRegPretrain"}
DISTRIBUTIONS = {"skimage": "scikit-image", "sklearn": "scikit-learn"}  # import name -> distribution, where they differ


def third_party_imports() -> set[str]:
    """Top-level names of every package the core and the modules import, anywhere (the standard library left out)."""
    names = set()
    for folder in ("separeg", *MODULES):
        for path in (REPO / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Import):
                    names |= {alias.name.split(".")[0] for alias in node.names}
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names.add(node.module.split(".")[0])
    return {n for n in names if n not in sys.stdlib_module_names} - OWN


def blocked() -> list[str]:
    return sorted((third_party_imports() - STOCK) | {"torch", "safetensors", "torchvision"})


# ------------------------------------------------------------------------------------------------------ the tests
@pytest.fixture(scope="module")
def stock(tmp_path_factory) -> dict:
    """What the subprocess saw: ``{"blocked", "imports", "panels": {module: {...}}, "no_extension": [...]}``."""
    tmp = tmp_path_factory.mktemp("stock")
    env = {**os.environ, "SEPAREG_MODELS": str(tmp / "models"), "TMPDIR": str(tmp), "PYTHONDONTWRITEBYTECODE": "1"}
    result = subprocess.run([sys.executable, __file__, json.dumps(blocked()), str(tmp)], capture_output=True,
                            text=True, env=env, timeout=300, cwd=REPO)
    assert result.returncode == 0, f"a panel failed in a stock Slicer:\n{result.stderr[-4000:]}"
    return json.loads(result.stdout.splitlines()[-1])


def test_the_stock_python_lacks_what_slicer_does_not_ship(stock: dict) -> None:
    assert {"torch", "safetensors", "monai", "scipy", "skimage", "sklearn", "matplotlib"} <= set(stock["blocked"])
    assert not {"numpy", "SimpleITK", "pydicom"} & set(stock["blocked"])
    assert stock["imports"] == {name: "ModuleNotFoundError" for name in stock["blocked"]}


@pytest.mark.parametrize("module", MODULES)
def test_the_panel_opens_and_lists_the_shipped_models(stock: dict, module: str) -> None:
    panel = stock["panels"][module]
    assert panel["mounted"], "the panel was not put into the module's layout"
    assert panel["errors"] == [], "a planner opening the panel saw an error"
    view = panel["view"]
    assert view["statusLabel"] == "Idle"
    assert view["deviceComboBox"] == ["Automatic (GPU when available)", "CPU"]
    if module == "SepaRegSegment":
        assert view["modelComboBox"] == ["hn-oar-7"]
        assert view["modelInfoLabel"].startswith("resnet18-slim x 2 (ensemble), 7 organs, 36 + 160 training case(s)")
        assert "Parotid_L" in view["modelInfoLabel"]
        assert view["initEncoderComboBox"] == ["separeg-encoder-hn-ct",
                                               "hn-oar-7 (model: its network and shared organs)",
                                               "Random initialisation"]
        assert view["buttons"]["autoContourButton"] and not view["buttons"]["stopButton"]
    else:
        assert "<b>separeg-encoder-hn-ct</b> (resnet18-slim)" in view["shippedEncodersLabel"]
        assert view["methodComboBox"][0] == "simsiam" and "swin" in view["encoderComboBox"][-1].lower()


def test_the_panels_import_nothing_of_the_core_that_needs_torch(stock: dict) -> None:
    """Opening the panels loaded only torch-free core modules (the bundle reader among them, not the bundle writer)."""
    loaded = stock["core_modules"]
    assert "separeg.runtime.bundle_info" in loaded and "separeg.runtime.bundle" not in loaded


@pytest.mark.parametrize("module", MODULES)
def test_starting_a_task_asks_before_installing(stock: dict, module: str) -> None:
    """Each task button reaches ensureRequirements: PyTorch through the PyTorch extension after asking, then the
    missing packages through Slicer 5.12's pip_ensure with Slicer's own packages pinned and skipped; the stand-ins
    install nothing, so no task starts, and the planner is told what is still missing."""
    from separeg.requirements import PROTECTED, REQUIREMENTS, TORCH_REQUIREMENT

    expected = [r for r in REQUIREMENTS if not r.startswith(("pydicom", *PROTECTED))]
    tasks = stock["panels"][module]["tasks"]
    assert set(tasks) == ({"Auto-contour", "Update model", "Fine-tune", "Export"} if module == "SepaRegSegment"
                          else {"Scan", "Start"})
    for name, task in tasks.items():
        assert task["runs_started"] == 0, name
        assert task["torch_installs"] == [{"askConfirmation": False, "torchVersionRequirement": TORCH_REQUIREMENT}]
        assert "needs PyTorch" in task["asked"][0], name
        [(requirements, kwargs)] = task["pip_ensure"]
        assert requirements == expected, name
        assert kwargs["skip_packages"] == list(PROTECTED) and kwargs["prompt_install"] is True
        assert task["errors"] and "still missing" in task["errors"][-1], name


def test_with_everything_installed_the_same_buttons_start_the_runs(stock: dict) -> None:
    """The control: the presses above started nothing because of ensureRequirements, not because of the fakes."""
    for module, command in (("SepaRegSegment", "contour"), ("SepaRegPretrain", "pretrain")):
        task = stock["installed"][module]
        assert task["runs_started"] == 1 and command in task["commands"][0], task
        assert not task["asked"] and not task["pip_ensure"] and not task["errors"], task


def test_declining_installs_and_starts_nothing(stock: dict) -> None:
    declined = stock["declined"]
    assert len(declined["asked"]) == 1 and not declined["torch_installs"] and not declined["pip_ensure"]
    assert declined["runs_started"] == 0 and not declined["errors"]


def test_without_the_pytorch_extension_the_planner_is_told_to_install_it(stock: dict) -> None:
    for module in MODULES:
        [message] = stock["no_extension"][module]
        assert "install the PyTorch extension" in message


def test_evaluate_asks_before_installing(stock: dict) -> None:
    evaluate = stock["panels"]["SepaRegSegment"]["evaluate"]
    assert evaluate["pip_ensure"], f"Evaluate did not reach ensureRequirements; the planner saw {evaluate['errors']}"
    assert "needs PyTorch" in evaluate["asked"][0] and "still missing" in evaluate["errors"][-1]


def test_print_first_open(stock: dict) -> None:
    """What a planner sees on first open in a Slicer without torch (``pytest -s`` shows it)."""
    for module in MODULES:
        print(f"\n{module} on first open:\n{json.dumps(stock['panels'][module]['view'], indent=1)}")
    print("first task:", json.dumps(stock["panels"]["SepaRegSegment"]["tasks"]["Auto-contour"], indent=1))
    print("Evaluate:", stock["panels"]["SepaRegSegment"]["evaluate"]["errors"])
    print("without the PyTorch extension:", stock["no_extension"])


# ------------------------------------------------------------------------------------- the stock Slicer process
class StockSlicerFinder:
    """A ``sys.meta_path`` finder: importing a package a stock Slicer lacks raises ModuleNotFoundError."""

    def __init__(self, names: set[str]) -> None:
        self.names = names

    def find_spec(self, name, path=None, target=None):
        top = name.partition(".")[0]
        if top in self.names:
            raise ModuleNotFoundError(f"No module named '{top}' (not in a stock Slicer)", name=top)
        return None


def hide_distributions(names: set[str]) -> None:
    """``importlib.metadata`` says the blocked packages are not installed (the requirement checks read it)."""
    from importlib import metadata

    hidden = {DISTRIBUTIONS.get(n, n).lower().replace("_", "-") for n in names}
    real_version, real_distribution = metadata.version, metadata.distribution

    def check(name: str) -> None:
        if name.lower().replace("_", "-") in hidden:
            raise metadata.PackageNotFoundError(name)

    metadata.version = lambda name: check(name) or real_version(name)
    metadata.distribution = lambda name: check(name) or real_distribution(name)


def panel_view(ui) -> dict:
    """What the panel shows: combo box entries, the texts of the labels set by code, which buttons are enabled."""
    view = {name: [item[0] for item in widget.items] for name, widget in vars(ui).items() if widget.cls == "QComboBox"}
    view |= {name: widget.text for name, widget in vars(ui).items()
             if name in ("statusLabel", "modelInfoLabel", "trainingSetLabel", "shippedEncodersLabel")}
    view["buttons"] = {name: widget.enabled for name, widget in vars(ui).items() if widget.cls == "QPushButton"}
    if hasattr(ui, "stagesListWidget"):
        view["stages"] = [item.text for item in ui.stagesListWidget.items]
    return view


def start_tasks(widget, calls, tmp: Path, only: str | None = None) -> dict:
    """Press each task button of a built panel (or the one named ``only``) with its inputs chosen; record what each
    press did."""
    ui, runs = widget.ui, []

    class RecordedRun:  # instead of a background process: records the command
        def __init__(self, argv, **kwargs) -> None:
            runs.append([str(a) for a in argv])
            self.event = self.finished = types.SimpleNamespace(connect=lambda slot: None)
            self.running = False

        def start(self) -> None:
            pass

    widget.logic.runFactory = RecordedRun
    node = types.SimpleNamespace(GetName=lambda: "CT 1", GetAttribute=lambda key: None)
    if hasattr(ui, "autoContourButton"):
        for selector in ("inputVolumeSelector", "exportSegmentationSelector", "exportVolumeSelector"):
            getattr(ui, selector).setCurrentNode(node)
        ui.finetuneOutputPathLineEdit.currentPath = ui.exportFolderPathLineEdit.currentPath = str(tmp / "out")
        presses = {"Auto-contour": widget.onAutoContour, "Update model": widget.onUpdateModel,
                   "Fine-tune": widget.onFinetune, "Export": widget.onExport}
    else:
        (tmp / "archive").mkdir(exist_ok=True)
        ui.archivePathLineEdit.currentPath, ui.outputPathLineEdit.currentPath = str(tmp / "archive"), str(tmp / "run")
        presses = {"Scan": widget.onScan, "Start": widget.onStart}
    tasks = {}
    for name, press in presses.items():
        if only not in (None, name):
            continue
        for key in ("errors", "asked", "pip_ensure", "torch_installs"):
            setattr(calls, key, [])
        runs.clear()
        press()
        tasks[name] = {"runs_started": len(runs), "commands": list(runs), "errors": calls.errors, "asked": calls.asked,
                       "pip_ensure": calls.pip_ensure, "torch_installs": calls.torch_installs}
    return tasks


def evaluate(widget, calls) -> dict:
    """Evaluate with its three inputs chosen (it runs in Slicer's process, not as a background task)."""
    node = types.SimpleNamespace(GetName=lambda: "CT 1")
    for selector in ("predictionSegmentationSelector", "referenceSegmentationSelector", "evaluationVolumeSelector"):
        getattr(widget.ui, selector).setCurrentNode(node)
    for key in ("errors", "asked", "pip_ensure", "torch_installs"):
        setattr(calls, key, [])
    try:
        widget.onEvaluate()
    except Exception as exc:  # noqa: BLE001 - in Slicer a slot's exception goes to the Python console
        calls.errors.append(f"(raised) {type(exc).__name__}: {exc}")
    return {"errors": calls.errors, "pip_ensure": calls.pip_ensure, "asked": calls.asked}


class PyTorchUtilsLogic:
    """The PyTorch extension, installed with SepaReg; torch itself is not installed yet (``installed`` False)."""

    installed = False
    calls = types.SimpleNamespace(torch_installs=[])

    @staticmethod
    def torchInstalled() -> bool:
        return PyTorchUtilsLogic.installed

    def installTorch(self, **kwargs):
        PyTorchUtilsLogic.calls.torch_installs.append(kwargs)
        return types.ModuleType("torch")  # said to be installed; the requirement check still finds no torch


def block_what_slicer_lacks(names: set[str]) -> dict[str, str]:
    """Make this process a stock Slicer's Python; returns what importing each blocked name raises."""
    import importlib

    assert not names & set(sys.modules), f"already imported: {sorted(names & set(sys.modules))}"
    sys.meta_path.insert(0, StockSlicerFinder(names))
    hide_distributions(names)
    imports = {}
    for name in sorted(names):
        try:
            importlib.import_module(name)
            imports[name] = "imported"
        except ImportError as exc:
            imports[name] = type(exc).__name__
    return imports


def open_panels(calls) -> tuple[dict, dict]:
    """Each module as Slicer builds it on first open; returns ``(what each panel shows, the panels' Widgets)``."""
    import importlib

    panels, widgets = {}, {}
    for module in MODULES:
        calls.errors, calls.asked = [], []
        python = importlib.import_module(module)
        parent = types.SimpleNamespace()
        getattr(python, module)(parent)  # Slicer's module factory
        holder = getattr(python, f"{module}Widget")(parent)
        holder.setup()  # what Slicer calls when the planner first opens the module
        widgets[module] = holder.widget
        panels[module] = {"mounted": (holder.widget.uiWidget,) in holder.layout.rows, "errors": calls.errors,
                          "view": panel_view(holder.widget.ui)}
    return panels, widgets


def with_everything_installed(widgets, calls, tmp: Path) -> dict:
    """The control: PyTorch and the requirements present, Auto-contour and Start start their runs."""
    import separeg.slicer_install

    PyTorchUtilsLogic.installed = True
    missing, separeg.slicer_install.missing_requirements = separeg.slicer_install.missing_requirements, lambda: []
    widgets["SepaRegSegment"].logic.scene = types.SimpleNamespace(exportVolume=lambda node, path: path)
    try:
        return {module: start_tasks(widgets[module], calls, tmp, task)[task]
                for module, task in (("SepaRegSegment", "Auto-contour"), ("SepaRegPretrain", "Start"))}
    finally:
        PyTorchUtilsLogic.installed = False
        separeg.slicer_install.missing_requirements = missing


def without_the_extension(widgets, calls) -> dict:
    sys.modules["PyTorchUtils"] = None
    said = {}
    for module, press in (("SepaRegSegment", widgets["SepaRegSegment"].onAutoContour),
                          ("SepaRegPretrain", widgets["SepaRegPretrain"].onStart)):
        calls.errors = []
        press()
        said[module] = calls.errors
    return said


def main(blocked_names: list[str], tmp: Path) -> dict:
    names = set(blocked_names)
    imports = block_what_slicer_lacks(names)
    sys.path[:0] = [str(REPO / m) for m in MODULES] + [str(REPO / "Testing")]
    import slicer_panel_fakes

    calls = PyTorchUtilsLogic.calls
    calls.confirm = True
    slicer_panel_fakes.install_panel_fakes(tmp, calls)
    sys.modules["PyTorchUtils"] = types.SimpleNamespace(PyTorchUtilsLogic=PyTorchUtilsLogic)
    panels, widgets = open_panels(calls)
    core = sorted(name for name in sys.modules if name.startswith("separeg"))
    for module in MODULES:
        panels[module]["tasks"] = start_tasks(widgets[module], calls, tmp)
    panels["SepaRegSegment"]["evaluate"] = evaluate(widgets["SepaRegSegment"], calls)
    installed = with_everything_installed(widgets, calls, tmp)
    calls.confirm = False  # the planner declines: nothing is installed and nothing starts
    declined = start_tasks(widgets["SepaRegSegment"], calls, tmp, "Auto-contour")["Auto-contour"]
    return {"blocked": sorted(names), "imports": imports, "panels": panels, "core_modules": core,
            "installed": installed, "declined": declined, "no_extension": without_the_extension(widgets, calls)}


if __name__ == "__main__":
    print(json.dumps(main(json.loads(sys.argv[1]), Path(sys.argv[2])), default=str))
