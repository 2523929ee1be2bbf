"""PL-Seg: training losses for partially labelled cases (Li et al., "PL-Seg: partially labeled abdominal organ
segmentation via classwise orthogonal contrastive learning and progressive self-distillation"; DESIGN §7).

Clinical structure sets contour different organs per patient. An organ a case does not annotate is *unknown*
there, not background, so nothing may push it towards background. Three parts, each switchable:

- **HADFL**, the hardness-aware decoupled foreground loss: each annotated organ ``c`` is its own binary problem,
  ``p_c`` against ``1 - p_c`` (Dice + cross entropy), so the voxels of an unannotated organ only learn "not
  ``c``", never "background". Each organ's loss is weighted by ``w_c = max(D_c / mean(D), 0.5)``, ``D_c`` its
  Dice loss averaged over the last 50 batches *in which the organ was present* (as the authors' code counts only
  classes present in the target: a batch without the organ says nothing about how hard it is, and its Dice of 0
  would pin rare organs at the floor): organs that stay hard get more weight.
- **COCL**, the classwise orthogonal contrastive loss: per sample, each class's softmax probability map flattened
  and L2-normalised (the authors' ``CO_Contrastive``: a spatial mutual-exclusion constraint; ``cocl_source=
  "features"`` uses decoder-feature prototypes instead); cross entropy of their cosine-affinity matrix against the
  identity, minus its value for orthogonal maps, so 0 means no two classes claim the same pixels. Keeps organs apart
  where no label says so.
- **PSD**, progressive self-distillation: the finer decoder outputs teach the next coarser ones (softened with
  temperature 10), weighted by ``0.1 * exp(-5 (1 - t)^2)`` over training progress ``t``.

``L = L_sup + lambda_psd(t) * L_PSD + 0.1 * L_COCL``; ``L_sup`` is HADFL averaged over the decoder scales when
PSD is on (the reference implementation supervises every scale). The extra 1x1 heads on the coarser decoder
blocks exist only during training: the saved model is the plain U-Net.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from separeg.registry import COCL_SOURCES
from separeg.segment.network import decoder_blocks

__all__ = ["DeepSupervision", "SegOutputs", "HardnessWeights", "decoupled_foreground_loss", "class_prototypes",
           "probability_maps", "cocl_loss", "psd_loss", "gaussian_rampup", "resize_labels", "PLSegLoss",
           "COCL_SOURCES"]


@dataclass
class SegOutputs:
    """Logits finest first (``logits[0]`` is the model's own output) and the last decoder block's features."""

    logits: list[torch.Tensor]
    features: torch.Tensor


def _out_channels(block: nn.Module) -> int:
    return [m for m in block.modules() if isinstance(m, nn.Conv2d | nn.Conv3d)][-1].out_channels


class DeepSupervision(nn.Module):
    """A :func:`~separeg.segment.network.build_unet` network (``FlexibleUNet`` or ``SwinUNETR``) with 1x1 classifier
    heads on its ``extra_scales`` coarser decoder blocks.

    ``forward`` returns :class:`SegOutputs`; ``self.unet`` alone is the deployable model.
    """

    def __init__(self, unet: nn.Module, n_classes: int, extra_scales: int = 3) -> None:
        super().__init__()
        self.unet = unet
        blocks = decoder_blocks(unet)
        if extra_scales >= len(blocks):
            raise ValueError(f"the decoder has {len(blocks)} blocks; at most {len(blocks) - 1} extra scales")
        self._tapped = blocks[-1 - extra_scales:]  # coarsest first; the last one is the final block
        self.heads = nn.ModuleList(nn.Conv2d(_out_channels(b), n_classes, kernel_size=1) for b in self._tapped[:-1])

    def forward(self, x: torch.Tensor) -> SegOutputs:
        taps: list[torch.Tensor] = []
        hooks = [b.register_forward_hook(lambda _m, _i, out: taps.append(out)) for b in self._tapped]
        try:
            logits = self.unet(x)
        finally:
            for hook in hooks:
                hook.remove()
        coarse = [head(t) for head, t in zip(self.heads, taps[:-1], strict=True)]
        return SegOutputs(logits=[logits, *coarse[::-1]], features=taps[-1])


class HardnessWeights(nn.Module):
    """HADFL's class weights ``w_c = max(D_c / mean_k D_k, 0.5)`` from a window of recent Dice losses.

    ``D_c`` averages class ``c``'s Dice loss over the batches of the window where it was measured; the mean is
    over the classes measured at least once. Unmeasured classes weigh 1. A buffer, so it is checkpointed.
    """

    def __init__(self, n_classes: int, window: int = 50, floor: float = 0.5) -> None:
        super().__init__()
        self.floor = floor
        self.register_buffer("history", torch.full((window, n_classes), float("nan")))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def update(self, dice_loss: torch.Tensor, measured: torch.Tensor) -> torch.Tensor:
        """Record one batch (``(C,)`` Dice losses, ``(C,)`` bool) and return the ``(C,)`` weights."""
        row = torch.where(measured, dice_loss.detach().float(), torch.full_like(dice_loss, float("nan"),
                                                                                  dtype=torch.float32))
        self.history[self.count % len(self.history)] = row
        self.count += 1
        return self.weights()

    @torch.no_grad()
    def weights(self) -> torch.Tensor:
        seen = ~torch.isnan(self.history)
        per_class = torch.where(seen, self.history, 0.0).sum(0) / seen.sum(0).clamp_min(1)
        known = seen.any(0)
        mean = torch.where(known, per_class, 0.0).sum() / known.sum().clamp_min(1)  # no host sync
        ratio = per_class / mean.clamp_min(1e-8)
        return torch.where(known, ratio.clamp_min(self.floor), torch.ones_like(ratio))


def decoupled_foreground_loss(logits: torch.Tensor, target: torch.Tensor, annotated: torch.Tensor,
                              smooth: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Binary cross entropy + soft Dice of each annotated organ against everything else.

    Args:
        logits: ``(B, C, H, W)``; channel 0 is background.
        target: ``(B, H, W)`` int64.
        annotated: ``(B, C)`` bool, the organs annotated in each sample's case.

    Returns:
        ``(loss, dice_loss, measured)``, each ``(C,)``: per class the batch's cross entropy (over the samples that
        annotate it) plus its Dice loss (over the same samples, when the class has a voxel there; else 0);
        ``measured`` says which classes any sample annotates. Background (class 0) is never measured.
    """
    n_classes = logits.shape[1]
    probs = torch.softmax(logits.float(), dim=1)[:, 1:].clamp(1e-7, 1.0 - 1e-7)
    onehot = F.one_hot(target, n_classes)[..., 1:].permute(0, 3, 1, 2).to(probs.dtype)
    weight = annotated[:, 1:].to(probs.dtype)
    bce = -(onehot * probs.log() + (1.0 - onehot) * (1.0 - probs).log()).mean(dim=(2, 3))
    ce = (bce * weight).sum(0) / weight.sum(0).clamp_min(1.0)
    voxel_weight = weight[:, :, None, None]
    intersection = (probs * onehot * voxel_weight).sum(dim=(0, 2, 3))
    reference = (onehot * voxel_weight).sum(dim=(0, 2, 3))
    denominator = (probs * voxel_weight).sum(dim=(0, 2, 3)) + reference
    dice = 1.0 - (2.0 * intersection + smooth) / (denominator + smooth)
    dice = torch.where(reference > 0, dice, torch.zeros_like(dice))
    zero = probs.new_zeros(1)
    measured = torch.cat([torch.zeros(1, dtype=torch.bool, device=weight.device), weight.sum(0) > 0])
    return torch.cat([zero, ce + dice]), torch.cat([zero, dice]), measured


def class_prototypes(features: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """``(B, C, D)``: per sample, the ``(B, D, H, W)`` features averaged under each class's probability map."""
    mass = probs.sum(dim=(2, 3)).clamp_min(1e-6)
    return torch.einsum("bchw,bdhw->bcd", probs, features) / mass[..., None]


def probability_maps(probs: torch.Tensor) -> torch.Tensor:
    """``(B, C, H*W)``: each class's probability map flattened (COCL's prototypes in the authors' code; cosine
    affinity then measures how much two classes' maps overlap)."""
    return probs.flatten(2)


def cocl_loss(prototypes: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Cross entropy of the ``(B, C, C)`` cosine affinities of ``(B, C, D)`` prototypes against the identity,
    minus its value for orthogonal prototypes: 0 when orthogonal, positive when classes share features
    (for non-negative features, as after the decoder's ReLU)."""
    batch, n_classes, _ = prototypes.shape
    unit = F.normalize(prototypes.float(), dim=-1)
    affinity = unit @ unit.transpose(1, 2) / temperature
    identity = torch.arange(n_classes, device=prototypes.device).repeat(batch)
    ce = F.cross_entropy(affinity.flatten(0, 1), identity)
    orthogonal = math.log(math.exp(1.0 / temperature) + n_classes - 1) - 1.0 / temperature
    return ce - orthogonal


def psd_loss(logits: list[torch.Tensor], temperature: float = 10.0) -> torch.Tensor:
    """Each scale's softened prediction distilled from the next finer one (detached, resized): the mean KL."""
    terms = []
    for finer, coarser in zip(logits[:-1], logits[1:], strict=True):
        teacher = F.interpolate(finer.detach().float(), size=coarser.shape[-2:], mode="bilinear", align_corners=False)
        kl = F.kl_div(F.log_softmax(coarser.float() / temperature, dim=1), F.log_softmax(teacher / temperature, dim=1),
                      reduction="none", log_target=True)
        terms.append(kl.sum(1).mean())
    return torch.stack(terms).mean()


def gaussian_rampup(progress: float, peak: float) -> float:
    """``peak * exp(-5 (1 - t)^2)`` for training progress ``t`` in [0, 1] (Laine & Aila's ramp-up)."""
    t = min(max(progress, 0.0), 1.0)
    return peak * math.exp(-5.0 * (1.0 - t) ** 2)


def resize_labels(target: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(target.shape[-2:]) == tuple(size):
        return target
    return F.interpolate(target[:, None].float(), size=size, mode="nearest")[:, 0].long()


class PLSegLoss(nn.Module):
    """``L_sup + lambda_psd(t) L_PSD + cocl_weight L_COCL``; a module so that its hardness history is checkpointed.

    Args:
        n_classes: organs + background.
        hardness: weight organs by HADFL's hardness (else all weigh 1: the plain decoupled loss).
        psd_peak: the PSD weight at the end of training (0: no PSD; then only the final output is supervised).
        cocl_weight: 0 switches COCL off.
        cocl_source: ``probabilities`` (the authors') or ``features`` (decoder-feature prototypes).
    """

    def __init__(self, n_classes: int, *, hardness: bool = True, psd_peak: float = 0.1, cocl_weight: float = 0.1,
                 psd_temperature: float = 10.0, window: int = 50, cocl_source: str = "probabilities") -> None:
        super().__init__()
        if cocl_source not in COCL_SOURCES:
            raise ValueError(f"cocl_source must be one of {', '.join(COCL_SOURCES)}, got {cocl_source!r}")
        self.hardness = HardnessWeights(n_classes, window) if hardness else None
        self.psd_peak, self.cocl_weight, self.psd_temperature = psd_peak, cocl_weight, psd_temperature
        self.cocl_source = cocl_source
        self.last: dict[str, torch.Tensor] = {}

    @property
    def uses_scales(self) -> bool:
        return self.psd_peak > 0

    def forward(self, outputs: SegOutputs, target: torch.Tensor, annotated: torch.Tensor,
                progress: float) -> torch.Tensor:
        scales = outputs.logits if self.uses_scales else outputs.logits[:1]
        per_scale, weights = [], None
        for logits in scales:
            loss, dice, measured = decoupled_foreground_loss(logits, resize_labels(target, logits.shape[-2:]),
                                                             annotated)
            if weights is None:  # from the full-resolution output, shared by the coarser scales
                # Hardness counts an organ only in batches that hold it (labels exist for annotated organs only).
                present = torch.bincount(target.flatten(), minlength=len(dice)) > 0
                weights = (self.hardness.update(dice, measured & present) if self.hardness is not None
                           else torch.ones_like(dice))
            per_scale.append((loss * weights * measured).sum() / measured.sum().clamp_min(1))
        total = torch.stack(per_scale).mean()
        self.last = {"sup": total.detach()}
        if self.uses_scales:
            psd = psd_loss(outputs.logits, self.psd_temperature)
            total = total + gaussian_rampup(progress, self.psd_peak) * psd
            self.last["psd"] = psd.detach()
        if self.cocl_weight > 0:
            probs = torch.softmax(outputs.logits[0].float(), dim=1)
            prototypes = (probability_maps(probs) if self.cocl_source == "probabilities"
                          else class_prototypes(outputs.features.float(), probs))
            cocl = cocl_loss(prototypes)
            total = total + self.cocl_weight * cocl
            self.last["cocl"] = cocl.detach()
        return total
