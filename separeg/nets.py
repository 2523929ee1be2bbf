"""Encoders and the heads built on them.

The encoder is MONAI's ``ResNetEncoder`` (2D), the backbone of MONAI's ``FlexibleUNet``: a pretrained
encoder's state dict loads 1:1 into the fine-tuning U-Net's ``encoder``. Paper, "Structure-aware Image
Separation": ResNet-50 without its final two layers (average pooling and the classifier); we pool
globally to a 2048-d feature.
"""

from __future__ import annotations

import torch
from torch import nn

from .errors import InputError

__all__ = ["ENCODER_DIMS", "build_encoder", "PooledEncoder", "mlp_head"]

# Channels of the last feature map of each supported encoder.
ENCODER_DIMS = {"resnet18": 512, "resnet50": 2048}


def build_encoder(name: str, in_channels: int = 1) -> nn.Module:
    """A 2D ResNet encoder (MONAI ``ResNetEncoder``) returning its five feature maps, deepest last.

    Raises:
        InputError: unknown name, listing the valid ones.
    """
    if name not in ENCODER_DIMS:
        raise InputError(f"unknown encoder {name!r}; choose one of {', '.join(ENCODER_DIMS)}")
    if in_channels < 1:
        raise InputError(f"in_channels must be at least 1, got {in_channels}")
    from monai.networks.nets.resnet import ResNetEncoder

    return ResNetEncoder(name, pretrained=False, spatial_dims=2, in_channels=in_channels)


class PooledEncoder(nn.Module):
    """Encoder + global average pooling: ``(B, C, H, W) -> (B, D)``. ``self.encoder`` is the U-Net's encoder."""

    def __init__(self, name: str, in_channels: int = 1) -> None:
        super().__init__()
        self.name = name
        self.dim = ENCODER_DIMS.get(name, 0)
        self.encoder = build_encoder(name, in_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(nn.functional.adaptive_avg_pool2d(self.encoder(x)[-1], 1), 1)


def mlp_head(in_dim: int, hidden_dim: int = 4096, out_dim: int = 256) -> nn.Sequential:
    """Two linear layers with BatchNorm + ReLU between them (paper: projector and predictor, hidden 4096, out 256)."""
    return nn.Sequential(
        nn.Linear(in_dim, hidden_dim, bias=False),
        nn.BatchNorm1d(hidden_dim),
        nn.ReLU(inplace=True),
        nn.Linear(hidden_dim, out_dim),
    )
