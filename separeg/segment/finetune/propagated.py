"""``--archive``: the training cases' organs carried onto unlabelled CTs (:mod:`separeg.atlas.archive`) as extra
training cases (DeepAtlas-style augmentation: Zhao et al., CVPR 2019).

The propagated cases are a term of their own in the loss, like Mean Teacher's: each step draws a batch of patches
from them (mirrored and augmented like the labelled batch, from the same step's random streams) and adds
``archive_weight`` x Dice + CE on the marginal probabilities (an organ no labelled case annotates is unknown there),
counted over the voxels whose fused vote is confident (``archive_confidence``): a voxel below it is :data:`IGNORE`,
taught nothing. The labelled batch, and everything without ``--archive``, is unchanged; validation stays on the
labelled validation cases. Only the training cases are propagated (the validation cases' labels stay unseen).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from separeg.runtime.errors import ArchiveError, InputError
from separeg.runtime.events import Events
from separeg.segment.finetune.data import IGNORE, SliceSet, sample_patches
from separeg.segment.finetune.losses import marginal_dice_ce

__all__ = ["ARCHIVE_SETTINGS", "ArchiveTerm", "archive_term", "check_archive", "with_archive"]

# The FinetuneConfig fields that matter only with --archive (left out of a run's identity without it).
ARCHIVE_SETTINGS = ("archive_weight", "archive_confidence")


def check_archive(job, channels: tuple, labelled: list, events: Events):
    """Scan ``job.archive`` and refuse what cannot work, before the run folder is written.

    Args:
        labelled: every labelled case (training and validation), to refuse an archive CT that is one of them.

    Returns:
        The archive's :class:`separeg.io.archive.Manifest`, or None without ``--archive``.

    Raises:
        InputError: several input channels, an archive without a usable CT, an archive CT that is a labelled case.
    """
    if job.archive is None:
        return None
    from separeg.io.archive import format_table, scan_archive
    from separeg.io.volumes import content_hash

    if len(channels) > 1:
        raise InputError(f"--archive registers CTs to CTs; it is not available with {len(channels)} input channels "
                         f"({', '.join(c.name for c in channels)}). Leave out --archive or train on one CT channel")
    try:
        manifest = scan_archive(job.archive, modality="CT", events=events)
        usable = manifest.require_usable()
    except ArchiveError as exc:
        raise InputError(f"--archive {job.archive}: {exc}") from exc
    hashes = {}
    for case in labelled:
        hashes.setdefault(content_hash(case.image), case.name)
    same = [f"{e.path} is {hashes[e.content_hash]}" for e in usable if e.content_hash in hashes]
    if same:
        raise InputError(f"the archive holds labelled cases ({'; '.join(same[:5])}{' ...' if len(same) > 5 else ''}): "
                         "an archive CT must be an unlabelled scan, not a training or validation case. Move those "
                         "CTs out of the --archive folder (or give a folder without the labelled data)")
    events.log(f"archive: {len(usable)} CT(s)\n" + format_table(manifest), stage="archive")
    return manifest


def with_archive(identity: dict, manifest) -> dict:
    """The run's identity with the archive (its folder and the content of its CTs: another archive is another run);
    without ``--archive`` as before the flag existed (its settings left out), so earlier runs still resume."""
    if manifest is None:
        return {**identity, "config": {k: v for k, v in identity["config"].items() if k not in ARCHIVE_SETTINGS}}
    return {**identity, "archive": {"folder": str(Path(manifest.root).resolve()), "volumes": manifest.hash}}


class ArchiveTerm:
    """The weighted loss on a batch of propagated-case patches (module docstring). Holds no trained state, so
    checkpoints are unchanged.

    Args:
        slices: the propagated cases, with ``known`` voxels.
        weight: the term's weight (``archive_weight``).
        foreground_fraction, augmentation: as for the labelled batch.
        swap: each class's left-right partner when training mirrors (``--mirror-augmentation``), else None.
    """

    def __init__(self, slices: SliceSet, weight: float, *, foreground_fraction: float, augmentation: str,
                 swap: list[int] | None = None) -> None:
        self.slices, self.weight = slices, weight
        self.foreground_fraction, self.augmentation, self.swap = foreground_fraction, augmentation, swap

    def loss(self, unet: torch.nn.Module, batch: int, patch: int, rng: np.random.Generator,
             generator: torch.Generator) -> torch.Tensor:
        from separeg.segment.finetune.augment import augment_batch
        from separeg.segment.mirror import mirror_batch

        x, y, annotated = sample_patches(self.slices, batch, patch, self.foreground_fraction, rng)
        if self.swap is not None:  # the unknown voxels ride along as a channel: mirror_batch swaps label values
            known = (y != IGNORE)[:, None].to(x.dtype)
            both, y, annotated = mirror_batch(torch.cat([x, known], 1), y.clamp_min(0), annotated, self.swap, rng)
            x, y = both[:, :-1], y.masked_fill(both[:, -1] < 0.5, IGNORE)
        x, y = augment_batch(x, y, generator, self.augmentation)  # labels by nearest neighbour: IGNORE stays
        known = y != IGNORE
        return self.weight * marginal_dice_ce(unet(x), y.clamp_min(0), annotated, voxels=known)


def archive_term(job, cfg, manifest, train_cases: list, n_classes: int, spec, device: torch.device,
                 open_ended: tuple[int, ...], swap: list[int], events: Events) -> ArchiveTerm | None:
    """Propagate the training cases onto the archive (cached in ``OUT/archive``) and build the loss term; None
    without ``--archive`` or when no archive CT kept a registration (with a warning).

    Raises:
        CancelledError: stopped while registering (the finished pairs are cached).
    """
    if manifest is None:
        return None
    from separeg.atlas.archive import propagate_archive
    from separeg.runtime.stop import StopRequest
    from separeg.segment.case_loading import LoadedCase

    with StopRequest(job.stop_file) as stop:
        propagated = propagate_archive(manifest.usable(), Path(manifest.root), train_cases,
                                       Path(job.out_dir) / "archive", threads=job.archive_threads, events=events,
                                       stop=stop)
    if not propagated:
        events.warning("no archive CT kept a registration: training on the labelled cases only", stage="archive")
        return None
    known = [p.confidence >= cfg.archive_confidence for p in propagated]
    cases = [LoadedCase(p.name, p.image, p.labels, p.annotated) for p in propagated]
    slices = SliceSet(cases, n_classes, spec, device, open_ended=open_ended, min_body_area=cfg.min_body_area,
                      known=known)
    confident = float(np.mean([k.mean() for k in known]))
    events.log(f"archive: {len(cases)} CT(s) labelled by registration from {len(train_cases)} training case(s); "
               f"{100 * confident:.0f} % of their voxels confident (>= {cfg.archive_confidence}), the rest unknown; "
               f"loss weight {cfg.archive_weight}", stage="finetune")
    return ArchiveTerm(slices, cfg.archive_weight, foreground_fraction=cfg.foreground_fraction,
                       augmentation=cfg.augmentation, swap=swap if cfg.mirror_augmentation else None)
