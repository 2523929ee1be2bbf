"""Encoders and the heads built on them.

The ResNet encoders are MONAI's ``ResNetEncoder`` (2D), the backbone of MONAI's ``FlexibleUNet``: a pretrained
encoder's state dict loads 1:1 into the fine-tuning U-Net's ``encoder``. Paper, "Structure-aware Image
Separation": ResNet-50 without its final two layers (average pooling and the classifier); we pool
globally to a 2048-d feature. ``resnet18-slim`` is ResNet-18 at 3/8 width (24-48-96-192 channels), the compact
encoder of the shipped starter models (1.6 M parameters, 3.1 MB in fp16).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .errors import InputError

__all__ = ["ENCODERS", "ENCODER_DIMS", "EncoderSpec", "build_encoder", "flexunet_backbone", "PooledEncoder",
           "mlp_head"]


@dataclass(frozen=True)
class EncoderSpec:
    """An encoder choice: its deepest feature's channels, the U-Net decoder it gets, and how to build it."""

    dim: int
    decoder_channels: tuple[int, ...] = (256, 128, 64, 32, 16)  # FlexibleUNet's default
    widen_factor: float = 1.0
    description: str = ""


ENCODERS = {
    "resnet50": EncoderSpec(2048, description="ResNet-50 (the paper's), 23.5 M parameters"),
    "resnet18": EncoderSpec(512, description="ResNet-18, 11.2 M parameters"),
    "resnet18-slim": EncoderSpec(192, (96, 48, 24, 16, 16), 0.375,
                                 "ResNet-18 at 3/8 width, 1.6 M parameters (the shipped starter models)"),
}
# Channels of the last feature map of each supported encoder.
ENCODER_DIMS = {name: spec.dim for name, spec in ENCODERS.items()}


def _slim_resnet_encoder() -> type:
    """MONAI's ``ResNetEncoder`` at reduced width, registered as a ``FlexibleUNet`` backbone (imported lazily)."""
    from monai.networks.nets.flexible_unet import FLEXUNET_BACKBONE
    from monai.networks.nets.resnet import ResNet, ResNetBlock, ResNetEncoder, get_inplanes

    if "resnet18-slim" in FLEXUNET_BACKBONE.register_dict:
        return FLEXUNET_BACKBONE.register_dict["resnet18-slim"]["type"]
    spec = ENCODERS["resnet18-slim"]

    class SlimResNetEncoder(ResNetEncoder):
        backbone_names = ["resnet18-slim"]

        def __init__(self, model_name: str = "resnet18-slim", pretrained: bool = False, spatial_dims: int = 2,
                     in_channels: int = 1) -> None:
            # ResNetFeatures.__init__ has no width; build the ResNet directly, with the same layers and stride.
            ResNet.__init__(self, block=ResNetBlock, layers=[2, 2, 2, 2], block_inplanes=get_inplanes(),
                            spatial_dims=spatial_dims, n_input_channels=in_channels, conv1_t_stride=2,
                            shortcut_type="A", feed_forward=False, bias_downsample=True,
                            widen_factor=spec.widen_factor)

        @classmethod
        def get_encoder_parameters(cls) -> list[dict]:
            return [{"model_name": "resnet18-slim", "pretrained": False, "spatial_dims": 2, "in_channels": 1}]

        @classmethod
        def num_channels_per_output(cls) -> list[tuple[int, ...]]:
            base = [int(c * spec.widen_factor) for c in get_inplanes()]
            return [(base[0], *base)]

        @classmethod
        def num_outputs(cls) -> list[int]:
            return [5]

    FLEXUNET_BACKBONE.register_class(SlimResNetEncoder)
    return SlimResNetEncoder


def flexunet_backbone(name: str) -> str:
    """``name``, registered as a ``FlexibleUNet`` backbone first when MONAI does not know it."""
    if name == "resnet18-slim":
        _slim_resnet_encoder()
    return name


def build_encoder(name: str, in_channels: int = 1) -> nn.Module:
    """A 2D ResNet encoder (MONAI ``ResNetEncoder``) returning its five feature maps, deepest last.

    Raises:
        InputError: unknown name, listing the valid ones.
    """
    if name not in ENCODERS:
        raise InputError(f"unknown encoder {name!r}; choose one of {', '.join(ENCODERS)}")
    if in_channels < 1:
        raise InputError(f"in_channels must be at least 1, got {in_channels}")
    if name == "resnet18-slim":
        return _slim_resnet_encoder()(in_channels=in_channels)
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
