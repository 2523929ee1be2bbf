"""The Slicer layer without Slicer: CMake files configure against a stub Slicer and list every file, .ui files
hold every widget the modules use (with the expected class), and the module files have Slicer's anatomy."""

from __future__ import annotations

import ast
import json
import re
import shutil
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
MODULES = ("SepaRegPretrain", "SepaRegSegment")
# Widget name suffix -> Qt class (our naming convention, as in Slicer's own modules).
CLASS_BY_SUFFIX = {"Button": "QPushButton", "ComboBox": "QComboBox", "Selector": "qMRMLNodeComboBox",
                   "PathLineEdit": "ctkPathLineEdit", "SpinBox": "QSpinBox", "CheckBox": "QCheckBox",
                   "Table": "QTableWidget", "TextEdit": "QPlainTextEdit", "Label": "QLabel",
                   "ProgressBar": "QProgressBar", "ListWidget": "QListWidget", "LineEdit": "QLineEdit",
                   "CollapsibleButton": "ctkCollapsibleButton", "Widget": "QWidget"}


def ui_widgets(module: str) -> tuple[dict[str, str], ET.Element]:
    root = ET.parse(REPO / module / "Resources" / "UI" / f"{module}.ui").getroot()
    return {w.get("name"): w.get("class") for w in root.iter("widget")}, root


def used_ui_names(module: str) -> set[str]:
    tree = ast.parse((REPO / module / f"{module}Lib" / "Widget.py").read_text(encoding="utf-8"))
    return {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Attribute) and node.value.attr == "ui"
            and isinstance(node.value.value, ast.Name) and node.value.value.id == "self"}


@pytest.mark.parametrize("module", MODULES)
def test_ui_has_every_widget_the_module_uses(module: str) -> None:
    widgets, root = ui_widgets(module)
    used = used_ui_names(module)
    assert used, "no self.ui.<name> found: the AST scan is broken"
    assert not used - set(widgets), f"used in Widget.py but missing from the .ui: {sorted(used - set(widgets))}"
    for name, cls in widgets.items():
        suffix = next((s for s in sorted(CLASS_BY_SUFFIX, key=len, reverse=True) if name.endswith(s)), None)
        if suffix and not name.startswith("label_") and name != module:
            assert cls == CLASS_BY_SUFFIX[suffix], f"{name} is a {cls}, expected {CLASS_BY_SUFFIX[suffix]}"
    names = [w.get("name") for w in root.iter("widget")]
    assert len(names) == len(set(names)), "duplicate widget names"
    # every node selector gets the scene from the module widget, as in Slicer's own .ui files
    combos = {n for n, c in widgets.items() if c == "qMRMLNodeComboBox"}
    connected = {c.findtext("receiver") for c in root.iter("connection")
                 if c.findtext("slot") == "setMRMLScene(vtkMRMLScene*)"}
    assert combos == connected
    for combo in root.iter("widget"):
        if combo.get("class") == "qMRMLNodeComboBox":
            types = [s.text for s in combo.find("property[@name='nodeTypes']").iter("string")]
            assert types and all(t.startswith("vtkMRML") for t in types)


