"""The real-MRML test tier: module code runs against Slicer's own MRML, module logics and ``slicer.util``.

PyPI ``slicer-core`` (Kitware; ``pip install -e '.[slicer-core]'``, which ``make test`` does) holds Slicer's compiled
MRML, MRMLLogic, vtkSegmentationCore, the Volumes / Segmentations / Terminologies / Colors / SubjectHierarchy module
logics and Slicer's real ``slicer/util.py``. It has no Qt application. :func:`install` (behind the ``real_slicer``
fixture of the ``test_slicer_*`` files) makes the ``slicer`` the module code imports look like Slicer's:

Real (Slicer's code, from the wheel):
  ``slicer.mrmlScene`` (a ``vtkMRMLScene`` with Slicer's data IO set up by ``vtkSlicerApplicationLogic.
  SetMRMLSceneDataIO``), ``slicer.modules.<name>.logic()`` for volumes, segmentations, terminologies, colors and
  subjecthierarchy (created and bound the way ``qSlicerAbstractCoreModule::logic()`` does: module share directory,
  application logic, scene, then ``SetModuleLogic``), every ``slicer.util`` function, storage nodes, readers
  (``AddArchetypeVolume``, ``LoadSegmentationFromFile``) and writers (``WriteData``).

Stand-ins (what the wheel lacks; each as small as the module code needs):
  - ``slicer.app``: ``temporaryPath``, ``coreIOManager()`` / ``ioManager()`` (:class:`CoreIOManager`),
    ``processEvents``, ``applicationLogic()``, ``mrmlScene()``, ``testingEnabled()``.
  - :class:`CoreIOManager`: ``qSlicerCoreIOManager``'s dispatch only (file type by extension, volume / segmentation
    readers, ``exportNodes`` as in ``Base/QTCore/qSlicerCoreIOManager.cxx``); the reading and writing are the real
    logics' and storage nodes'.
  - ``slicer.modules``: a namespace of module stand-ins whose ``logic()`` is the real logic; scripted modules are
    added by :func:`loadScriptedModule`, which constructs them as Slicer's module factory does.
  - ``slicer.ScriptedLoadableModule``: ``Testing/slicer_scripted_module.py`` (written from Slicer's source).
  - ``qt`` and ``ctk``: empty modules, so that module files import; nothing in this tier constructs a widget.
  - the terminology tables: Slicer's DICOM-master JSON files (``Testing/data/slicer_terminologies``, see its
    README), which the wheel does not ship, given to the terminology logic as its module share directory.

Kept alive: one application logic, scene and set of module logics per test session (the module logics hold a raw
pointer to the application logic: letting it be garbage-collected segfaults in ``AddArchetypeVolume``). Each test gets
the scene cleared, as Slicer's self-tests do with ``slicer.mrmlScene.Clear()``.
"""

from __future__ import annotations

import gzip
import importlib
import os
import sys
import tempfile
import types
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TERMINOLOGIES = Path(__file__).resolve().parent / "data" / "slicer_terminologies"
INSTALL_HINT = "pip install -e '.[slicer-core]' (make test installs it)"
# (module name in slicer.modules, its name in Slicer, the logic class); the order of Slicer's dependencies.
CORE_MODULES = (
    ("colors", "Colors", "vtkSlicerColorLogic"),
    ("subjecthierarchy", "SubjectHierarchy", "vtkSlicerSubjectHierarchyModuleLogic"),
    ("terminologies", "Terminologies", "vtkSlicerTerminologiesModuleLogic"),
    ("volumes", "Volumes", "vtkSlicerVolumesLogic"),
    ("segmentations", "Segmentations", "vtkSlicerSegmentationsModuleLogic"),
)
# qSlicerVolumesReader / qSlicerSegmentationsReader file types, by extension (longest first).
VOLUME_EXTENSIONS = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
SEGMENTATION_EXTENSIONS = (".seg.nrrd", ".seg.nhdr")
# qSlicerVolumesReader::load property -> AddArchetypeVolume option bit.
VOLUME_OPTIONS = {"labelmap": 0x1, "center": 0x2, "singleFile": 0x4, "autoWindowLevel": 0x8, "discardOrientation": 0x10}


def unavailable_reason() -> str | None:
    """Why the tier cannot run here (``None`` when slicer-core imports)."""
    try:
        import slicer
        import slicer_core  # noqa: F401
    except ImportError as exc:
        return f"slicer-core is not installed ({exc}); {INSTALL_HINT}"
    if not hasattr(slicer, "vtkMRMLScene"):
        return f"the 'slicer' module here is not slicer-core's; {INSTALL_HINT}"
    return None


