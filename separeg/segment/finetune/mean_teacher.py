"""Mean Teacher on the unlabelled archive (Tarvainen & Valpola, 2017; SepaReg, AAAI 2022, Table 7).

A teacher U-Net is the exponential moving average (EMA) of the student's weights. On unlabelled CT slices the
student, seeing one noisy copy of a slice, is pulled towards the teacher's prediction on another noisy copy
(mean squared error of the softmax maps), with a weight ramped up over the first part of training. Both start
from the same weights, so with ``--init`` both start from the pretrained encoder (SepaReg + Mean Teacher).
The teacher is the model that is validated and saved: averaged weights are the steadier predictor.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from separeg.runtime.errors import InputError
from separeg.runtime.events import Events
from separeg.segment.finetune.plseg import gaussian_rampup
from separeg.segment.network import GridSpec, neighbour_index, to_canonical, to_model_grid

__all__ = ["ema_update", "UnlabelledSlices", "MeanTeacher"]


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, decay: float) -> None:
    """``teacher = decay * teacher + (1 - decay) * student`` for parameters and floating-point buffers
    (batch-norm statistics); integer buffers (batch counters) are copied."""
    for t, s in zip(teacher.parameters(), student.parameters(), strict=True):
        t.lerp_(s.detach(), 1.0 - decay)
    for t, s in zip(teacher.buffers(), student.buffers(), strict=True):
        if t.is_floating_point():
            t.lerp_(s, 1.0 - decay)
        else:
            t.copy_(s)


class UnlabelledSlices:
    """Axial slices of an unlabelled archive on the model grid (float16, on the training device).

    At most ``max_slices`` in all, spread evenly over the volumes and, within each, evenly over its slices, so
    that a large archive costs bounded memory (2,048 slices of 512 x 512 are 1 GiB).
    """

    def __init__(self, slices: list[torch.Tensor], names: list[str]) -> None:
        if not slices:
            raise InputError("the unlabelled archive yielded no slices")
        self.slices = slices
        self.names = names
        self._sizes = np.array([len(s) for s in slices])

    def __len__(self) -> int:
        return int(self._sizes.sum())

    @classmethod
    def from_archive(cls, folder: str | Path, spec: GridSpec, *, max_slices: int, device: torch.device,
                     events: Events | None = None, modality: str = "CT") -> UnlabelledSlices:
        import SimpleITK as sitk

        from separeg.io.archive import format_table, scan_archive

        events = events or Events()
        manifest = scan_archive(folder, modality=modality, events=events)
        usable = manifest.require_usable()
        events.log(f"unlabelled archive: {len(usable)} volume(s)\n" + format_table(manifest), stage="mean-teacher")
        per_volume = max(1, max_slices // len(usable))
        slices, names = [], []
        for entry in usable:
            image = to_canonical(entry.read(manifest.root))
            hu = sitk.GetArrayViewFromImage(image)
            keep = np.unique(np.linspace(0, len(hu) - 1, min(per_volume, len(hu))).round().astype(int))
            # 2.5D: each kept slice with its neighbours, as the network's input channels (segmodel.with_context).
            rows = neighbour_index(len(hu), spec.context_slices)[keep].numpy()
            x = to_model_grid(np.ascontiguousarray(hu[rows.ravel()]), image.GetSpacing()[:2], spec, device=device)
            x = x.reshape(len(keep), rows.shape[1], *x.shape[-2:])
            slices.append(x.to(torch.float16))
            names.append(entry.path)
        return cls(slices, names)

    def sample(self, batch: int, patch: int, rng: np.random.Generator) -> torch.Tensor:
        """``(batch, 2k + 1, patch, patch)`` float32 crops of random slices (zero-padded where a slice is smaller)."""
        volumes = rng.choice(len(self.slices), size=batch, p=self._sizes / self._sizes.sum())
        crops = []
        for v in volumes:
            stack = self.slices[v]
            k = rng.integers(len(stack))
            height, width = stack.shape[-2:]
            y0 = int(rng.integers(max(1, height - patch + 1)))
            x0 = int(rng.integers(max(1, width - patch + 1)))
            crop = stack[k, :, y0:y0 + patch, x0:x0 + patch].float()
            crops.append(F.pad(crop, (0, patch - crop.shape[-1], 0, patch - crop.shape[-2])))
        return torch.stack(crops)


def _noisy(x: torch.Tensor, generator: torch.Generator, sigma: float) -> torch.Tensor:
    """Gaussian noise and a small brightness/contrast change: two calls give the two views of a slice."""
    batch = len(x)
    noise = torch.randn(x.shape, generator=generator, device=generator.device).to(x.device)
    u = torch.rand(batch, 2, 1, 1, 1, generator=generator, device=generator.device).to(x.device)
    return (x - 0.5) * (0.9 + 0.2 * u[:, 0]) + 0.5 + 0.1 * (u[:, 1] - 0.5) + sigma * noise


class MeanTeacher(nn.Module):
    """The EMA teacher and the consistency loss. A module, so that the teacher is checkpointed with its state.

    Args:
        student: the U-Net being trained; the teacher starts as its copy.
        unlabelled: slices for the consistency loss.
        decay: EMA decay (0.99); early on the teacher follows the student closer (``min(decay, 1 - 1/(t+1))``).
        consistency: the consistency loss weight at the end of the ramp-up.
        rampup: fraction of training over which the weight ramps up (``exp(-5 (1 - t)^2)``).
        noise: standard deviation of the Gaussian noise on the [0, 1] intensities.
    """

    def __init__(self, student: nn.Module, unlabelled: UnlabelledSlices, *, decay: float = 0.99,
                 consistency: float = 0.1, rampup: float = 0.4, noise: float = 0.03) -> None:
        super().__init__()
        if not 0.0 <= decay < 1.0:
            raise InputError(f"the EMA decay must be in [0, 1), got {decay}")
        self.teacher = copy.deepcopy(student)
        self.teacher.requires_grad_(False)
        self.unlabelled = unlabelled
        self.decay, self.consistency, self.rampup, self.noise = decay, consistency, rampup, noise

    def weight(self, progress: float) -> float:
        return gaussian_rampup(progress / self.rampup if self.rampup > 0 else 1.0, self.consistency)

    def loss(self, student: nn.Module, batch: int, patch: int, progress: float, rng: np.random.Generator,
             generator: torch.Generator) -> torch.Tensor:
        """The weighted consistency loss on one batch of unlabelled crops."""
        x = self.unlabelled.sample(batch, patch, rng).to(next(student.parameters()).device)
        with torch.no_grad():
            target = torch.softmax(self.teacher(_noisy(x, generator, self.noise)).float(), dim=1)
        prediction = torch.softmax(student(_noisy(x, generator, self.noise)).float(), dim=1)
        return self.weight(progress) * F.mse_loss(prediction, target)

    def update(self, student: nn.Module, step: int) -> None:
        """EMA step after optimizer step ``step`` (1-based)."""
        ema_update(self.teacher, student, min(self.decay, 1.0 - 1.0 / (step + 1)))
