"""Batched two-view augmentation of region crops for self-supervised pretraining.

The SimCLR / SimSiam recipe adapted to single-channel CT crops: random resized crop, horizontal and
vertical flips, brightness/contrast jitter, Gaussian blur. Everything runs in torch on the input's
device with per-sample parameters and no Python loop over samples:

- crop + flips: one ``(B, 2, 3)`` affine matrix per sample, one ``F.affine_grid`` + ``F.grid_sample``
  (bilinear, zeros padding, ``align_corners=False``);
- jitter: per-sample contrast factor about the sample mean, then a per-sample additive brightness shift;
- blur: per-sample sigma, separable, two grouped convolutions with the batch folded into channels.

Randomness: all numbers come from one ``(B, N)`` uniform draw on the ``generator`` (or the global RNG of
the input's device), always of the same size whatever the probabilities, so a generator restored from a
checkpoint reproduces the same views bit for bit on the same device and build (on CUDA also with
``torch.backends.cudnn.benchmark`` off, so that the blur convolution keeps one algorithm).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from separeg.runtime.errors import InputError

__all__ = ["AugmentConfig", "augment", "augment_with_geometry", "TwoViews"]

# Columns of the per-sample uniform draw.
_SCALE, _RATIO, _CX, _CY, _HFLIP, _VFLIP, _JITTER, _BRIGHT, _CONTRAST, _BLUR, _SIGMA = range(11)
_N_DRAWS = 11


@dataclass(frozen=True)
class AugmentConfig:
    """Parameters of one random view. Geometry follows SimSiam (Chen & He 2021: crop area 0.2-1, flips, blur);
    intensity jitter is CT-sized: on the [-1000, 1000] HU -> [0, 1] window SimCLR's +-0.4 brightness and x0.6-1.4
    contrast would move tissue by up to ~800 HU, and CT tissue identity is absolute HU (parotid and muscle differ by
    ~0.02 on this scale), so the defaults are +-0.1 (about +-200 HU) and x0.9-1.1 (issue 22, fix 3).

    Attributes:
        crop_scale: area of the crop box as a fraction of the input area, sampled uniformly (``0 < lo <= hi <= 1``).
        crop_ratio: width / height of the crop box in pixels, sampled log-uniformly (``0 < lo <= hi``).
        flip_prob: probability of a horizontal flip and, drawn separately, of a vertical flip.
        brightness: additive shift uniform in ``[-brightness, brightness]`` (intensities are ~[0, 1]).
        contrast: ``x - mean`` (per-sample mean over C, H, W) is multiplied by a factor uniform in
            ``[1 - contrast, 1 + contrast]`` (``0 <= contrast <= 1``).
        jitter_prob: probability that brightness and contrast jitter are applied to a sample.
        blur_prob: probability of a Gaussian blur.
        blur_sigma: blur standard deviation range in output pixels (``0 < lo <= hi``).
    """

    crop_scale: tuple[float, float] = (0.2, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_prob: float = 0.5
    brightness: float = 0.1
    contrast: float = 0.1
    jitter_prob: float = 0.8
    blur_prob: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)

    @classmethod
    def from_dict(cls, data: dict) -> AugmentConfig:
        """From JSON (``config.json``, an experiment config): lists become the (low, high) pairs."""
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})

    def __post_init__(self) -> None:
        for name in ("crop_scale", "crop_ratio", "blur_sigma"):
            value = getattr(self, name)
            if len(value) != 2:
                raise InputError(f"{name} must be a (low, high) pair, got {value!r}")
            object.__setattr__(self, name, (float(value[0]), float(value[1])))
        lo, hi = self.crop_scale
        if not 0.0 < lo <= hi <= 1.0:
            raise InputError(f"crop_scale {self.crop_scale} must satisfy 0 < low <= high <= 1 (area fraction)")
        lo, hi = self.crop_ratio
        if not (0.0 < lo <= hi and math.isfinite(hi)):
            raise InputError(f"crop_ratio {self.crop_ratio} must satisfy 0 < low <= high (width / height)")
        lo, hi = self.blur_sigma
        if not (0.0 < lo <= hi and math.isfinite(hi)):
            raise InputError(f"blur_sigma {self.blur_sigma} must satisfy 0 < low <= high (pixels)")
        for name in ("flip_prob", "jitter_prob", "blur_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise InputError(f"{name} must be a probability in [0, 1], got {getattr(self, name)}")
        if not (0.0 <= self.brightness and math.isfinite(self.brightness)):
            raise InputError(f"brightness must be >= 0, got {self.brightness}")
        if not 0.0 <= self.contrast <= 1.0:
            raise InputError(f"contrast must be in [0, 1] (factor 1 - contrast >= 0), got {self.contrast}")

    @property
    def kernel_size(self) -> int:
        """Odd length of the blur kernels: covers 3 sigma of the largest sigma on each side."""
        return 2 * math.ceil(3.0 * self.blur_sigma[1]) + 1


def _draw(batch: int, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """``(batch, _N_DRAWS)`` float32 uniforms in [0, 1) on ``x.device``, from ``generator`` or the global RNG."""
    if generator is None:
        return torch.rand(batch, _N_DRAWS, device=x.device, dtype=torch.float32)
    if generator.device.type != x.device.type:
        raise InputError(f"the generator is on {generator.device} but the images are on {x.device}; create it "
                         f"with torch.Generator(device={x.device.type!r}) so that views are reproducible")
    u = torch.rand(batch, _N_DRAWS, generator=generator, device=generator.device, dtype=torch.float32)
    return u.to(x.device)


def _uniform(u: torch.Tensor, bounds: tuple[float, float]) -> torch.Tensor:
    return bounds[0] + (bounds[1] - bounds[0]) * u


def _crop_flip_theta(u: torch.Tensor, config: AugmentConfig, height: int, width: int) -> torch.Tensor:
    """Per-sample affine matrices of random resized crop + flips.

    Like torchvision's ``RandomResizedCrop`` (area fraction uniform in ``crop_scale``, pixel aspect ratio
    log-uniform in ``crop_ratio``), vectorised: instead of retrying, the box's width and height fractions
    are clamped to 1. The centre is then drawn so that the box stays inside the input; its range is shrunk
    by half a pixel so that no bilinear tap reaches the zero padding (a constant image stays constant).
    With scale 1 and ratio ``width / height`` the matrix is the identity.

    Args:
        u: ``(B, _N_DRAWS)`` uniforms.
        config: augmentation parameters.
        height, width: input size in pixels.

    Returns:
        ``(B, 2, 3)`` float32 matrices mapping output to input normalised coordinates (``F.affine_grid``).
    """
    scale = _uniform(u[:, _SCALE], config.crop_scale)
    log_lo, log_hi = math.log(config.crop_ratio[0]), math.log(config.crop_ratio[1])
    ratio = torch.exp(_uniform(u[:, _RATIO], (log_lo, log_hi)))
    # Box size as a fraction of the input extent: (w W) * (h H) = scale H W and (w W) / (h H) = ratio.
    w = torch.sqrt(scale * ratio * (height / width)).clamp(max=1.0)
    h = torch.sqrt(scale / ratio * (width / height)).clamp(max=1.0)
    # In normalised coordinates the box is [cx - w, cx + w]; outermost output pixel centres sit at +-(1 - 1/W).
    cx = (1.0 - w) * (1.0 - 1.0 / width) * (2.0 * u[:, _CX] - 1.0)
    cy = (1.0 - h) * (1.0 - 1.0 / height) * (2.0 * u[:, _CY] - 1.0)
    sx = torch.where(u[:, _HFLIP] < config.flip_prob, -1.0, 1.0)
    sy = torch.where(u[:, _VFLIP] < config.flip_prob, -1.0, 1.0)
    zero = torch.zeros_like(w)
    return torch.stack([torch.stack([w * sx, zero, cx], 1), torch.stack([zero, h * sy, cy], 1)], 1)


def _warp(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Resample ``x`` ``(B, C, H, W)`` through ``theta`` ``(B, 2, 3)``: bilinear, zeros padding, same size."""
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _jitter(x: torch.Tensor, u: torch.Tensor, config: AugmentConfig) -> torch.Tensor:
    """Per-sample contrast about the sample mean, then brightness shift, where selected.

    Intensities are not clamped to [0, 1] afterwards: crops are zero outside their region, and a clamp
    would flatten that padding and the dark tissue differently per sample; the encoder's normalisation
    copes with unclamped values. Unselected samples are returned unchanged (exactly).
    """
    shape = (-1, 1, 1, 1)
    factor = _uniform(u[:, _CONTRAST], (1.0 - config.contrast, 1.0 + config.contrast)).to(x.dtype).view(shape)
    shift = _uniform(u[:, _BRIGHT], (-config.brightness, config.brightness)).to(x.dtype).view(shape)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    jittered = (x - mean) * factor + mean + shift
    return torch.where((u[:, _JITTER] < config.jitter_prob).view(shape), jittered, x)


