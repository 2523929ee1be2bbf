"""Time and disk of a pretraining run, estimated before it starts (docs/physicist.md, "Time and disk").

Time: one SSL training step of the run's encoder, method and crop size is timed on the run's device (a warm-up step,
then a measured one, on up to 4 crops, scaled to the batch size), times the run's iterations; the ``embed`` step
(every region through the inter-organ model once, before k-means) is a forward pass per region, timed the same
way. Disk: each stage checkpoint holds the SSL model (encoder, projector, predictor, EMA target) and its SGD
momentum, 4 bytes per number; there is one for the inter-organ stage, one per organ group and one for
distillation; the encoder bundle holds the encoder's weights. Region crops are cached besides (not counted).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

__all__ = ["PretrainEstimate", "estimate_pretraining", "format_duration", "format_bytes"]

_TIMED_CROPS = 4


@dataclass(frozen=True)
class PretrainEstimate:
    """Attributes: seconds per training iteration and per embedded region, checkpoint and encoder sizes."""

    device: str
    seconds_per_iteration: float
    seconds_per_region: float
    iterations: int
    checkpoint_bytes: int
    checkpoints: int
    encoder_bytes: int

    @property
    def training_seconds(self) -> float:
        return self.seconds_per_iteration * self.iterations

    @property
    def disk_bytes(self) -> int:
        return self.checkpoint_bytes * self.checkpoints + self.encoder_bytes

    def describe(self) -> str:
        return (f"estimate on {self.device}: {self.seconds_per_iteration:.2g} s per iteration, so about "
                f"{format_duration(self.training_seconds)} for {self.iterations} iterations, plus "
                f"{1000 * self.seconds_per_region:.2g} s per 1000 regions to embed them once (the 'embed' step "
                f"before k-means); disk: {self.checkpoints} checkpoints of {format_bytes(self.checkpoint_bytes)} and "
                f"an encoder of {format_bytes(self.encoder_bytes)}, {format_bytes(self.disk_bytes)} in all, plus the "
                "region cache")


def format_duration(seconds: float) -> str:
    """``"45 s"``, ``"12 min"``, ``"3.5 h"``, ``"2.1 days"``."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    if seconds < 48 * 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def format_bytes(size: float) -> str:
    for unit in ("bytes", "kB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "bytes" else f"{size:.3g} {unit}"
        size /= 1000
    raise AssertionError("unreachable")


def estimate_pretraining(cfg, device: torch.device) -> PretrainEstimate:
    """Time one training step and one embedding pass of ``cfg``'s SSL model on ``device``; count its bytes.

    Args:
        cfg: the run's :class:`~separeg.pretrain.config.PretrainConfig`.
        device: where the run trains.
    """
    from separeg.pretrain.ssl import SSLModel

    model = SSLModel(cfg.method, cfg.encoder, cfg.in_channels, temperature=cfg.temperature, momentum=cfg.ema)
    model = model.to(device)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    numbers = sum(p.numel() for p in model.parameters()) + sum(b.numel() for b in model.buffers())
    encoder = sum(t.numel() for t in model.backbone.state_dict().values())
    crops = max(1, min(cfg.batch_size, _TIMED_CROPS))
    x = torch.randn(crops, cfg.in_channels, cfg.crop_size, cfg.crop_size, device=device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0, momentum=0.9)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        model.loss(model(x, x.flip(-1))).backward()
        optimizer.step()

    def timed(fn) -> float:
        fn()  # warm-up (allocations, kernels)
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        return time.perf_counter() - start

    model.train()
    per_iteration = timed(step) * cfg.batch_size / crops
    model.eval()
    with torch.no_grad():
        per_region = timed(lambda: model.project(x)) / crops
    checkpoints = (1 + cfg.clusters + 1) if cfg.iid else 1
    return PretrainEstimate(str(device), per_iteration, per_region, cfg.iterations, 4 * (numbers + trainable),
                            checkpoints, 4 * encoder)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
