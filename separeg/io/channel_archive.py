"""Multichannel archives for pretraining: co-registered volumes grouped into cases by nnU-Net's naming.

A case's channels are ``<case>_0000.<ext>``, ``<case>_0001.<ext>``, ... in one folder (nnU-Net's convention; the
channel order is the ``--channels`` order). Structure-aware image separation runs on one reference channel
(``--sis-channel``); a channel that is not CT is separated on its normalised intensities mapped onto the HU
scale (0 -> -1000, 1 -> 1000), so the SIS body threshold of -500 HU becomes a quarter of its intensity range.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from separeg.io.channels import Channel, co_register, normalise, normalise_channels
from separeg.runtime.errors import ArchiveError

__all__ = ["group_channels", "read_channels"]

_CHANNEL_RE = re.compile(r"^(?P<case>.+)_(?P<index>\d{4})\.(nii\.gz|nii|nrrd|nhdr|mha|mhd)$", re.IGNORECASE)


def group_channels(entries: Sequence, n_channels: int) -> tuple[list[tuple[str, list]], list[str]]:
    """Usable archive entries -> ``[(case, [entry per channel])]`` and the reasons others were left out.

    Raises:
        ArchiveError: no complete case, with the naming convention explained.
    """
    if n_channels == 1:  # every volume is a case: no naming convention needed
        return [(entry.path, [entry]) for entry in entries], []
    by_case: dict[str, dict[int, object]] = {}
    skipped = []
    for entry in entries:
        match = _CHANNEL_RE.match(Path(entry.path.split(" [", 1)[0]).name)
        if match is None:
            skipped.append(f"{entry.path}: not named <case>_0000, <case>_0001, ... (one file per channel)")
            continue
        folder = str(Path(entry.path).parent)
        by_case.setdefault(f"{folder}/{match['case']}", {})[int(match["index"])] = entry
    groups = []
    for case, found in sorted(by_case.items()):
        missing = [i for i in range(n_channels) if i not in found]
        if missing:
            skipped.append(f"{case}: channel(s) {', '.join(f'{i:04d}' for i in missing)} missing")
            continue
        groups.append((case.removeprefix("./"), [found[i] for i in range(n_channels)]))
    if not groups:
        raise ArchiveError(f"no case with all {n_channels} channels in the archive ({len(skipped)} volume(s) or "
                           f"case(s) left out, e.g. {skipped[0] if skipped else 'none found'}). Name each case's "
                           "co-registered volumes <case>_0000.nii.gz, <case>_0001.nii.gz, ... in channel order")
    return groups, skipped


def read_channels(group: list, root: str | Path, channels: Sequence[Channel], sis_channel: int
                  ) -> tuple[np.ndarray, np.ndarray, str, list[str]]:
    """One case: ``(Z, C, H, W)`` normalised canonical channels, the ``(Z, H, W)`` HU-scale array SIS separates,
    its cache key, and co-registration warnings."""
    from separeg.io.volumes import canonical_voxels

    originals = [entry.read(root) for entry in group]
    images, warnings = co_register(originals, [c.name for c in channels])
    arrays, keys = [], []
    for image, original, entry in zip(images, originals, group, strict=True):
        # A resampled channel is new voxels: its file's hash no longer describes it.
        array, key = canonical_voxels(image, entry.content_hash if image is original else None)
        arrays.append(array)
        keys.append(key)
    reference = channels[sis_channel]
    if reference.normalisation == "window":
        sis_hu = arrays[sis_channel].astype(np.float32)
    else:
        sis_hu = normalise(arrays[sis_channel], reference) * 2000.0 - 1000.0
    key = hashlib.sha256(f"{keys[sis_channel]}:{reference.to_dict()}:{images[0].GetSize()}".encode()).hexdigest()
    return normalise_channels(arrays, channels), sis_hu, key, warnings
