"""Φ_CLR methods: SimSiam (default), BYOL and SimCLR as entries of one registry over one model class.

Paper, Eq. 1: SimSiam with a ResNet encoder, a projector and a predictor (2 layers, hidden 4096,
out 256). BYOL is SimSiam plus an EMA target network (Grill et al. 2020; byol-pytorch shares the class
the same way); SimCLR drops the predictor and uses NT-Xent (Chen et al. 2020).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import InputError
from ..nets import PooledEncoder, mlp_head
from .losses import negative_cosine, nt_xent

__all__ = ["MethodSpec", "METHODS", "SSLModel"]


@dataclass(frozen=True)
class MethodSpec:
    name: str
    predictor: bool
    momentum_target: bool
    loss: Callable[[dict[str, torch.Tensor], SSLModel], torch.Tensor]
    description: str


def _simsiam_loss(out: dict[str, torch.Tensor], model: SSLModel) -> torch.Tensor:
    return 0.5 * (negative_cosine(out["p1"], out["z2"].detach()) + negative_cosine(out["p2"], out["z1"].detach()))


def _byol_loss(out: dict[str, torch.Tensor], model: SSLModel) -> torch.Tensor:
    return 0.5 * (negative_cosine(out["p1"], out["t2"]) + negative_cosine(out["p2"], out["t1"]))


def _simclr_loss(out: dict[str, torch.Tensor], model: SSLModel) -> torch.Tensor:
    return nt_xent(out["z1"], out["z2"], model.temperature)


METHODS: dict[str, MethodSpec] = {
    "simsiam": MethodSpec("simsiam", True, False, _simsiam_loss, "SimSiam: predictor + stop-gradient (paper default)"),
    "byol": MethodSpec("byol", True, True, _byol_loss, "BYOL: predictor + EMA target network"),
    "simclr": MethodSpec("simclr", False, False, _simclr_loss, "SimCLR: NT-Xent with in-batch negatives"),
}


class SSLModel(nn.Module):
    """Encoder, projector, optional predictor and optional EMA target, for any method in :data:`METHODS`.

    ``forward(x1, x2)`` returns the tensors the method's loss needs: ``z1, z2`` (projections, ``(B, 256)``),
    ``p1, p2`` (predictions) and ``t1, t2`` (target projections, no gradient).
    """

    def __init__(self, method: str, encoder: str, in_channels: int = 1, *, hidden_dim: int = 4096,
                 out_dim: int = 256, temperature: float = 0.1, momentum: float = 0.996) -> None:
        super().__init__()
        if method not in METHODS:
            raise InputError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
        self.spec = METHODS[method]
        self.temperature = temperature
        self.base_momentum = momentum
        self.backbone = PooledEncoder(encoder, in_channels)
        self.projector = mlp_head(self.backbone.dim, hidden_dim, out_dim)
        self.predictor = mlp_head(out_dim, hidden_dim, out_dim) if self.spec.predictor else None
        if self.spec.momentum_target:
            self.target_backbone = copy.deepcopy(self.backbone).requires_grad_(False)
            self.target_projector = copy.deepcopy(self.projector).requires_grad_(False)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W) -> (B, out_dim)`` projection of one view."""
        return self.projector(self.backbone(x))

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> dict[str, torch.Tensor]:
        z1, z2 = self.project(x1), self.project(x2)
        out = {"z1": z1, "z2": z2}
        if self.predictor is not None:
            out["p1"], out["p2"] = self.predictor(z1), self.predictor(z2)
        if self.spec.momentum_target:
            with torch.no_grad():
                out["t1"] = self.target_projector(self.target_backbone(x1))
                out["t2"] = self.target_projector(self.target_backbone(x2))
        return out

    def loss(self, out: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.spec.loss(out, self)

    @torch.no_grad()
    def after_step(self, progress: float) -> None:
        """BYOL: EMA update of the target, momentum raised from its base to 1 on a cosine (Grill et al. 2020)."""
        if not self.spec.momentum_target:
            return
        momentum = 1.0 - (1.0 - self.base_momentum) * (math.cos(math.pi * progress) + 1.0) / 2.0
        for online, target in ((self.backbone, self.target_backbone), (self.projector, self.target_projector)):
            for p_online, p_target in zip(online.parameters(), target.parameters(), strict=True):
                p_target.mul_(momentum).add_(p_online.detach(), alpha=1.0 - momentum)
            for b_online, b_target in zip(online.buffers(), target.buffers(), strict=True):
                b_target.copy_(b_online)
