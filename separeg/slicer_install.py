"""First-use installation of SepaReg's Python packages in Slicer, never touching Slicer's own (SLICER_NOTES §4).

Both Slicer modules call :func:`ensure_requirements` from their ``Install.py`` (they do not import each other, so the
logic lives here once). The core never imports Slicer: the caller passes the ``slicer`` module in, and the optional
PyTorch extension's ``PyTorchUtils`` module is looked up when called (absent outside Slicer, or without the
extension). The list and the checks are :mod:`separeg.requirements`'; this only asks and installs: torch through the
PyTorch extension, the rest with ``slicer.packaging.pip_ensure`` (Slicer 5.12+: constraints and ``skip_packages``) or,
before it, ``slicer.util.pip_install`` with a ``-c`` constraints file. Nothing is downloaded at Auto-contour time:
this runs when a task is first started, and asks first.
"""

from __future__ import annotations

import importlib
import logging
import subprocess
import tempfile
from importlib import metadata
from pathlib import Path
from types import ModuleType
from typing import Any

from separeg.requirements import PROTECTED, TORCH_REQUIREMENT, missing_requirements, write_constraints

__all__ = ["ensure_torch", "ensure_requirements"]

logger = logging.getLogger(__name__)


def _pytorch_utils() -> ModuleType | None:
    """The PyTorch extension's ``PyTorchUtils`` module (an optional Slicer extension), or None when not installed."""
    try:
        return importlib.import_module("PyTorchUtils")
    except ImportError:
        return None


def ensure_torch(slicer: Any, ask: bool = True) -> bool:
    """PyTorch through the PyTorch extension (the CUDA build for this computer); False when declined or missing.

    ``slicer`` is Slicer's ``slicer`` module (its ``util`` dialogs are used).
    """
    pytorch_utils = _pytorch_utils()
    if pytorch_utils is None:
        try:
            metadata.version("torch")
            return True
        except metadata.PackageNotFoundError:
            slicer.util.errorDisplay("SepaReg needs PyTorch: install the PyTorch extension from the Extensions "
                                     "Manager and restart Slicer.")
            return False
    if pytorch_utils.PyTorchUtilsLogic.torchInstalled():
        return True
    if ask and not slicer.util.confirmOkCancelDisplay(
            "SepaReg needs PyTorch. Install it now? The PyTorch extension picks the build for your GPU (a download "
            "of up to a few GB)."):
        return False
    if pytorch_utils.PyTorchUtilsLogic().installTorch(askConfirmation=False,
                                                      torchVersionRequirement=TORCH_REQUIREMENT) is None:
        slicer.util.errorDisplay("PyTorch could not be installed; see the Python console.")
        return False
    return True


def ensure_requirements(slicer: Any, ask: bool = True) -> bool:
    """Check and, after asking, install what is missing; False when declined, skipped or failed.

    ``slicer`` is Slicer's ``slicer`` module: ``slicer.packaging`` (5.12+) or ``slicer.util`` installs and asks.
    """
    if not ensure_torch(slicer, ask):
        return False
    missing = missing_requirements()
    if not missing:
        return True
    pins = write_constraints(Path(tempfile.mkdtemp(prefix="SepaReg-")) / "constraints.txt")
    packaging = getattr(slicer, "packaging", None)
    try:
        if hasattr(packaging, "pip_ensure"):  # Slicer 5.12+: asks, installs, offers a restart
            packaging.pip_ensure(missing, constraints=pins, skip_packages=list(PROTECTED), prompt_install=ask,
                                 requester="SepaReg")
        else:
            if ask and not slicer.util.confirmOkCancelDisplay(
                    "SepaReg needs these Python packages: " + ", ".join(missing) + ".\nInstall them now? Slicer's "
                    "numpy, SimpleITK, VTK, PyTorch and pydicom are kept as they are."):
                return False
            slicer.util.pip_install(["-c", str(pins), *missing])
    except RuntimeError as exc:  # pip_ensure: the user declined
        logger.info(f"SepaReg's packages were not installed: {exc}")
        return False
    except subprocess.CalledProcessError as exc:
        slicer.util.errorDisplay(f"Installing SepaReg's Python packages failed: {exc}")
        return False
    still = missing_requirements()
    if still:
        slicer.util.errorDisplay("These Python packages are still missing: " + ", ".join(still))
    return not still
