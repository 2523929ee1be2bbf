"""Stand-ins for building the module panels (``*Lib/Widget.py``), which need Slicer's Qt application.

:func:`load_ui` builds the ``.ui`` file's named widgets with the properties the .ui sets and keeps what the panel code
reads back (combo box items, label texts, button states, signal connections); nothing is drawn. Only the calls the
panels make exist: a new call fails with AttributeError, so the fakes grow with the panels instead of accepting
anything. :func:`install_panel_fakes` puts them, with a ``slicer`` and ``qt`` to match, into a process of its own
(``test_slicer_stock.py`` runs the panels in a subprocess). Signatures follow PythonQt and Slicer's ``slicer/util.py``.
"""

from __future__ import annotations

import sys
import types
import xml.etree.ElementTree as ET
from pathlib import Path


class FakeLayout:
    def __init__(self) -> None:
        self.rows: list[tuple] = []

    def addRow(self, *items) -> None:
        self.rows.append(items)

    def insertRow(self, row: int, *items) -> None:
        self.rows.insert(row, items)

    def removeRow(self, item) -> None:
        self.rows = [r for r in self.rows if item not in r]

    def addWidget(self, widget) -> None:
        self.rows.append((widget,))


class FakeWidget:
    """A named widget of the .ui: its properties as attributes, its connections in ``connections``."""

    def __init__(self, cls: str = "QWidget", name: str = "", **properties) -> None:
        self.cls, self.name, self.connections = cls, name, []
        self.text, self.toolTip, self.enabled, self.checked, self.value = "", "", True, False, 0
        self.currentPath, self.scene, self._node = "", None, None
        self.__dict__.update(properties)
        self._layout, self._parent = FakeLayout(), None

    def connect(self, signal: str, slot) -> None:
        self.connections.append((signal, slot))

    def setMRMLScene(self, scene) -> None:
        self.scene = scene

    def layout(self) -> FakeLayout:
        return self._layout

    def parentWidget(self) -> FakeWidget:
        if self._parent is None:
            self._parent = FakeWidget()
        return self._parent

    # qMRMLNodeComboBox
    def currentNode(self):
        return self._node

    def setCurrentNode(self, node) -> None:
        self._node = node

    # QLineEdit, QPlainTextEdit, QTableWidget, QListWidget, QProgressBar
    def clear(self) -> None:
        self.text, self.items = "", []

    def appendPlainText(self, text: str) -> None:
        self.text += text + "\n"

    def setRowCount(self, rows: int) -> None:
        self.rows = rows

    def setItem(self, row: int, column: int, item) -> None:
        pass

    def resizeColumnsToContents(self) -> None:
        pass

    def currentRow(self) -> int:
        return -1

    def addItem(self, item) -> None:
        self.__dict__.setdefault("items", []).append(item)

    @property
    def count(self) -> int:
        return len(self.__dict__.get("items", []))

    def item(self, index: int):
        return self.items[index]

    def setFormat(self, text: str) -> None:
        self.format = text


class FakeComboBox(FakeWidget):
    """``QComboBox``: items as ``(text, data, tooltip)``; the first item added becomes current, as in Qt."""

    def __init__(self, cls: str = "QComboBox", name: str = "", **properties) -> None:
        super().__init__(cls, name, **properties)
        self.items: list[list] = []
        self.currentIndex = -1

    def addItem(self, text: str, data=None) -> None:
        self.items.append([text, data, ""])
        if self.currentIndex < 0:
            self.currentIndex = 0

    def clear(self) -> None:
        self.items, self.currentIndex = [], -1

    def setItemData(self, index: int, value, role) -> None:
        self.items[index][2] = value

    def findData(self, data) -> int:
        return next((i for i, item in enumerate(self.items) if item[1] == data), -1)

    def setCurrentIndex(self, index: int) -> None:
        self.currentIndex = index

    @property
    def count(self) -> int:
        return len(self.items)

    @property
    def currentData(self):
        return self.items[self.currentIndex][1] if 0 <= self.currentIndex < len(self.items) else None

    @property
    def currentText(self) -> str:
        return self.items[self.currentIndex][0] if 0 <= self.currentIndex < len(self.items) else ""


