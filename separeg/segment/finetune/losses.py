"""Segmentation losses for partially annotated cases (DESIGN §2.9, §7).

An organ not annotated in a case is unknown there, not background. The *marginal* loss merges the
predicted probability of every unannotated organ into background for that case, so predicting such an
organ is never punished (Shi et al., "Marginal loss and exclusion loss for partially supervised
multi-organ segmentation", 2021; the PL-Seg losses build on it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["marginal_probabilities", "marginal_dice_ce"]


def marginal_probabilities(logits: torch.Tensor, annotated: torch.Tensor) -> torch.Tensor:
    """Softmax probabilities with unannotated organs merged into background.

    Args:
        logits: ``(B, C, H, W)``; channel 0 is background.
        annotated: ``(B, C)`` bool, the classes annotated in each sample's case (background always True).

    Returns:
        ``(B, C, H, W)`` probabilities; unannotated channels are 0 and their mass is in channel 0.
    """
    probs = torch.softmax(logits.float(), dim=1)
    keep = annotated[:, :, None, None].to(probs.dtype)
    merged = probs * keep
    background = probs[:, :1] + (probs * (1.0 - keep)).sum(dim=1, keepdim=True)
    return torch.cat([background, merged[:, 1:]], dim=1)


def marginal_dice_ce(logits: torch.Tensor, target: torch.Tensor, annotated: torch.Tensor,
                     smooth: float = 1e-5, voxels: torch.Tensor | None = None) -> torch.Tensor:
    """Cross entropy + soft Dice on the marginal probabilities.

    Dice is computed per foreground class over the batch, counting only the samples where that class is
    annotated, and averaged over the classes annotated somewhere in the batch.

    Args:
        logits: ``(B, C, H, W)`` network output.
        target: ``(B, H, W)`` int64 labels (0 = background or not annotated).
        annotated: ``(B, C)`` bool.
        voxels: ``(B, H, W)`` bool, the voxels both terms count (labels propagated from other cases: the confident
            ones); None: all.
    """
    probs = marginal_probabilities(logits, annotated)
    nll = -torch.log(probs.gather(1, target[:, None]).clamp_min(1e-7))
    weight = annotated[:, :, None, None].to(probs.dtype)
    if voxels is None:
        ce = nll.mean()
    else:
        counted = voxels[:, None].to(probs.dtype)
        ce = (nll * counted).sum() / counted.sum().clamp_min(1.0)
        weight = weight * counted
    onehot = F.one_hot(target, probs.shape[1]).permute(0, 3, 1, 2).to(probs.dtype)
    intersection = (probs * onehot * weight).sum(dim=(0, 2, 3))
    denominator = ((probs + onehot) * weight).sum(dim=(0, 2, 3))
    dice = (2.0 * intersection + smooth) / (denominator + smooth)
    present = annotated.any(dim=0)
    present[0] = False
    dice_loss = 1.0 - dice[present].mean() if present.any() else probs.new_zeros(())
    return ce + dice_loss