class CoreIOManager:
    """``qSlicerCoreIOManager`` stand-in: which reader or writer; the real logics and storage nodes do the work."""

    def __init__(self, session: Session) -> None:
        self.session = session

    def fileType(self, fileName) -> str:
        name = str(fileName).lower()
        if name.endswith(SEGMENTATION_EXTENSIONS):
            return "SegmentationFile"
        if name.endswith(VOLUME_EXTENSIONS):
            return "VolumeFile"
        return "NoFile"

    def loadNodes(self, fileType, properties, loadedNodes=None, userMessages=None) -> bool:
        fileName = str(properties["fileName"])
        if fileType == "VolumeFile":
            node = self._loadVolume(fileName, properties)
        elif fileType == "SegmentationFile":
            logic = self.session.logics["segmentations"]
            colorNode = self.session.scene.GetNodeByID(properties["colorNodeID"]) if "colorNodeID" in properties \
                else None
            node = logic.LoadSegmentationFromFile(fileName, bool(properties.get("autoOpacities", True)),
                                                  str(properties.get("name", "")), colorNode, userMessages)
        else:
            raise NotImplementedError(f"the tier's IO manager reads volumes and segmentations, not {fileType}")
        if node is None:
            return False
        if loadedNodes is not None:
            loadedNodes.AddItem(node)
        return True

    def _loadVolume(self, fileName: str, properties: dict):
        """As ``qSlicerVolumesReader::load`` (Modules/Loadable/Volumes/qSlicerVolumesReader.cxx)."""
        import vtk

        name = properties.get("name") or Path(fileName).name.split(".")[0]  # QFileInfo::baseName
        options = sum(bit for key, bit in VOLUME_OPTIONS.items() if properties.get(key))
        fileList = None
        if "fileNames" in properties:
            fileList = vtk.vtkStringArray()
            for path in properties["fileNames"]:
                fileList.InsertNextValue(str(path))
        node = self.session.logics["volumes"].AddArchetypeVolume(fileName, name, options, fileList)
        if node is not None and properties.get("colorNodeID"):
            node.GetVolumeDisplayNode().SetAndObserveColorNodeID(properties["colorNodeID"])
        if node is not None and properties.get("show", True):
            selection = self.session.appLogic.GetSelectionNode()
            if node.IsA("vtkMRMLLabelMapVolumeNode"):
                selection.SetActiveLabelVolumeID(node.GetID())
            else:
                selection.SetActiveVolumeID(node.GetID())
        return node

    def fileWriterExtensions(self, node) -> list[str]:
        """The node's storage node's write formats ("NifTI (.nii.gz)", ...), as Slicer lists them."""
        storage = node.GetStorageNode()
        created = storage is None
        if created:
            storage = node.CreateDefaultStorageNode()
            self.session.scene.AddNode(storage)  # the formats come from the scene's data IO manager
        try:
            formats = storage.GetSupportedWriteFileTypes()
            return [formats.GetValue(i) for i in range(formats.GetNumberOfValues())]
        finally:
            if created:
                self.session.scene.RemoveNode(storage)

    def extractKnownExtension(self, fileName, node) -> str:
        import slicer

        name = str(fileName).lower()
        known = [slicer.vtkDataFileFormatHelper.GetFileExtensionFromFormatString(f)
                 for f in self.fileWriterExtensions(node)]
        matches = [ext for ext in known if ext and name.endswith(ext.lower())]
        return max(matches, key=len) if matches else ""

    def exportNodes(self, nodeIDs, fileNames, properties, hardenTransforms=False, userMessages=None) -> bool:
        """As ``qSlicerCoreIOManager::exportNodes``: a copy in a temporary scene, written by its storage node."""
        import slicer

        scene = self.session.scene
        temporaryScene = slicer.vtkMRMLScene()
        scene.CopyDefaultNodesToScene(temporaryScene)
        scene.CopyRegisteredNodesToScene(temporaryScene)
        scene.CopySingletonNodesToScene(temporaryScene)
        temporaryScene.SetDataIOManager(scene.GetDataIOManager())
        if hardenTransforms:
            raise NotImplementedError("the tier's IO manager does not harden transforms")
        success = True
        for nodeID, fileName in zip(nodeIDs, fileNames, strict=True):
            node = scene.GetNodeByID(nodeID)
            copy = temporaryScene.AddNewNodeByClass(node.GetClassName())
            copy.CopyContent(node, False)
            if not copy.AddDefaultStorageNode():
                success = False
                continue
            storage = copy.GetStorageNode()
            storage.SetFileName(str(fileName))
            if properties.get("fileFormat"):
                storage.SetWriteFileFormat(properties["fileFormat"])
            if "useCompression" in properties:
                storage.SetUseCompression(int(bool(properties["useCompression"])))
            success = bool(storage.WriteData(copy)) and success
        temporaryScene.Clear(1)
        return success


@dataclass
class ModuleStandIn:
    """``slicer.modules.<name>``: a module's name, path and ``logic()``; metadata for scripted modules."""

    name: str
    path: str = ""
    _logic: object = None
    title: str = ""
    categories: list = field(default_factory=list)
    dependencies: list = field(default_factory=list)
    contributors: list = field(default_factory=list)
    helpText: str = ""
    acknowledgementText: str = ""

    def logic(self):
        return self._logic


