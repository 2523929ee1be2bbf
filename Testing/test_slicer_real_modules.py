"""Real-MRML tier: the module files constructed as Slicer constructs them (Testing/slicer_tier.py).

Slicer's module factory constructs ``<M>(parent)``; the widget constructs ``<M>Logic()``; ``make slicer-test`` and
Slicer's Reload & Test call the module's ``runTest()``. Each is done here against Slicer's real MRML and
``slicer.util``, with the cooperative ``super().__init__()`` of Slicer >= 5.0's ScriptedLoadableModule classes.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import slicer_tier

MODULES = ("SepaRegSegment", "SepaRegPretrain")


@pytest.mark.parametrize("module", MODULES)
def test_module_declares_itself_as_the_generic_module_test_expects(real_slicer, monkeypatch, module: str) -> None:
    python, instance = slicer_tier.loadScriptedModule(monkeypatch, module)
    parent = getattr(real_slicer.modules, module.lower())  # what qSlicer<M>ModuleGenericTest looks up
    assert parent.title and parent.categories == ["Segmentation"] and parent.contributors
    assert parent.helpText and parent.acknowledgementText
    assert "SepaRegSegment" not in parent.dependencies  # the modules do not depend on each other
    assert real_slicer.selfTests[module] == instance.runTest
    assert Path(instance.resourcePath(f"UI/{module}.ui")).is_file()


@pytest.mark.parametrize("module", MODULES)
def test_module_logic_constructs_once_per_base(real_slicer, monkeypatch, module: str) -> None:
    """``<M>Logic()`` as the widget's setup() calls it: every base ``__init__`` runs exactly once."""
    python, _ = slicer_tier.loadScriptedModule(monkeypatch, module)
    cls = getattr(python, f"{module}Logic")
    bases = [base for base in cls.__mro__[1:] if base is not object and "__init__" in vars(base)]
    calls = {base.__name__: 0 for base in bases}
    for base in bases:
        def counted(self, *args, _init=base.__init__, _name=base.__name__, **kwargs):
            calls[_name] += 1
            return _init(self, *args, **kwargs)

        monkeypatch.setattr(base, "__init__", counted)
    logic = cls()
    assert set(calls.values()) == {1}, calls
    assert logic.moduleName == module
    node = logic.getParameterNode()  # Slicer's singleton parameter node, in the real scene
    assert node.IsA("vtkMRMLScriptedModuleNode") and node.GetAttribute("ModuleName") == module
    assert logic.getParameterNode() is node or logic.getParameterNode().GetID() == node.GetID()


@pytest.mark.parametrize("module", MODULES)
def test_module_self_test_passes(real_slicer, monkeypatch, module: str) -> None:
    """``<M>.runTest()``, as Slicer's Reload & Test and ``make slicer-test`` call it, on the real scene."""
    slicer_tier.loadScriptedModule(monkeypatch, module)
    real_slicer.selfTests[module]()
