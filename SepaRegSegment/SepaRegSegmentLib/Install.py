"""SepaReg Segment's first-use installs: passes Slicer into the core's :mod:`separeg.slicer_install`."""

from __future__ import annotations

from separeg.slicer_install import ensure_requirements


def ensureRequirements(ask: bool = True) -> bool:
    """Check and, after asking, install SepaReg's missing packages; False when declined, skipped or failed."""
    import slicer  # imported when called: only Slicer has it

    return ensure_requirements(slicer, ask)
