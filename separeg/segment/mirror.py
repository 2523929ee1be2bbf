"""Left-right mirroring at test time with laterality swapped: nnU-Net's mirroring TTA made valid for paired organs.

A head-and-neck CT mirrored left-right is another plausible CT whose right parotid is where the left one was. The
network's logits for the mirrored slices, mirrored back and with each lateral organ's channel exchanged for its
partner's (``Parotid_R`` <-> ``Parotid_L``, by the TG-263 suffix), are a second prediction of the same slices;
the softmax probabilities of the two are averaged (nnU-Net averages probabilities over its mirrorings).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

__all__ = ["laterality_permutation", "lateral_swap", "MirrorEnsemble", "mirror_batch"]

_SIDES = {"_R": "_L", "_L": "_R"}


def laterality_permutation(names: dict[int, str], n_channels: int) -> list[int]:
    """Output channel ``c`` of the mirrored prediction becomes channel ``permutation[c]``: an organ named ``X_R`` is
    exchanged with ``X_L`` when the table has both (TG-263's laterality suffixes); every other channel stays.

    Args:
        names: label value (= output channel) -> TG-263 name (or the label's name).
    """
    by_name = {name: value for value, name in names.items()}
    permutation = list(range(n_channels))
    for value, name in names.items():
        partner = by_name.get(name[:-2] + _SIDES[name[-2:]]) if name[-2:] in _SIDES else None
        if partner is not None and value < n_channels and partner < n_channels:
            permutation[value] = partner
    return permutation


def lateral_swap(table) -> list[int]:
    """:func:`laterality_permutation` of a label table's organs (TG-263 name, else the label's name), over its
    output channels (background and every value up to the largest)."""
    return laterality_permutation({label.value: label.tg263 or label.name for label in table},
                                  max(table.values) + 1)


class MirrorEnsemble(nn.Module):
    """``model``'s softmax probabilities averaged with those of the left-right mirrored input (last axis: the
    canonical LPS orientation's x), laterality swapped. Returns log-probabilities: their argmax is the averaged
    probabilities' argmax, and a caller that takes the argmax of logits needs no change."""

    def __init__(self, model: nn.Module, permutation: list[int]) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("permutation", torch.as_tensor(permutation), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probabilities = self.model(x).float().softmax(1)
        mirrored = self.model(x.flip(-1)).float().softmax(1).flip(-1)
        mirrored = mirrored.index_select(1, self.permutation.to(x.device))
        return ((probabilities + mirrored) / 2).clamp_min(1e-12).log()


def mirror_batch(x: torch.Tensor, y: torch.Tensor, annotated: torch.Tensor, permutation: list[int],
                 rng: np.random.Generator, p: float = 0.5) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The training-time counterpart: each sample of a ``(B, C, H, W)`` batch mirrored left-right with probability
    ``p``, its ``(B, H, W)`` labels mirrored with lateral organs exchanged, and its ``(B, K)`` annotated-organ flags
    exchanged the same way (a case that contours only Parotid_R contours only Parotid_L once mirrored)."""
    flip = torch.as_tensor(rng.random(len(x)) < p, device=x.device)
    if not bool(flip.any()):
        return x, y, annotated
    swap = torch.as_tensor(permutation, device=y.device)
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    y = torch.where(flip[:, None, None], swap[y.flip(-1)], y)
    annotated = torch.where(flip[:, None], annotated[:, swap], annotated)
    return x, y, annotated
