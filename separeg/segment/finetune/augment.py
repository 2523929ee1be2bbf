"""Fine-tuning augmentation: joint image/label transforms of a training batch, in torch on the batch's device.

``nnunet`` is nnU-Net's 2D augmentation set (Isensee et al., nnU-Net, Nat. Methods 2021; the
per-transform probabilities of its default trainer) **without mirroring**, which would swap Parotid_L and Parotid_R
(DESIGN §7; ``--mirror-augmentation`` mirrors with the lateral labels exchanged,
:mod:`separeg.segment.mirror`), and without elastic deformation (off in nnU-Net v2 by default too):

==========================  ======  ==============================================================
transform                   p       range
==========================  ======  ==============================================================
rotation                    0.2     ±30° (nnU-Net: ±180°; CT patients lie in a known orientation)
scaling                     0.2     0.7-1.4
Gaussian noise              0.1     σ ~ U(0, 0.05) of the [0, 1] window (≈ nnU-Net's variance 0.1 in z units)
Gaussian blur               0.2     σ ~ U(0.5, 1) pixels
brightness (multiplicative) 0.15    × U(0.75, 1.25)
contrast                    0.15    × U(0.75, 1.25) about the mean, clipped to the sample's range
low-resolution simulation   0.25    down by U(0.5, 1), nearest; back up, bicubic
gamma                       0.3     γ ~ U(0.7, 1.5) on the sample's [min, max], mean and std kept
inverted gamma              0.1     the same on the inverted intensities
==========================  ======  ==============================================================

``light`` is the recipe before this set (rotation ±10°, scale 0.9-1.1, brightness/contrast ±10 %, always on);
``none`` switches augmentation off. Every channel of a sample (2.5D neighbours, co-registered sequences) gets
the same transforms. Randomness comes only from the ``torch.Generator`` given, so a resumed run redraws
exactly what the uninterrupted run drew.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from separeg.registry import AUGMENTATIONS

__all__ = ["AUGMENTATIONS", "augment_batch"]


def augment_batch(x: torch.Tensor, y: torch.Tensor, generator: torch.Generator,
                  kind: str = "nnunet") -> tuple[torch.Tensor, torch.Tensor]:
    """Augment ``(B, C, H, W)`` images with their ``(B, H, W)`` int64 labels; returns both, same shapes."""
    if kind == "none":
        return x, y
    if kind == "light":
        return _light(x, y, generator)
    if kind != "nnunet":
        raise ValueError(f"unknown augmentation {kind!r}; choose one of {', '.join(AUGMENTATIONS)}")
    x, y = _spatial(x, y, generator)
    x = _noise(x, generator)
    x = _blur(x, generator)
    x = _brightness(x, generator)
    x = _contrast(x, generator)
    x = _low_resolution(x, generator)
    x = _gamma(x, generator, p=0.1, invert=True)
    x = _gamma(x, generator, p=0.3, invert=False)
    return x, y


def _uniform(generator: torch.Generator, n: int, lo: float, hi: float, device: torch.device) -> torch.Tensor:
    return (lo + (hi - lo) * torch.rand(n, generator=generator, device=generator.device)).to(device)


def _chosen(generator: torch.Generator, n: int, p: float, device: torch.device) -> torch.Tensor:
    return (torch.rand(n, generator=generator, device=generator.device) < p).to(device)


def _warp(x: torch.Tensor, y: torch.Tensor, angle: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Rotate by ``angle`` and zoom by ``scale`` (> 1 enlarges) about the centre; labels by nearest neighbour."""
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    zero = torch.zeros_like(cos)
    theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1).to(x.dtype)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    y = F.grid_sample(y[:, None].to(x.dtype), grid, mode="nearest", padding_mode="zeros", align_corners=False)
    return x, y[:, 0].round().long()


