"""The Python packages the core needs inside 3D Slicer, and the checks, without Slicer (standard library only).

Slicer ships numpy, SimpleITK, vtk and (5.12+) pydicom and highdicom; replacing any of them breaks Slicer
(lassoan/SlicerTotalSegmentator#4). torch comes from Slicer's PyTorch extension, which picks the CUDA build for the
computer. The rest is installed by :func:`separeg.slicer_install.ensure_requirements` (each module's
``ensureRequirements`` passes Slicer in) with Slicer's pip helpers under a constraints file (:func:`constraints`) that
pins the protected packages to the versions already there, so that pip fails rather than replaces them
(SLICER_NOTES §4). ``Testing/test_slicer_layout.py`` checks the list against
``pyproject.toml``.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

__all__ = ["REQUIREMENTS", "PROTECTED", "TORCH_REQUIREMENT", "satisfies", "missing_requirements", "constraints",
           "write_constraints"]

# The core's runtime requirements (pyproject.toml), minus what Slicer or its PyTorch extension provide.
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
# Slicer's own packages: never installed or replaced (pinned by the constraints, skipped by pip_ensure).
PROTECTED = ("numpy", "SimpleITK", "vtk", "torch", "pydicom")
TORCH_REQUIREMENT = ">=2.4,<2.15"

Lookup = Callable[[str], str]
logger = logging.getLogger(__name__)


def _split(requirement: str) -> tuple[str, str]:
    match = re.match(r"^\s*([A-Za-z0-9_.-]+)\s*(.*)$", requirement)
    assert match, requirement
    return match.group(1), match.group(2).strip()


def satisfies(version: str, specifier: str) -> bool:
    """Whether ``version`` meets ``specifier`` (``packaging`` when importable, else a numeric comparison)."""
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


def _installed(name: str, lookup: Lookup) -> str | None:
    try:
        return lookup(name)
    except metadata.PackageNotFoundError:
        return None


def missing_requirements(lookup: Lookup = metadata.version) -> list[str]:
    """Requirements not installed, or installed outside the tested range (a protected package only when absent)."""
    missing = []
    for requirement in REQUIREMENTS:
        name, specifier = _split(requirement)
        version = _installed(name, lookup)
        if version is None:
            missing.append(requirement)
        elif specifier and not satisfies(version, specifier):
            if name in PROTECTED:
                logger.warning(f"{name} {version} is outside the tested range {specifier}; Slicer's copy is kept")
            else:
                missing.append(requirement)
    return missing


def constraints(lookup: Lookup = metadata.version) -> str:
    """pip constraints pinning every protected package that is installed to its current version."""
    pins = [f"{name}=={version}" for name in PROTECTED if (version := _installed(name, lookup)) is not None]
    return "\n".join(pins) + "\n"


def write_constraints(path: str | Path, lookup: Lookup = metadata.version) -> Path:
    """Write :func:`constraints` to ``path`` (for ``pip -c`` / ``pip_ensure(constraints=...)``); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(constraints(lookup), encoding="utf-8")
    return path