def _gaussian_kernels(sigma: torch.Tensor, selected: torch.Tensor, size: int) -> torch.Tensor:
    """Normalised 1D Gaussian kernels ``(B, size)``; a delta where ``selected`` (``(B,)`` bool) is False."""
    t = torch.arange(size, device=sigma.device, dtype=sigma.dtype) - size // 2
    kernels = torch.exp(-0.5 * (t / sigma[:, None]) ** 2)
    kernels = kernels / kernels.sum(dim=1, keepdim=True)
    delta = (t == 0).to(sigma.dtype).expand_as(kernels)
    return torch.where(selected[:, None], kernels, delta)


def _blur(x: torch.Tensor, u: torch.Tensor, config: AugmentConfig) -> torch.Tensor:
    """Separable Gaussian blur with per-sample sigma: reflect padding, two convolutions with groups = B * C."""
    batch, channels, height, width = x.shape
    size = config.kernel_size
    pad = size // 2
    if pad >= min(height, width):
        raise InputError(f"crops of {height} x {width} are too small for blur kernels of {size} pixels "
                         f"(blur_sigma up to {config.blur_sigma[1]}); lower blur_sigma or use larger crops")
    sigma = _uniform(u[:, _SIGMA], config.blur_sigma).to(x.dtype)
    kernels = _gaussian_kernels(sigma, u[:, _BLUR] < config.blur_prob, size)
    weight = kernels.repeat_interleave(channels, dim=0)  # (B * C, K)
    groups = batch * channels
    y = x.reshape(1, groups, height, width)
    y = F.conv2d(F.pad(y, (pad, pad, 0, 0), mode="reflect"), weight.view(groups, 1, 1, size), groups=groups)
    y = F.conv2d(F.pad(y, (0, 0, pad, pad), mode="reflect"), weight.view(groups, 1, size, 1), groups=groups)
    return y.view(batch, channels, height, width)


