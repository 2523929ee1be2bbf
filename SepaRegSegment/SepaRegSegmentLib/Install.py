"""First-use installation of the Python packages SepaReg needs inside Slicer, without touching Slicer's own.

Slicer ships numpy, SimpleITK, vtk and (5.12+) pydicom and highdicom; replacing any of them breaks Slicer
(lassoan/SlicerTotalSegmentator#4). torch comes from the PyTorch extension (PyTorchUtils), which picks the CUDA
build for the computer. Everything else is installed with Slicer's pip helper and a constraints file that pins
the protected packages to the versions already there, so pip fails rather than replaces them (SLICER_NOTES §4).
Nothing is downloaded at Auto-contour time: this runs once, when a module is first used, and asks first.
"""

from __future__ import annotations

import logging
import re
import tempfile
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

# The core's runtime requirements (pyproject.toml), minus what Slicer or PyTorchUtils provide.
REQUIREMENTS = (
    "monai>=1.4,<1.7",
    "safetensors>=0.4,<1",
    "scikit-image>=0.22,<0.28",
    "scikit-learn>=1.3,<2",
    "scipy>=1.10,<2",
    "matplotlib>=3.7,<4",
    "pydicom>=2.4,<4",
    "highdicom>=0.23,<0.28",
)
PROTECTED = ("numpy", "SimpleITK", "vtk", "torch", "pydicom")
TORCH_REQUIREMENT = ">=2.4,<2.15"

logger = logging.getLogger(__name__)


def _split(requirement: str) -> tuple[str, str]:
    match = re.match(r"^\s*([A-Za-z0-9_.-]+)\s*(.*)$", requirement)
    assert match, requirement
    return match.group(1), match.group(2).strip()


def satisfies(version: str, specifier: str) -> bool:
    """Whether ``version`` meets ``specifier`` (packaging when importable, else a numeric comparison)."""
    try:
        from packaging.specifiers import SpecifierSet
        from packaging.version import Version

        return Version(version) in SpecifierSet(specifier)
    except ImportError:
        pass

    def parts(text: str) -> tuple[int, ...]:
        return tuple(int(p) for p in re.findall(r"\d+", text)[:3])

    ops = {">=": lambda a, b: a >= b, "<": lambda a, b: a < b, "<=": lambda a, b: a <= b, ">": lambda a, b: a > b,
           "==": lambda a, b: a == b}
    for clause in filter(None, (c.strip() for c in specifier.split(","))):
        op = re.match(r"^(>=|<=|==|<|>)", clause).group(1)
        if not ops[op](parts(version), parts(clause[len(op):])):
            return False
    return True


def missingRequirements(lookup: Callable[[str], str] = metadata.version) -> list[str]:
    """Requirements not installed, or installed at a version outside the tested range."""
    missing = []
    for requirement in REQUIREMENTS:
        name, specifier = _split(requirement)
        try:
            version = lookup(name)
        except metadata.PackageNotFoundError:
            missing.append(requirement)
            continue
        if specifier and not satisfies(version, specifier):
            if name in PROTECTED:
                logger.warning(f"{name} {version} is outside the tested range {specifier}; Slicer's copy is kept")
            else:
                missing.append(requirement)
    return [r for r in missing if _split(r)[0] not in PROTECTED or _is_absent(_split(r)[0], lookup)]


def _is_absent(name: str, lookup: Callable[[str], str]) -> bool:
    try:
        lookup(name)
        return False
    except metadata.PackageNotFoundError:
        return True


def constraints(lookup: Callable[[str], str] = metadata.version) -> str:
    """pip constraints pinning every protected package that is installed to its current version."""
    lines = []
    for name in PROTECTED:
        try:
            lines.append(f"{name}=={lookup(name)}")
        except metadata.PackageNotFoundError:
            continue
    return "\n".join(lines) + "\n"


def ensureRequirements(ask: bool = True) -> bool:
    """Check and, after asking, install what is missing; False when the user declined or installation failed."""
    import slicer

    try:
        import PyTorchUtils
    except ImportError:
        PyTorchUtils = None
    if PyTorchUtils is not None and not PyTorchUtils.PyTorchUtilsLogic.torchInstalled():
        if ask and not slicer.util.confirmOkCancelDisplay(
                "SepaReg needs PyTorch. Install it now? The PyTorch extension picks the build for your GPU (a "
                "download of up to a few GB)."):
            return False
        if PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=False,
                                                         torchVersionRequirement=TORCH_REQUIREMENT) is None:
            slicer.util.errorDisplay("PyTorch could not be installed; see the Python console.")
            return False
    elif PyTorchUtils is None and _is_absent("torch", metadata.version):
        slicer.util.errorDisplay("SepaReg needs PyTorch: install the PyTorch extension from the Extensions Manager "
                                 "and restart Slicer.")
        return False
    missing = missingRequirements()
    if not missing:
        return True
    if ask and not slicer.util.confirmOkCancelDisplay(
            "SepaReg needs these Python packages: " + ", ".join(missing) + ".\nInstall them now? Slicer's numpy, "
            "SimpleITK, VTK, PyTorch and pydicom are kept as they are."):
        return False
    pins = Path(tempfile.mkdtemp(prefix="SepaReg-")) / "constraints.txt"
    pins.write_text(constraints(), encoding="utf-8")
    with slicer.util.tryWithErrorDisplay("Installing SepaReg's Python packages failed", waitCursor=True):
        slicer.util.pip_install(["-c", str(pins), *missing])
        return not missingRequirements()
    return False