def _property(element: ET.Element):
    value = element[0]
    return {"string": lambda t: t or "", "number": int, "bool": lambda t: t == "true"}.get(value.tag, str)(value.text)


def load_ui(path: str | Path) -> FakeWidget:
    """The .ui file's top widget; ``children`` holds every named widget with the properties the .ui gives it."""
    root = ET.parse(path).getroot()
    top = FakeWidget("qMRMLWidget")
    top.children = {}
    for element in root.iter("widget"):
        props = {p.get("name"): _property(p) for p in element.findall("property") if len(p)}
        props.pop("name", None)
        cls = FakeComboBox if element.get("class") == "QComboBox" else FakeWidget
        widget = cls(element.get("class"), element.get("name"), **props)
        if cls is FakeComboBox:
            for item in element.findall("item"):
                widget.addItem(next((_property(p) for p in item.findall("property")), ""))
        top.children[element.get("name")] = widget
    return top


class FakeTimer:
    def __init__(self) -> None:
        self.running, self.connections = False, []

    def setInterval(self, ms: int) -> None:
        self.interval = ms

    def connect(self, signal: str, slot) -> None:
        self.connections.append((signal, slot))

    def start(self) -> None:
        self.running = True

    def stop(self) -> None:
        self.running = False


class FakeListWidgetItem:
    def __init__(self, text: str = "") -> None:
        self.text, self.data_, self.flags_, self.state = text, {}, 0, 0

    def setData(self, role, value) -> None:
        self.data_[role] = value

    def data(self, role):
        return self.data_.get(role)

    def flags(self) -> int:
        return self.flags_

    def setFlags(self, flags: int) -> None:
        self.flags_ = flags

    def setCheckState(self, state) -> None:
        self.state = state

    def checkState(self):
        return self.state


def fake_qt() -> types.ModuleType:
    """A ``qt`` module with the classes and constants the panels use; QSettings starts empty (a fresh Slicer)."""
    qt = types.ModuleType("qt", "stand-in for PythonQt's qt (Testing/slicer_fakes.py)")
    qt.Qt = types.SimpleNamespace(ToolTipRole=3, UserRole=256, ItemIsUserCheckable=16, Checked=2, Unchecked=0,
                                  WaitCursor=16)
    qt.QTimer = FakeTimer
    qt.QListWidgetItem = FakeListWidgetItem
    qt.QProgressBar = lambda: FakeWidget("QProgressBar")
    qt.QTableWidgetItem = lambda text="": types.SimpleNamespace(text=text)
    qt.QSettings = lambda: types.SimpleNamespace(value=lambda key, default=None: default,
                                                 setValue=lambda key, value: None)
    qt.QFileDialog = types.SimpleNamespace(getOpenFileName=lambda *a: "", getSaveFileName=lambda *a: "")
    return qt


class FakePanelScene:
    """The scene as the panels and ``ScriptedLoadableModuleLogic`` use it: observers and a parameter node."""

    StartCloseEvent, EndCloseEvent = "StartCloseEvent", "EndCloseEvent"

    def __init__(self) -> None:
        self.observers: dict[int, tuple] = {}

    def AddObserver(self, event, callback) -> int:
        self.observers[len(self.observers) + 1] = (event, callback)
        return len(self.observers)

    def RemoveObserver(self, tag: int) -> None:
        self.observers.pop(tag, None)

    def GetSingletonNode(self, tag: str, cls: str):
        return None

    def CreateNodeByClass(self, cls: str):
        node = types.SimpleNamespace(attributes={}, UnRegister=lambda owner: None, SetName=lambda name: None,
                                     SetSingletonTag=lambda tag: None)
        node.SetAttribute = node.attributes.__setitem__
        node.GetAttribute = node.attributes.get
        return node

    def AddNode(self, node):
        return node

    def GenerateUniqueName(self, name: str) -> str:
        return name


