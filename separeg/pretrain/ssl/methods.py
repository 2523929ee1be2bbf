"""Φ_CLR methods: SimSiam (default), BYOL, SimCLR and MoCo v3 as entries of one registry over one model class.

Paper, Eq. 1: SimSiam with a ResNet encoder, a projector and a predictor (2 layers, hidden 4096,
out 256). BYOL is SimSiam plus an EMA target network (Grill et al. 2020; byol-pytorch shares the class
the same way); SimCLR drops the predictor and uses NT-Xent (Chen et al. 2020). MoCo v3 (Chen, Xie & He
2021) is BYOL's structure with MoCo v3's heads (a 3-layer projector and a 2-layer predictor, BN after every
layer) and a symmetrised InfoNCE between the predictions and the other view's momentum keys.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from separeg.pretrain.encoders import PooledEncoder, mlp_head, moco_mlp
from separeg.runtime.errors import InputError

from .losses import info_nce, negative_cosine, nt_xent

__all__ = ["MethodSpec", "METHODS", "SSLModel"]


def _two_layer_heads(in_dim: int, hidden_dim: int, out_dim: int, predictor: bool) -> tuple[nn.Module, nn.Module | None]:
    """The paper's projector and (optional) predictor: 2 layers each."""
    return mlp_head(in_dim, hidden_dim, out_dim), mlp_head(out_dim, hidden_dim, out_dim) if predictor else None


def _moco_v3_heads(in_dim: int, hidden_dim: int, out_dim: int, predictor: bool) -> tuple[nn.Module, nn.Module | None]:
    """MoCo v3's 3-layer projector (last BN without affine) and 2-layer predictor (Chen, Xie & He 2021, §4)."""
    return (moco_mlp(in_dim, hidden_dim, out_dim, layers=3, last_bn=True),
            moco_mlp(out_dim, hidden_dim, out_dim, layers=2, last_bn=False) if predictor else None)


@dataclass(frozen=True)
class MethodSpec:
    name: str
    predictor: bool
    momentum_target: bool
    loss: Callable[[dict[str, torch.Tensor], SSLModel], torch.Tensor]
    description: str
    heads: Callable[[int, int, int, bool], tuple[nn.Module, nn.Module | None]] = _two_layer_heads
    temperature: float = 0.1  # the contrastive losses' default (SimCLR's; MoCo v3's is 0.2)


def _simsiam_loss(out: dict[str, torch.Tensor], model: SSLModel) -> torch.Tensor:
    return 0.5 * (negative_cosine(out["p1"], out["z2"].detach()) + negative_cosine(out["p2"], out["z1"].detach()))


def _byol_loss(out: dict[str, torch.Tensor], model: SSLModel) -> torch.Tensor:
    return 0.5 * (negative_cosine(out["p1"], out["t2"]) + negative_cosine(out["p2"], out["t1"]))


def _simclr_loss(out: dict[str, torch.Tensor], model: SSLModel) -> torch.Tensor:
    return nt_xent(out["z1"], out["z2"], model.temperature)


def _mocov3_loss(out: dict[str, torch.Tensor], model: SSLModel) -> torch.Tensor:
    return info_nce(out["p1"], out["t2"].detach(), model.temperature) + info_nce(out["p2"], out["t1"].detach(),
                                                                                model.temperature)


METHODS: dict[str, MethodSpec] = {
    "simsiam": MethodSpec("simsiam", True, False, _simsiam_loss, "SimSiam: predictor + stop-gradient (paper default)"),
    "byol": MethodSpec("byol", True, True, _byol_loss, "BYOL: predictor + EMA target network"),
    "simclr": MethodSpec("simclr", False, False, _simclr_loss, "SimCLR: NT-Xent with in-batch negatives"),
    "mocov3": MethodSpec("mocov3", True, True, _mocov3_loss, "MoCo v3: predictor + momentum keys, InfoNCE",
                         heads=_moco_v3_heads, temperature=0.2),
}


class SSLModel(nn.Module):
    """Encoder, projector, optional predictor and optional EMA target, for any method in :data:`METHODS`.

    ``forward(x1, x2)`` returns the tensors the method's loss needs: ``z1, z2`` (projections, ``(B, 256)``),
    ``p1, p2`` (predictions) and ``t1, t2`` (target projections, no gradient). ``temperature`` defaults to the
    method's (:attr:`MethodSpec.temperature`).
    """

    def __init__(self, method: str, encoder: str, in_channels: int = 1, *, hidden_dim: int = 4096,
                 out_dim: int = 256, temperature: float | None = None, momentum: float = 0.996) -> None:
        super().__init__()
        if method not in METHODS:
            raise InputError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
        self.spec = METHODS[method]
        self.temperature = self.spec.temperature if temperature is None else temperature
        self.base_momentum = momentum
        self.backbone = PooledEncoder(encoder, in_channels)
        self.projector, self.predictor = self.spec.heads(self.backbone.dim, hidden_dim, out_dim, self.spec.predictor)
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
        """BYOL, MoCo v3: EMA update of the target, momentum raised from its base to 1 on a cosine (Grill et al.
        2020; MoCo v3 uses the same schedule)."""
        if not self.spec.momentum_target:
            return
        momentum = 1.0 - (1.0 - self.base_momentum) * (math.cos(math.pi * progress) + 1.0) / 2.0
        for online, target in ((self.backbone, self.target_backbone), (self.projector, self.target_projector)):
            for p_online, p_target in zip(online.parameters(), target.parameters(), strict=True):
                p_target.mul_(momentum).add_(p_online.detach(), alpha=1.0 - momentum)
            for b_online, b_target in zip(online.buffers(), target.buffers(), strict=True):
                b_target.copy_(b_online)
