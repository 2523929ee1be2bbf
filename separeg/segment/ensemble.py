"""Several segmentation models as one: the mean of their softmax probabilities (nnU-Net ensembles its five folds
this way). The members must be interchangeable: the same organs at the same label values, the same input channels,
grid and 2.5D context (seeds or folds of one recipe, or the same recipe on other data).
"""

from __future__ import annotations

import torch
from torch import nn

from separeg.runtime.errors import InputError

__all__ = ["ModelEnsemble", "check_members"]


class ModelEnsemble(nn.Module):
    """The members' softmax probabilities averaged; returns log-probabilities, so that a caller taking the argmax of
    logits (contour, validation) or wrapping it in :class:`~separeg.segment.mirror.MirrorEnsemble` needs no change."""

    def __init__(self, models: list[nn.Module]) -> None:
        super().__init__()
        self.members = nn.ModuleList(models)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        total = None
        for model in self.members:  # a running sum: memory does not grow with the members
            probabilities = model(x).float().softmax(1)
            total = probabilities if total is None else total + probabilities
        return (total / len(self.members)).clamp_min(1e-12).log()


def check_members(first, others: list) -> None:
    """Refuse an ensemble whose bundles differ in organs or inputs from the first (``first``, ``others``:
    :class:`~separeg.runtime.bundle.Bundle` of kind ``segmentation``).

    Raises:
        InputError: naming the member and what differs.
    """
    for bundle in others:
        for key, what in (("labels", "organs"), ("inputs", "input channels, grid or 2.5D context")):
            if bundle.metadata.get(key) != first.metadata.get(key):
                raise InputError(f"ensemble member {bundle.path} has other {what} than {first.path}; an ensemble "
                                 "averages models of one recipe (seeds or folds) trained for the same organs")
        if bundle.architecture.get("out_channels") != first.architecture.get("out_channels"):
            raise InputError(f"ensemble member {bundle.path} has {bundle.architecture.get('out_channels')} output "
                             f"channels, {first.path} {first.architecture.get('out_channels')}")