def augment(x: torch.Tensor, config: AugmentConfig, generator: torch.Generator | None = None) -> torch.Tensor:
    """One random view of each sample: crop + flips, jitter, blur (in that order, as SimCLR).

    See :func:`augment_with_geometry` for the arguments; this drops the geometry.
    """
    return augment_with_geometry(x, config, generator)[0]


def augment_with_geometry(x: torch.Tensor, config: AugmentConfig,
                          generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One random view of each sample, and the crop + flip matrices that made it.

    Args:
        x: ``(B, C, H, W)`` floating images, intensities ~[0, 1], on any device.
        config: augmentation parameters.
        generator: source of all random numbers. It must be on the same device type as ``x``
            (``torch.Generator(device="cuda")`` for CUDA inputs); the same generator state gives the same
            views. ``None`` uses the global RNG of ``x``'s device.

    Returns:
        ``(B, C, H, W)`` views, same dtype and device as ``x`` (half and bfloat16 are computed in float32),
        not clamped to [0, 1]; and ``(B, 2, 3)`` matrices mapping a view's normalised coordinates to the
        input's (``F.affine_grid`` convention), which dense methods use to pair pixels across views.

    Raises:
        InputError: ``x`` is not a 4D floating tensor, the generator is on another device type, or the crops
            are smaller than the blur kernel's half-width.
    """
    if x.dim() != 4 or not x.is_floating_point():
        raise InputError(f"augment expects a (B, C, H, W) floating tensor, got {tuple(x.shape)} {x.dtype}")
    batch, _, height, width = x.shape
    u = _draw(batch, x, generator)
    theta = _crop_flip_theta(u, config, height, width)
    if batch == 0:
        return x.clone(), theta
    work = x if x.dtype in (torch.float32, torch.float64) else x.float()
    out = _warp(work, theta)
    if config.jitter_prob > 0.0:
        out = _jitter(out, u, config)
    if config.blur_prob > 0.0:
        out = _blur(out, u, config)
    return out.to(x.dtype), theta


class TwoViews:
    """Two independent random views of a batch, as SimSiam / SimCLR / BYOL consume them.

    Both views are made in one :func:`augment` call on the batch stacked twice (one kernel launch
    sequence instead of two), so their parameters are independent draws.

    Args:
        config: augmentation parameters, shared by both views.
    """

    def __init__(self, config: AugmentConfig = AugmentConfig()) -> None:
        self.config = config

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Views of ``x`` ``(B, C, H, W)``: two ``(B, C, H, W)`` tensors (see :func:`augment` for ``generator``)."""
        views = augment(torch.cat([x, x]), self.config, generator)
        return views[: len(x)], views[len(x) :]

    def __repr__(self) -> str:
        return f"TwoViews({self.config})"