class AppStandIn:
    """``slicer.app`` stand-in: paths, the IO manager and the application logic."""

    def __init__(self, session: Session, temporaryPath: Path) -> None:
        self.session = session
        self.temporaryPath = str(temporaryPath)
        self.slicerHome = str(session.home)

    def coreIOManager(self) -> CoreIOManager:
        return self.session.io

    ioManager = coreIOManager

    def applicationLogic(self):
        return self.session.appLogic

    def mrmlScene(self):
        return self.session.scene

    def processEvents(self) -> None:
        pass

    def testingEnabled(self) -> bool:
        return True


class Session:
    """One application logic, scene and set of module logics, kept alive for the whole test session."""

    def __init__(self) -> None:
        import slicer

        self.home = Path(tempfile.mkdtemp(prefix="SepaReg-slicer-home-"))
        (self.home / "share" / "ColorFiles").mkdir(parents=True)  # no default colour files: none are needed
        terminologies = self.home / "share" / "Terminologies"
        terminologies.mkdir()
        for packed in TERMINOLOGIES.glob("*.json.gz"):  # the logic loads <name>.term.json from its share directory
            name = packed.name.removesuffix(".json.gz") + ".term.json"
            (terminologies / name).write_bytes(gzip.decompress(packed.read_bytes()))
        self.scene = slicer.vtkMRMLScene()
        self.appLogic = slicer.vtkSlicerApplicationLogic()
        self.appLogic.SetMRMLScene(self.scene)
        self.remoteIO, self.dataIO = slicer.vtkMRMLRemoteIOLogic(), slicer.vtkDataIOManagerLogic()
        self.appLogic.SetMRMLSceneDataIO(self.scene, self.remoteIO, self.dataIO)
        self.appLogic.SetHomeDirectory(str(self.home))
        self.appLogic.SetShareDirectory("share")
        self.logics = {}
        for key, name, cls in CORE_MODULES:
            logic = getattr(slicer, cls)()
            if name == "Terminologies":
                logic.SetModuleShareDirectory(str(terminologies))
            logic.SetMRMLApplicationLogic(self.appLogic)
            logic.SetMRMLScene(self.scene)
            self.appLogic.SetModuleLogic(name, logic)
            if name == "Colors":
                self.appLogic.SetColorLogic(logic)
            self.logics[key] = logic
        self.io = CoreIOManager(self)


_SESSION: Session | None = None  # module global: never garbage-collected before the process ends
QT = types.ModuleType("qt", "stand-in: an empty module (the tier constructs no widget)")
CTK = types.ModuleType("ctk", "stand-in: an empty module (the tier constructs no widget)")


def install(monkeypatch, tmp_path: Path):
    """Make ``import slicer`` give Slicer's real MRML with the stand-ins above; returns the ``slicer`` module.

    The scene is cleared first; ``slicer.app.temporaryPath`` is ``tmp_path``; everything set here is undone by
    ``monkeypatch`` after the test (the session's scene and logics stay alive).
    """
    global _SESSION
    reason = unavailable_reason()
    if reason:
        import pytest

        if os.environ.get("CI"):
            pytest.fail(reason)  # CI installs the tier: it must run there
        pytest.skip(reason)
    if "slicer" in sys.modules and not hasattr(sys.modules["slicer"], "vtkMRMLScene"):
        monkeypatch.delitem(sys.modules, "slicer")  # a fake left by another test's monkeypatch
    slicer = importlib.import_module("slicer")
    if _SESSION is None:
        _SESSION = Session()
    session = _SESSION
    session.scene.Clear(0)
    import slicer_scripted_module

    monkeypatch.setitem(sys.modules, "qt", QT)
    monkeypatch.setitem(sys.modules, "ctk", CTK)
    monkeypatch.setitem(sys.modules, "slicer.ScriptedLoadableModule", slicer_scripted_module)
    monkeypatch.setattr(slicer, "ScriptedLoadableModule", slicer_scripted_module, raising=False)
    monkeypatch.setattr(slicer, "mrmlScene", session.scene, raising=False)
    monkeypatch.setattr(slicer, "app", AppStandIn(session, tmp_path), raising=False)
    modules = types.SimpleNamespace(**{key: ModuleStandIn(name, _logic=session.logics[key])
                                       for key, name, _ in CORE_MODULES})
    monkeypatch.setattr(slicer, "modules", modules, raising=False)
    monkeypatch.setattr(slicer, "selfTests", {}, raising=False)
    for name in ("SepaRegSegment", "SepaRegPretrain"):  # module files import afresh against these stand-ins
        monkeypatch.delitem(sys.modules, name, raising=False)
    return slicer


def loadScriptedModule(monkeypatch, name: str):
    """Import ``<name>/<name>.py`` and construct its module class as Slicer's scripted module factory does.

    Returns ``(python module, module instance)``; ``slicer.modules.<name lowercase>`` is then the module's parent with
    the metadata the module set (what Slicer's generic module test checks).
    """
    import slicer

    path = REPO / name / f"{name}.py"
    folder = str(path.parent)
    if folder not in sys.path:
        monkeypatch.syspath_prepend(folder)
    monkeypatch.delitem(sys.modules, name, raising=False)
    python = importlib.import_module(name)
    parent = ModuleStandIn(name, path=str(path))
    instance = getattr(python, name)(parent)
    setattr(slicer.modules, name.lower(), parent)
    return python, instance