def parameter_node_wrapper(cls: type) -> type:
    """``slicer.parameterNodeWrapper.parameterNodeWrapper``: wraps a node; binding the GUI only returns a tag."""

    class Wrapped:
        def __init__(self, node) -> None:
            self.node = node

        def connectGui(self, gui) -> object:
            return object()

        def disconnectGui(self, tag) -> None:
            pass

    Wrapped.__name__ = Wrapped.__qualname__ = cls.__name__
    return Wrapped


class FakeModuleWidget:
    """``ScriptedLoadableModuleWidget``: the module's layout, into which ``setup()`` puts the panel."""

    def __init__(self, parent=None) -> None:
        self.parent, self.layout = parent, FakeLayout()

    def setup(self) -> None:
        pass


def install_panel_fakes(temporary_path: str | Path, calls: types.SimpleNamespace) -> types.ModuleType:
    """Put a ``slicer`` (with ``ScriptedLoadableModule`` and ``parameterNodeWrapper``), ``qt`` and ``ctk`` for building
    the module panels into ``sys.modules``, for a process of its own (nothing is undone); returns the ``slicer``.

    ``calls`` records the dialogs (``errors``, ``asked``) and Slicer 5.12's ``slicer.packaging.pip_ensure`` calls
    (``pip_ensure``: ``(requirements, keyword arguments)``); ``confirmOkCancelDisplay`` answers ``calls.confirm``.
    """
    from contextlib import contextmanager

    for name in ("errors", "asked", "pip_ensure"):
        calls.__dict__.setdefault(name, [])

    @contextmanager
    def try_with_error_display(message=None, show=True, waitCursor=False):
        try:
            yield
        except Exception as exc:  # as Slicer's: shows the error, then raises it again
            calls.errors.append(f"{message}\n\n{exc}" if message else str(exc))
            raise

    slicer = types.ModuleType("slicer", "stand-in for Slicer's slicer package, for the panels (slicer_fakes.py)")
    slicer.mrmlScene = FakePanelScene()
    slicer.app = types.SimpleNamespace(temporaryPath=str(temporary_path), testingEnabled=lambda: False)
    slicer.modules = types.SimpleNamespace()
    slicer.selfTests = {}
    slicer.vtkMRMLScalarVolumeNode = type("vtkMRMLScalarVolumeNode", (), {})
    slicer.vtkMRMLSegmentationNode = type("vtkMRMLSegmentationNode", (), {})
    slicer.qMRMLNodeComboBox = lambda: FakeWidget("qMRMLNodeComboBox")
    slicer.util = types.SimpleNamespace(
        loadUI=load_ui, childWidgetVariables=lambda widget: types.SimpleNamespace(**widget.children),
        errorDisplay=lambda text, *a, **k: calls.errors.append(text),
        confirmOkCancelDisplay=lambda text, *a, **k: calls.asked.append(text) or calls.confirm,
        tryWithErrorDisplay=try_with_error_display, mainWindow=lambda: None,
        setSliceViewerLayers=lambda **kwargs: None)
    slicer.packaging = types.SimpleNamespace(
        pip_ensure=lambda requirements, **kwargs: calls.pip_ensure.append((list(requirements), kwargs)))
    wrapper = types.ModuleType("slicer.parameterNodeWrapper")
    wrapper.parameterNodeWrapper = parameter_node_wrapper
    sys.modules.update({"slicer": slicer, "slicer.parameterNodeWrapper": wrapper, "qt": fake_qt(),
                        "ctk": types.ModuleType("ctk")})
    slicer.parameterNodeWrapper = wrapper

    import slicer_scripted_module  # Slicer's module, logic and test classes (it imports the slicer above)

    scripted = types.ModuleType("slicer.ScriptedLoadableModule")
    scripted.__dict__.update({k: v for k, v in vars(slicer_scripted_module).items() if not k.startswith("__")})
    scripted.ScriptedLoadableModuleWidget = FakeModuleWidget
    sys.modules["slicer.ScriptedLoadableModule"] = slicer.ScriptedLoadableModule = scripted
    return slicer
