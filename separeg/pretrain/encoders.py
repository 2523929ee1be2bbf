"""Encoders and the heads built on them.

The ResNet encoders are MONAI's ``ResNetEncoder`` (2D), the backbone of MONAI's ``FlexibleUNet``: a pretrained
encoder's state dict loads 1:1 into the fine-tuning U-Net's ``encoder``. Paper, "Structure-aware Image
Separation": ResNet-50 without its final two layers (average pooling and the classifier); we pool
globally to a 2048-d feature. ``resnet18-slim`` is ResNet-18 at 3/8 width (24-48-96-192 channels), the compact
encoder of the shipped starter models (1.6 M parameters, 3.1 MB in fp16).

``swin`` is the Swin Transformer of MONAI's 2D ``SwinUNETR`` (Hatamizadeh et al. 2022), built with the same
settings as ``SwinUNETR(spatial_dims=2, feature_size=24)`` builds its ``swinViT``, so its state dict loads 1:1
there. Its five feature maps (strides 2 to 32, 24 to 384 channels) are layer-normalised, as SwinUNETR uses them.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType

import torch
from torch import nn

from separeg.runtime.errors import InputError

__all__ = ["ENCODERS", "ENCODER_DIMS", "EncoderSpec", "SwinSpec", "build_encoder", "flexunet_backbone",
           "monai_swin", "PooledEncoder", "mlp_head", "moco_mlp"]


@dataclass(frozen=True)
class SwinSpec:
    """The Swin Transformer settings shared by the pretraining encoder and ``SwinUNETR``'s ``swinViT``.

    Feature size 24 (MONAI's default) keeps it CPU-friendly; ``use_v2`` (a residual conv block per stage) stays
    off, as in the published SwinUNETR.
    """

    feature_size: int = 24
    depths: tuple[int, ...] = (2, 2, 2, 2)
    num_heads: tuple[int, ...] = (3, 6, 12, 24)
    window_size: int = 7
    patch_size: int = 2
    use_v2: bool = False

    @property
    def dim(self) -> int:
        """Channels of the deepest feature map (stride 32)."""
        return self.feature_size * 2 ** len(self.depths)

    def unetr_kwargs(self) -> dict:
        """The keyword arguments of ``SwinUNETR`` that shape its ``swinViT``."""
        return {"feature_size": self.feature_size, "depths": self.depths, "num_heads": self.num_heads,
                "window_size": self.window_size, "patch_size": self.patch_size, "use_v2": self.use_v2}


@dataclass(frozen=True)
class EncoderSpec:
    """An encoder choice: its deepest feature's channels, the U-Net decoder it gets, and how to build it."""

    dim: int
    decoder_channels: tuple[int, ...] = (256, 128, 64, 32, 16)  # FlexibleUNet's default
    widen_factor: float = 1.0
    description: str = ""
    swin: SwinSpec | None = None  # a Swin Transformer (SwinUNETR) rather than a ResNet (FlexibleUNet)


ENCODERS = {
    "resnet50": EncoderSpec(2048, description="ResNet-50 (the paper's), 23.5 M parameters"),
    "resnet18": EncoderSpec(512, description="ResNet-18, 11.2 M parameters"),
    "resnet18-slim": EncoderSpec(192, (96, 48, 24, 16, 16), 0.375,
                                 "ResNet-18 at 3/8 width, 1.6 M parameters (the shipped starter models)"),
    "swin": EncoderSpec(SwinSpec().dim, (), description="Swin Transformer of a 2D SwinUNETR (feature size 24), "
                        "1.6 M parameters; the SwinUNETR has 6.3 M", swin=SwinSpec()),
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


def _rearrange(x: torch.Tensor, pattern: str) -> torch.Tensor:
    """The axis permutations (``"b c h w -> b h w c"``) MONAI's Swin asks of einops, for when einops is absent."""
    source, target = (side.split() for side in pattern.split("->"))
    if sorted(source) != sorted(target) or len(source) != x.dim():
        raise NotImplementedError(f"only plain axis permutations are supported, not {pattern!r}")
    return x.permute(*(source.index(axis) for axis in target))


def monai_swin() -> ModuleType:
    """MONAI's ``swin_unetr`` module, made to run without einops (an optional MONAI dependency it uses only to
    move the channel axis)."""
    from monai.networks.nets import swin_unetr
    from monai.utils import optional_import

    if not optional_import("einops")[1]:
        swin_unetr.rearrange = _rearrange
    return swin_unetr


def _swin_encoder(spec: SwinSpec, in_channels: int) -> nn.Module:
    """``SwinTransformer`` exactly as ``SwinUNETR(spatial_dims=2, **spec.unetr_kwargs())`` builds its ``swinViT``."""
    swin = monai_swin()
    return swin.SwinTransformer(
        in_chans=in_channels, embed_dim=spec.feature_size, window_size=(spec.window_size,) * 2,
        patch_size=(spec.patch_size,) * 2, depths=spec.depths, num_heads=spec.num_heads, mlp_ratio=4.0,
        qkv_bias=True, drop_rate=0.0, attn_drop_rate=0.0, drop_path_rate=0.0, norm_layer=nn.LayerNorm,
        patch_norm=False, use_checkpoint=False, spatial_dims=2, downsample=swin.MERGING_MODE["merging"],
        use_v2=spec.use_v2)


def build_encoder(name: str, in_channels: int = 1) -> nn.Module:
    """A 2D encoder returning its five feature maps ``(B, C_i, H / 2^i, W / 2^i)``, deepest last.

    ResNets are MONAI's ``ResNetEncoder``; ``swin`` is MONAI's ``SwinTransformer`` (``H``, ``W`` multiples of 32).

    Raises:
        InputError: unknown name, listing the valid ones.
    """
    if name not in ENCODERS:
        raise InputError(f"unknown encoder {name!r}; choose one of {', '.join(ENCODERS)}")
    if in_channels < 1:
        raise InputError(f"in_channels must be at least 1, got {in_channels}")
    if ENCODERS[name].swin is not None:
        return _swin_encoder(ENCODERS[name].swin, in_channels)
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


def moco_mlp(in_dim: int, hidden_dim: int, out_dim: int, layers: int, last_bn: bool) -> nn.Sequential:
    """MoCo v3's MLP (Chen, Xie & He 2021): bias-free linear layers, BN + ReLU between them and, with
    ``last_bn``, a BN without affine parameters after the last (the projector's, following SimCLR)."""
    modules: list[nn.Module] = []
    for i in range(layers):
        last = i == layers - 1
        dim = out_dim if last else hidden_dim
        modules.append(nn.Linear(in_dim if i == 0 else hidden_dim, dim, bias=False))
        if not last:
            modules += [nn.BatchNorm1d(dim), nn.ReLU(inplace=True)]
        elif last_bn:
            modules.append(nn.BatchNorm1d(dim, affine=False))
    return nn.Sequential(*modules)