@pytest.mark.parametrize("module", MODULES)
def test_module_file_has_slicer_anatomy(module: str) -> None:
    source = (REPO / module / f"{module}.py").read_text(encoding="utf-8")
    tree = ast.parse(source)
    classes = {node.name: [ast.unparse(b) for b in node.bases] for node in tree.body if isinstance(node, ast.ClassDef)}
    assert classes[module] == ["ScriptedLoadableModule"]
    assert classes[f"{module}Widget"] == ["ScriptedLoadableModuleWidget"]
    # our base first: ScriptedLoadableModuleLogic.__init__ calls super().__init__() (constructed for real in
    # test_slicer_real_modules.py)
    assert classes[f"{module}Logic"][-1] == "ScriptedLoadableModuleLogic"
    assert classes[f"{module}Test"] == ["ScriptedLoadableModuleTest"]
    for attribute in ("title", "categories", "contributors", "helpText", "acknowledgementText"):
        assert f"self.parent.{attribute} = " in source  # the generic module test checks they are set
    # SlicerNNUnet's shape: the module file mounts the widget of <M>Lib/Widget.py and holds no UI code
    assert f"from {module}Lib.Widget import Widget" in source and "self.ui." not in source
    widget = (REPO / module / f"{module}Lib" / "Widget.py").read_text(encoding="utf-8")
    assert f'UI_FILE = Path(__file__).resolve().parent.parent / "Resources" / "UI" / "{module}.ui"' in widget
    assert (REPO / module / "Resources" / "Icons" / f"{module}.png").is_file()
    # neither module imports the other
    other = next(m for m in MODULES if m != module)
    for path in (REPO / module).rglob("*.py"):
        assert f"{other}Lib" not in path.read_text(encoding="utf-8"), f"{path} imports {other}'s code"
    # the core is never re-implemented in the module: no torch, no numpy maths in the Slicer layer
    assert not re.search(r"^\s*import torch|^\s*from torch", source, re.M)


def test_ui_parameter_names_are_fields_of_the_parameter_node() -> None:
    """Each widget with a ``SlicerParameterName`` binds (``connectGui``) to a field of the node's class and type."""
    _, root = ui_widgets("SepaRegSegment")
    bound = {}
    for widget in root.iter("widget"):
        name = widget.find("property[@name='SlicerParameterName']/string")
        if name is not None:
            bound[name.text] = [s.text for s in widget.find("property[@name='nodeTypes']").iter("string")]
    tree = ast.parse((REPO / "SepaRegSegment" / "SepaRegSegmentLib" / "Parameters.py").read_text(encoding="utf-8"))
    [cls] = [node for node in tree.body if isinstance(node, ast.ClassDef)]
    assert [ast.unparse(d) for d in cls.decorator_list] == ["parameterNodeWrapper"]
    fields = {node.target.id: ast.unparse(node.annotation) for node in cls.body if isinstance(node, ast.AnnAssign)}
    assert set(bound) == set(fields) and len(bound) == 9
    for name, types in bound.items():
        assert types == [fields[name].removeprefix("Optional[").removesuffix("]")], name


def module_and_core_files() -> set[str]:
    files = set()
    for module in MODULES:
        folder = REPO / module
        files |= {str(p.relative_to(REPO)) for p in folder.rglob("*.py") if "__pycache__" not in p.parts}
        files |= {str(p.relative_to(REPO)) for p in (folder / "Resources").rglob("*") if p.is_file()}
    files |= {str(p.relative_to(REPO)) for p in (REPO / "separeg").rglob("*.py") if "__pycache__" not in p.parts}
    return files


