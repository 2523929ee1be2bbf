"""Stand-in for Slicer's ``slicer.ScriptedLoadableModule`` (absent from the slicer-core wheels), for the real-MRML tier.

Written from Slicer's source, ``Base/Python/slicer/ScriptedLoadableModule.py`` in github:Slicer/Slicer at commit
583e9b37d50ead7daf7b783dce465ccaecec8809 (2026-08-21; the file last changed in
ff1bfd66c1e0793552e6f10dbab352ce5788b73a), keeping what decides how Slicer *constructs* module classes, and nothing
that needs the Qt application:

- Since Slicer 5.0 (commit 917c02e00b "BUG: Fix broken multiple inheritance in ScriptedLoadableModule classes",
  2022-03-07) every base ``__init__`` calls ``super().__init__()`` with no arguments, cooperatively. A class such as
  ``MLogic(ScriptedLoadableModuleLogic, MyLogic)`` therefore runs ``MyLogic.__init__()`` without arguments when
  Slicer constructs it; this stand-in does exactly the same, so the tier fails the same way Slicer does.
- ``ScriptedLoadableModule.__init__(parent)``: resets the parent's metadata, sets ``moduleName``, registers
  ``slicer.selfTests[moduleName] = self.runTest``; ``resourcePath()``; ``runTest()`` finds ``<ModuleName>Test``.
- ``ScriptedLoadableModuleLogic``: ``moduleName``, ``isSingletonParameterNode``, ``getParameterNode()``,
  ``getAllParameterNodes()`` and ``createParameterNode()`` as in Slicer, on the real MRML scene.
- ``ScriptedLoadableModuleTest``: a ``unittest.TestCase`` whose ``__init__`` also calls
  ``super(unittest.TestCase, self).__init__()`` (Slicer/Slicer#6243); ``delayDisplay()`` only logs (Slicer's shows a
  popup, then logs).

Left out (they need Qt): the icon, ``getDefaultModuleDocumentationLink``, the widget's developer section, reload and
edit buttons, ``takeScreenshot``. ``ScriptedLoadableModuleWidget`` is here only so that module files import; it
raises when constructed, because widgets are tested against fakes (see Testing/README.md).
"""

from __future__ import annotations

import importlib
import logging
import os
import unittest

import slicer

__all__ = ["ScriptedLoadableModule", "ScriptedLoadableModuleWidget", "ScriptedLoadableModuleLogic",
           "ScriptedLoadableModuleTest"]
SLICER_COMMIT = "583e9b37d50ead7daf7b783dce465ccaecec8809"


class ScriptedLoadableModule:
    def __init__(self, parent):
        super().__init__()
        self.parent = parent
        self.moduleName = self.__class__.__name__
        parent.title = ""
        parent.categories = []
        parent.dependencies = []
        parent.contributors = ["Andras Lasso (PerkLab, Queen's University), Steve Pieper (Isomics)"]
        parent.helpText = "This module was created from a template and the help section has not yet been updated."
        parent.acknowledgementText = "This work is supported by NA-MIC, NAC, BIRN, NCIGT, and the Slicer Community."
        if not hasattr(slicer, "selfTests"):
            slicer.selfTests = {}
        slicer.selfTests[self.moduleName] = self.runTest

    def resourcePath(self, filename):
        return os.path.join(os.path.dirname(self.parent.path), "Resources", filename)

    def runTest(self, msec=100, **kwargs):
        module = importlib.import_module(self.__module__)
        className = self.moduleName + "Test"
        try:
            TestCaseClass = getattr(module, className)
        except AttributeError:
            raise AssertionError(f"Test case class not found: {self.__module__}.{className} ") from None
        testCase = TestCaseClass()
        testCase.messageDelay = msec
        testCase.runTest(**kwargs)


class ScriptedLoadableModuleWidget:
    def __init__(self, parent=None):
        raise NotImplementedError("module widgets need Slicer's Qt application; they are tested against fakes")


class ScriptedLoadableModuleLogic:
    def __init__(self, parent=None):
        super().__init__()
        self.moduleName = self.__class__.__name__
        if self.moduleName.endswith("Logic"):
            self.moduleName = self.moduleName[:-5]
        self.isSingletonParameterNode = True

    def getParameterNode(self):
        if self.isSingletonParameterNode:
            parameterNode = slicer.mrmlScene.GetSingletonNode(self.moduleName, "vtkMRMLScriptedModuleNode")
            if parameterNode:
                if parameterNode.GetAttribute("ModuleName") != self.moduleName:
                    parameterNode.SetAttribute("ModuleName", self.moduleName)
                return parameterNode
        else:
            for parameterNode in self.getAllParameterNodes():
                return parameterNode
        return slicer.mrmlScene.AddNode(self.createParameterNode())

    def getAllParameterNodes(self):
        found = []
        for index in range(slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLScriptedModuleNode")):
            parameterNode = slicer.mrmlScene.GetNthNodeByClass(index, "vtkMRMLScriptedModuleNode")
            if parameterNode.GetAttribute("ModuleName") == self.moduleName:
                found.append(parameterNode)
        return found

    def createParameterNode(self):
        if slicer.mrmlScene is None:
            return None
        node = slicer.mrmlScene.CreateNodeByClass("vtkMRMLScriptedModuleNode")
        node.UnRegister(None)  # owned by the Python variable now
        if self.isSingletonParameterNode:
            node.SetSingletonTag(self.moduleName)
        node.SetAttribute("ModuleName", self.moduleName)
        node.SetName(slicer.mrmlScene.GenerateUniqueName(self.moduleName))
        return node


class ScriptedLoadableModuleTest(unittest.TestCase):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        super(unittest.TestCase, self).__init__()
        self.enableScreenshots = False
        self.screenshotScaleFactor = 1.0

    def delayDisplay(self, message, requestedDelay=None, msec=None):
        logging.info(message)

    def runTest(self):
        logging.warning("No test is defined in " + self.__class__.__name__)
