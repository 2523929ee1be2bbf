"""Losses of the self-supervised methods and of the distillation (pure functions)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["negative_cosine", "nt_xent", "info_nce", "channel_kl"]


def negative_cosine(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """D(p, z) of SimSiam: mean over the batch of -cos(p, z). ``z`` must be detached by the caller. ``(B, D)``."""
    return -F.cosine_similarity(p, z, dim=-1).mean()


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's normalised temperature-scaled cross entropy over ``2B`` views; positives are (z1[i], z2[i]).

    Args:
        z1, z2: ``(B, D)`` projections of the two views.
        temperature: softmax temperature.
    """
    z = F.normalize(torch.cat([z1, z2]), dim=1)  # (2B, D)
    logits = z @ z.t() / temperature
    logits.fill_diagonal_(float("-inf"))  # a view is not its own negative
    batch = z1.shape[0]
    targets = torch.cat([torch.arange(batch, 2 * batch), torch.arange(batch)]).to(z.device)
    return F.cross_entropy(logits, targets)


def info_nce(q: torch.Tensor, k: torch.Tensor, temperature: float) -> torch.Tensor:
    """MoCo v3's contrastive loss ``ctr(q, k)``: cross entropy of ``q_i . k_j / temperature`` against ``j = i``,
    scaled by ``2 temperature`` (Chen, Xie & He 2021, Alg. 1); the other samples' keys are the negatives.

    Args:
        q: ``(B, D)`` queries (predictions of one view).
        k: ``(B, D)`` keys (momentum projections of the other view); ``k`` must be detached by the caller.
        temperature: softmax temperature (MoCo v3: 0.2).
    """
    logits = F.normalize(q, dim=1) @ F.normalize(k, dim=1).t() / temperature  # (B, B)
    targets = torch.arange(len(q), device=q.device)
    return F.cross_entropy(logits, targets) * (2.0 * temperature)


def channel_kl(student: torch.Tensor, teacher: torch.Tensor, tau: float,
               reduction: str = "per-dimension") -> torch.Tensor:
    """Paper Eq. 4: KL(softmax(teacher / tau) || softmax(student / tau)) over channels.

    Args:
        student: ``(B, D)`` student features.
        teacher: ``(B, D)`` features of each region's intra-organ teacher (no gradient).
        tau: temperature (reference: 0.1).
        reduction: "per-dimension": the mean over batch and channels (``nn.KLDivLoss``'s default mean, as the
            authors' ``loss_kd``), on the scale of Eq. 5's cosine term; "batchmean": the sum over channels, mean
            over the batch (the exact KL per sample, about D times larger).
    """
    log_student = F.log_softmax(student / tau, dim=1)
    log_teacher = F.log_softmax(teacher.detach() / tau, dim=1)
    kl = F.kl_div(log_student, log_teacher, reduction="batchmean", log_target=True)
    return kl / student.shape[1] if reduction == "per-dimension" else kl