@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake is not installed")
def test_cmake_configures_against_a_stub_slicer_and_lists_every_file(tmp_path: Path) -> None:
    result = subprocess.run(["cmake", "-S", str(REPO), "-B", str(tmp_path), f"-DSlicer_DIR={REPO}/Testing/cmake/"
                             "SlicerStub"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    listed = {line.split(" ", 1)[1] for line in (tmp_path / "listed_files.txt").read_text().splitlines() if line}
    assert module_and_core_files() <= listed, f"not in any CMakeLists.txt: {sorted(module_and_core_files() - listed)}"
    metadata = dict(line.split("=", 1) for line in (tmp_path / "extension_metadata.txt").read_text().splitlines())
    assert metadata["MODULES"] == "SepaRegSegment;SepaRegPretrain"
    assert all(metadata[f"EXTENSION_{k}"] for k in ("HOMEPAGE", "CONTRIBUTORS", "DESCRIPTION", "ICONURL",
                                                     "SCREENSHOTURLS"))
    catalog = json.loads((REPO / "Resources" / "ExtensionsIndex" / "SepaReg.json").read_text())
    assert catalog["category"] == metadata["EXTENSION_CATEGORY"] == "Segmentation"
    assert catalog["build_dependencies"] == metadata["EXTENSION_DEPENDS"].split() == ["PyTorch"]
    for url in (metadata["EXTENSION_ICONURL"], *metadata["EXTENSION_SCREENSHOTURLS"].split()):
        assert (REPO / url.split("/main/", 1)[1]).is_file(), url


def test_a_missing_listed_file_fails_the_configure(tmp_path: Path) -> None:
    if shutil.which("cmake") is None:
        pytest.skip("cmake is not installed")
    source = tmp_path / "src"
    shutil.copytree(REPO / "SepaRegPretrain", source / "SepaRegPretrain")
    (source / "SepaRegPretrain" / "SepaRegPretrainLib" / "Logic.py").unlink()
    (source / "CMakeLists.txt").write_text("cmake_minimum_required(VERSION 3.16)\nproject(T NONE)\n"
                                           "find_package(Slicer REQUIRED)\ninclude(${Slicer_USE_FILE})\n"
                                           "add_subdirectory(SepaRegPretrain)\n")
    result = subprocess.run(["cmake", "-S", str(source), "-B", str(tmp_path / "b"),
                             f"-DSlicer_DIR={REPO}/Testing/cmake/SlicerStub"], capture_output=True, text=True,
                            timeout=300)
    stderr = " ".join(result.stderr.split())  # cmake wraps long messages
    assert result.returncode != 0 and "SepaRegPretrainLib/Logic.py does not exist" in stderr


def test_install_requirements_never_touch_slicers_packages() -> None:
    from importlib import metadata

    from separeg.requirements import PROTECTED, REQUIREMENTS, constraints, missing_requirements, satisfies

    pyproject = (REPO / "pyproject.toml").read_text()
    for requirement in REQUIREMENTS:
        assert f'"{requirement}"' in pyproject, f"{requirement} differs from pyproject.toml"
    installed = {"monai": "1.6.1", "safetensors": "0.4.5", "scikit-image": "0.26.0", "scikit-learn": "1.5.0",
                 "scipy": "1.14.0", "matplotlib": "3.9.0", "pydicom": "3.0.2", "highdicom": "0.27.0",
                 "numpy": "2.4.6", "SimpleITK": "2.5.0", "vtk": "9.4.0", "torch": "2.5.1"}

    def lookup(name: str) -> str:
        if name not in installed:
            raise metadata.PackageNotFoundError(name)
        return installed[name]

    assert missing_requirements(lookup) == []
    installed["monai"] = "1.3.0"  # too old -> reinstalled within the range
    del installed["highdicom"]
    assert missing_requirements(lookup) == ["monai>=1.4,<1.7", "highdicom>=0.23,<0.28"]
    installed["pydicom"] = "2.0.0"  # Slicer's own, outside our range: kept, never replaced
    assert "pydicom>=2.4,<4" not in missing_requirements(lookup)
    pins = constraints(lookup)
    for name in PROTECTED:
        assert f"{name}=={installed[name]}" in pins
    assert satisfies("1.6.1", ">=1.4,<1.7") and not satisfies("1.7.0", ">=1.4,<1.7")


# Top-level names of Slicer's, Qt's and the Slicer extensions' Python modules (what only Slicer's Python has).
SLICER_ONLY = {"slicer", "qt", "ctk", "PythonQt", "mrml", "PyTorchUtils", "DICOMLib", "SegmentEditorEffects"}


def test_the_core_never_imports_slicer() -> None:
    """DESIGN §1: separeg/ has no Slicer, Qt or VTK imports, at module level or in a function; Slicer is passed in
    (``separeg.slicer_install`` takes the ``slicer`` module and looks up the optional PyTorch extension by name)."""
    offenders = []
    for path in sorted((REPO / "separeg").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            offenders += [f"{path.relative_to(REPO)}:{node.lineno} {name}" for name in names
                          if name.split(".")[0] in SLICER_ONLY or name.split(".")[0].startswith(("vtk", "qMRML"))]
    assert not offenders, offenders