def _light(x: torch.Tensor, y: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    batch = len(x)
    u = torch.rand(batch, 4, generator=generator, device=generator.device).to(x.device)
    x, y = _warp(x, y, (u[:, 0] - 0.5) * math.radians(20), 0.9 + 0.2 * u[:, 1])
    x = (x - 0.5) * (0.9 + 0.2 * u[:, 2, None, None, None]) + 0.5 + 0.1 * (u[:, 3, None, None, None] - 0.5)
    return x, y


def _spatial(x: torch.Tensor, y: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    batch, device = len(x), x.device
    rotate, zoom = _chosen(generator, batch, 0.2, device), _chosen(generator, batch, 0.2, device)
    angle = torch.where(rotate, _uniform(generator, batch, -math.radians(30), math.radians(30), device), 0.0)
    scale = torch.where(zoom, _uniform(generator, batch, 0.7, 1.4, device), 1.0)
    if not bool((rotate | zoom).any()):
        return x, y
    return _warp(x, y, angle, scale)


def _noise(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    batch = len(x)
    sigma = torch.where(_chosen(generator, batch, 0.1, x.device), _uniform(generator, batch, 0.0, 0.05, x.device), 0.0)
    noise = torch.randn(x.shape, generator=generator, device=generator.device).to(x.device, x.dtype)
    return x + sigma[:, None, None, None] * noise


def _blur(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Separable Gaussian blur with a per-sample σ (σ = 0: unchanged), one grouped convolution per axis."""
    batch, channels, height, width = x.shape
    chosen = _chosen(generator, batch, 0.2, x.device)
    sigma = _uniform(generator, batch, 0.5, 1.0, x.device)
    if not bool(chosen.any()):
        return x
    radius = 3
    taps = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    kernel = torch.exp(-0.5 * (taps[None] / sigma[:, None].to(x.dtype)) ** 2)
    identity = (taps == 0).to(x.dtype).expand_as(kernel)
    kernel = torch.where(chosen[:, None], kernel / kernel.sum(1, keepdim=True), identity)
    kernel = kernel.repeat_interleave(channels, 0)  # (B*C, taps)
    flat = x.reshape(1, batch * channels, height, width)
    flat = F.conv2d(F.pad(flat, (radius, radius, 0, 0), mode="replicate"), kernel[:, None, None, :],
                    groups=batch * channels)
    flat = F.conv2d(F.pad(flat, (0, 0, radius, radius), mode="replicate"), kernel[:, None, :, None],
                    groups=batch * channels)
    return flat.reshape(batch, channels, height, width)


def _brightness(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    batch = len(x)
    factor = torch.where(_chosen(generator, batch, 0.15, x.device), _uniform(generator, batch, 0.75, 1.25, x.device),
                         1.0)
    return x * factor[:, None, None, None].to(x.dtype)


def _contrast(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    batch = len(x)
    chosen = _chosen(generator, batch, 0.15, x.device)
    factor = torch.where(chosen, _uniform(generator, batch, 0.75, 1.25, x.device), 1.0)[:, None, None, None]
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    lo, hi = x.amin(dim=(1, 2, 3), keepdim=True), x.amax(dim=(1, 2, 3), keepdim=True)
    return torch.minimum(torch.maximum((x - mean) * factor.to(x.dtype) + mean, lo), hi)


def _low_resolution(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    batch, _, height, width = x.shape
    chosen = _chosen(generator, batch, 0.25, x.device).tolist()
    zoom = _uniform(generator, batch, 0.5, 1.0, x.device).tolist()
    if not any(chosen):
        return x
    out = x.clone()
    for i in (i for i, c in enumerate(chosen) if c):
        size = (max(1, round(height * zoom[i])), max(1, round(width * zoom[i])))
        small = F.interpolate(x[i:i + 1], size=size, mode="nearest")
        out[i:i + 1] = F.interpolate(small, size=(height, width), mode="bicubic", align_corners=False)
    return out


def _gamma(x: torch.Tensor, generator: torch.Generator, *, p: float, invert: bool) -> torch.Tensor:
    """nnU-Net's gamma transform: on the sample scaled to [0, 1], keeping its mean and standard deviation."""
    batch = len(x)
    chosen = _chosen(generator, batch, p, x.device)
    gamma = _uniform(generator, batch, 0.7, 1.5, x.device)
    if not bool(chosen.any()):
        return x
    dims = (1, 2, 3)
    v = -x if invert else x
    mean, std = v.mean(dim=dims, keepdim=True), v.std(dim=dims, keepdim=True)
    lo, hi = v.amin(dim=dims, keepdim=True), v.amax(dim=dims, keepdim=True)
    span = (hi - lo).clamp_min(1e-7)
    g = gamma[:, None, None, None].to(x.dtype)
    w = ((v - lo) / span).clamp(0, 1) ** g * span + lo
    w = (w - w.mean(dim=dims, keepdim=True)) / w.std(dim=dims, keepdim=True).clamp_min(1e-7) * std + mean
    w = -w if invert else w
    return torch.where(chosen[:, None, None, None], w, x)
