"""What fine-tuning minimises: the supervised loss chosen for how completely the cases are annotated, plus the
Mean Teacher consistency term when unlabelled scans are given (DESIGN §2.9, §7), plus the loss on labels propagated
onto an archive of CTs with ``--archive`` (:mod:`separeg.segment.finetune.propagated`).

Partial-label modes (``--partial-labels``):

- ``plseg``: PL-Seg's HADFL + COCL + PSD (:mod:`separeg.segment.finetune.plseg`); an organ a case does not annotate
  is unknown.
- ``marginal``: Dice + CE on marginal probabilities (unannotated organs merged into background; Shi et al. 2021).
- ``background``: plain Dice + CE where every voxel without a label is background, the naive baseline.
- ``auto`` (default): ``plseg`` when some training case lacks an organ that another annotates, else
  ``background`` (identical to the others when every case annotates every organ, and the cheapest).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from separeg.registry import PARTIAL_LABEL_MODES
from separeg.runtime.errors import InputError
from separeg.runtime.events import Events
from separeg.segment.finetune.losses import marginal_dice_ce
from separeg.segment.finetune.mean_teacher import MeanTeacher
from separeg.segment.finetune.plseg import DeepSupervision, PLSegLoss, resize_labels

__all__ = ["PARTIAL_LABEL_MODES", "choose_partial_label_mode", "Objective"]


def choose_partial_label_mode(requested: str, annotated: list[frozenset[int]], names: list[str],
                              organ_names: dict[int, str], events: Events) -> str:
    """Resolve ``auto`` from the training cases' annotated organs and say what was picked and why."""
    if requested not in PARTIAL_LABEL_MODES:
        raise InputError(f"unknown partial-label mode {requested!r}; choose one of {', '.join(PARTIAL_LABEL_MODES)}")
    union = frozenset().union(*annotated) if annotated else frozenset()
    never = sorted(set(organ_names) - union)
    if never:
        events.warning("no training case annotates " + ", ".join(organ_names[v] for v in never)
                       + ": the model cannot learn to contour it", stage="finetune")
    partial = [(name, union - a) for name, a in zip(names, annotated, strict=True) if union - a]
    if requested != "auto":
        return requested
    if not partial:
        events.log("every training case annotates the same organs: plain Dice + CE (partial-label mode off)",
                   stage="finetune")
        return "background"
    examples = "; ".join(f"{name} lacks {', '.join(organ_names[v] for v in sorted(missing))}"
                         for name, missing in partial[:3])
    events.log(f"{len(partial)} of {len(names)} training cases annotate only some organs ({examples}"
               f"{'; ...' if len(partial) > 3 else ''}): partial-label mode (PL-Seg), a missing organ is unknown "
               "there, not background", stage="finetune")
    return "plseg"


class Objective(nn.Module):
    """The trained network with its loss; checkpointing this module keeps everything training needs
    (weights, PL-Seg's coarse heads and hardness history, the Mean Teacher's teacher).

    Args:
        unet: the segmentation U-Net (the deployed model).
        mode: a resolved partial-label mode (not ``auto``).
        hardness, psd_weight, cocl_weight, cocl_source: PL-Seg's switches (see
        :class:`separeg.segment.finetune.plseg.PLSegLoss`). deep_supervision: in the ``marginal`` and ``background``
        modes, also supervise the 3 coarser decoder
            scales through 1x1 heads, weighted 1, 1/2, 1/4, 1/8 (normalised), as nnU-Net does (PL-Seg supervises
            every scale whenever PSD is on).
        mean_teacher: the Mean Teacher built on ``unet``, or None.
        archive: the loss term on propagated archive cases (:class:`~separeg.segment.finetune.propagated.ArchiveTerm`),
            or None.
    """

    def __init__(self, unet: nn.Module, mode: str, n_classes: int, *, hardness: bool = True,
                 psd_weight: float = 0.1, cocl_weight: float = 0.1, cocl_source: str = "probabilities",
                 deep_supervision: bool = False, mean_teacher: MeanTeacher | None = None, archive=None) -> None:
        super().__init__()
        if mode not in PARTIAL_LABEL_MODES[1:]:
            raise InputError(f"partial-label mode must be one of {', '.join(PARTIAL_LABEL_MODES[1:])}, got {mode!r}")
        self.mode = mode
        self.unet = unet
        self.plseg = (PLSegLoss(n_classes, hardness=hardness, psd_peak=psd_weight, cocl_weight=cocl_weight,
                                cocl_source=cocl_source) if mode == "plseg" else None)
        if self.plseg is not None:
            scales = 3 if psd_weight > 0 else 0
        else:
            scales = 3 if deep_supervision else 0
        self.net = DeepSupervision(unet, n_classes, extra_scales=scales) if self.plseg is not None or scales else None
        self.mean_teacher = mean_teacher
        self.archive = archive  # no trained state: not a submodule, checkpoints are unchanged

    @property
    def deployable(self) -> nn.Module:
        """The model to validate and save: the teacher under Mean Teacher, else the U-Net."""
        return self.mean_teacher.teacher if self.mean_teacher is not None else self.unet

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list((self.net or self.unet).parameters())

    def forward(self, x: torch.Tensor, target: torch.Tensor, annotated: torch.Tensor, *, progress: float,
                rng: np.random.Generator, generator: torch.Generator) -> torch.Tensor:
        if self.plseg is not None:
            loss = self.plseg(self.net(x), target, annotated, progress)
        else:
            known = annotated if self.mode == "marginal" else torch.ones_like(annotated)
            scales = self.net(x).logits if self.net is not None else [self.unet(x)]
            weights = [0.5 ** i for i in range(len(scales))]
            loss = sum(w * marginal_dice_ce(logits, resize_labels(target, logits.shape[-2:]), known)
                       for w, logits in zip(weights, scales, strict=True)) / sum(weights)
        if self.mean_teacher is not None:
            loss = loss + self.mean_teacher.loss(self.unet, len(x), x.shape[-1], progress, rng, generator)
        if self.archive is not None:
            loss = loss + self.archive.loss(self.unet, len(x), x.shape[-1], rng, generator)
        return loss

    def after_step(self, step: int) -> None:
        if self.mean_teacher is not None:
            self.mean_teacher.update(self.unet, step)
