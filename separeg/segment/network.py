"""The segmentation network and the grid it sees, shared by fine-tuning and contouring.

The network is MONAI's 2D ``FlexibleUNet`` whose encoder is the pretraining encoder (DESIGN §2.9), or for the
``swin`` encoder MONAI's 2D ``SwinUNETR`` whose ``swinViT`` is.
Volumes are turned to one canonical orientation (LPS: +x = patient left) before the network sees them,
so laterality follows the direction matrix, not the array index (DESIGN §7); axial slices are resampled
in plane to the model's spacing and zero-padded to a multiple of 32. Predictions go back the same way,
onto the input's exact grid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from separeg.io.channels import Channel, channels_from_metadata, normalise_channels
from separeg.io.volumes import CANONICAL_ORIENTATION, to_canonical
from separeg.pretrain.encoders import ENCODERS, EncoderSpec, flexunet_backbone, monai_swin
from separeg.runtime.errors import InputError

if TYPE_CHECKING:
    import SimpleITK as sitk

__all__ = ["CANONICAL_ORIENTATION", "GridSpec", "build_unet", "unet_architecture", "unet_encoder", "decoder_blocks",
           "output_layer", "transfer_segmentation_weights", "load_encoder_weights", "load_segmentation_model",
           "to_canonical", "from_canonical", "to_model_grid", "model_input", "from_model_grid", "neighbour_index",
           "with_context"]



@dataclass(frozen=True)
class GridSpec:
    """What the network expects: input channels and their normalisation, in-plane spacing (mm), size multiple.

    ``channels`` empty means one CT channel with the HU window ``hu_window`` scaled to [0, 1] (every bundle
    written before multichannel inputs).
    """

    hu_window: tuple[float, float] = (-1000.0, 1000.0)
    spacing_xy: tuple[float, float] = (1.0, 1.0)
    multiple: int = 32
    channels: tuple[Channel, ...] = ()
    context_slices: int = 0  # 2.5D: k neighbouring slices on each side join each channel (0: plain 2D)

    @property
    def input_channels(self) -> tuple[Channel, ...]:
        return self.channels or (Channel("CT", window=tuple(self.hu_window)),)

    @property
    def network_channels(self) -> int:
        """Input channels of the network: each channel at the slices ``-k..k`` around the one segmented."""
        return len(self.input_channels) * (2 * self.context_slices + 1)

    def to_dict(self) -> dict:
        return {"hu_window": list(self.hu_window), "spacing_xy": list(self.spacing_xy), "multiple": self.multiple,
                "channels": [c.to_dict() for c in self.input_channels], "context_slices": self.context_slices}

    @classmethod
    def from_dict(cls, data: dict) -> GridSpec:
        hu_window = tuple(data.get("hu_window", (-1000.0, 1000.0)))
        return cls(hu_window, tuple(data["spacing_xy"]), int(data.get("multiple", 32)), channels_from_metadata(data),
                   int(data.get("context_slices", 0)))


def _encoder_spec(encoder: str) -> EncoderSpec:
    if encoder not in ENCODERS:
        raise InputError(f"unknown encoder {encoder!r}; choose one of {', '.join(ENCODERS)}")
    return ENCODERS[encoder]


def build_unet(encoder: str, out_channels: int, in_channels: int = 1) -> nn.Module:
    """The 2D segmentation network of ``encoder``; ``out_channels`` = organs + background.

    ResNets get a ``FlexibleUNet``, ``swin`` a ``SwinUNETR`` (inputs: multiples of 32).
    """
    spec = _encoder_spec(encoder)
    if spec.swin is not None:
        return monai_swin().SwinUNETR(in_channels=in_channels, out_channels=out_channels, spatial_dims=2,
                                      **spec.swin.unetr_kwargs())
    from monai.networks.nets import FlexibleUNet

    return FlexibleUNet(in_channels=in_channels, out_channels=out_channels, backbone=flexunet_backbone(encoder),
                        pretrained=False,
                        spatial_dims=2, decoder_channels=spec.decoder_channels)


def unet_architecture(encoder: str, in_channels: int, out_channels: int) -> dict:
    """The ``architecture`` of a segmentation bundle; :func:`build_unet` rebuilds the network from its
    ``backbone``, ``out_channels`` and ``in_channels``."""
    spec = _encoder_spec(encoder)
    if spec.swin is None:
        return {"network": "monai.networks.nets.FlexibleUNet", "backbone": encoder, "spatial_dims": 2,
                "in_channels": in_channels, "out_channels": out_channels}
    return {"network": "monai.networks.nets.SwinUNETR", "backbone": encoder, "spatial_dims": 2,
            "in_channels": in_channels, "out_channels": out_channels, "feature_size": spec.swin.feature_size}


def unet_encoder(unet: nn.Module) -> nn.Module:
    """The part of a :func:`build_unet` network that a pretrained encoder initialises."""
    return unet.swinViT if hasattr(unet, "swinViT") else unet.encoder


def decoder_blocks(unet: nn.Module) -> list[nn.Module]:
    """The decoder blocks of a :func:`build_unet` network, coarsest first; the last one is the full-resolution
    block whose output the final 1x1 convolution classifies."""
    if hasattr(unet, "swinViT"):
        return [unet.decoder5, unet.decoder4, unet.decoder3, unet.decoder2, unet.decoder1]
    return list(unet.decoder.blocks)


def load_segmentation_model(bundle, device: torch.device | str = "cpu") -> nn.Module:
    """The U-Net of a segmentation bundle with its weights, on ``device``, in eval mode: what Auto-contour runs and
    what fine-tuning continues from ("Update model").

    Args:
        bundle: a :class:`separeg.runtime.bundle.Bundle` of kind ``segmentation`` (its ``architecture`` names the
            backbone, output and input channels).
        device: where the network goes.
    """
    arch = bundle.architecture
    if "members" in arch:  # one bundle holding an ensemble (separeg.segment.ensemble.pack_ensemble)
        from separeg.segment.ensemble import ModelEnsemble

        model = ModelEnsemble([build_unet(m["backbone"], m["out_channels"], m.get("in_channels", 1))
                               for m in arch["members"]])
    else:
        model = build_unet(arch["backbone"], arch["out_channels"], arch.get("in_channels", 1))
    model.load_state_dict(bundle.state_dict)
    return model.to(device).eval()


def output_layer(unet: nn.Module) -> nn.Module:
    """The final convolution of a :func:`build_unet` network: one output channel per organ + background."""
    return unet.out if hasattr(unet, "swinViT") else unet.segmentation_head


def transfer_segmentation_weights(unet: nn.Module, source: dict[str, torch.Tensor],
                                  organ_map: tuple[int | None, ...]) -> None:
    """Initialise ``unet`` from a segmentation model's weights ``source`` (same backbone and inputs) trained on
    other organs: every weight outside the output layer is copied; output channel ``c`` takes the model's channel
    ``organ_map[c]`` (the same organ) or keeps its fresh initialisation where that is None.

    Raises:
        InputError: the model is another architecture (its weights outside the output layer do not fit).
    """
    layer = output_layer(unet)
    prefix = next(name for name, child in unet.named_children() if child is layer) + "."
    body = {k: v for k, v in source.items() if not k.startswith(prefix)}
    result = unet.load_state_dict(body, strict=False)
    unexpected = [k for k in result.missing_keys if not k.startswith(prefix)] + list(result.unexpected_keys)
    if unexpected:
        raise InputError(f"the segmentation model's weights do not fit this network ({unexpected[:2]} ...); start "
                         "from a model with the same encoder and input channels")
    with torch.no_grad():
        for name, target in layer.named_parameters():
            weights = source[prefix + name]
            for channel, origin in enumerate(organ_map):
                if origin is not None:
                    target[channel] = weights[origin]


def load_encoder_weights(unet: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Initialise the U-Net's encoder from a pretrained encoder; every key must match (STYLE §9).

    Raises:
        InputError: missing or unexpected keys, i.e. the encoder bundle is for another architecture.
    """
    result = unet_encoder(unet).load_state_dict(state_dict, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise InputError(f"the encoder weights do not fit this U-Net ({len(result.missing_keys)} missing, e.g. "
                         f"{result.missing_keys[:2]}; {len(result.unexpected_keys)} unexpected, e.g. "
                         f"{result.unexpected_keys[:2]}); use an encoder bundle made with the same --encoder")


def _orientation(image: sitk.Image) -> str:
    import SimpleITK as sitk

    return sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(image.GetDirection())


def from_canonical(canonical: sitk.Image, reference: sitk.Image) -> sitk.Image:
    """Undo :func:`to_canonical`: back to ``reference``'s axis order, with its exact geometry."""
    import SimpleITK as sitk

    image = sitk.DICOMOrient(canonical, _orientation(reference))
    image.CopyInformation(reference)  # identical up to float rounding; make it exact
    return image


def _model_size(height: int, width: int, spacing_xy: tuple[float, float], spec: GridSpec) -> tuple[int, int]:
    sx, sy = spacing_xy
    return max(1, round(height * sy / spec.spacing_xy[1])), max(1, round(width * sx / spec.spacing_xy[0]))


def to_model_grid(array: np.ndarray | torch.Tensor, spacing_xy: tuple[float, float], spec: GridSpec, *,
                  labels: bool = False, device: torch.device | str = "cpu") -> torch.Tensor:
    """Canonical slices -> ``(Z, C, H', W')`` on the model grid (zero-padded to ``spec.multiple``).

    ``array`` is ``(Z, H, W)`` raw CT (windowed here with the spec's single CT channel to [0, 1]), or
    ``(Z, C, H, W)`` already normalised input (:func:`separeg.io.channels.normalise_channels`); both are resampled
    bilinearly. Label maps (``labels=True``, ``(Z, H, W)``) are resampled by nearest neighbour and keep their values.
    """
    x = torch.as_tensor(np.asarray(array) if not isinstance(array, torch.Tensor) else array, device=device)
    if labels:
        x = x.to(torch.float32)[:, None]
    elif x.dim() == 3:
        channel = spec.input_channels[0]
        if len(spec.input_channels) != 1 or channel.normalisation != "window":
            raise InputError(f"the model takes {len(spec.input_channels)} normalised channel(s); give a (Z, C, H, W) "
                             "array from normalise_channels, not raw intensities")
        lo, hi = channel.window
        x = ((x.to(torch.float32).clamp(lo, hi) - lo) / (hi - lo))[:, None]
    else:
        x = x.to(torch.float32)
    height, width = x.shape[-2:]
    size = _model_size(height, width, spacing_xy, spec)
    if size != (height, width):
        x = F.interpolate(x, size=size, mode="nearest-exact" if labels else "bilinear",
                          align_corners=None if labels else False)
    pad_h = math.ceil(size[0] / spec.multiple) * spec.multiple - size[0]
    pad_w = math.ceil(size[1] / spec.multiple) * spec.multiple - size[1]
    x = F.pad(x, (0, pad_w, 0, pad_h))
    return x.to(torch.int64) if labels else x


def model_input(arrays: list[np.ndarray], spacing_xy: tuple[float, float], spec: GridSpec, *,
                device: torch.device | str = "cpu", context: bool = True) -> torch.Tensor:
    """A case's canonical ``(Z, H, W)`` channel arrays -> the network's normalised input on the model grid:
    ``(Z, C * (2k + 1), H', W')`` with the spec's ``k`` context slices (:func:`with_context`), or ``(Z, C, H', W')``
    with ``context=False`` (fine-tuning gathers neighbours per batch, see :func:`neighbour_index`).

    One windowed CT channel is windowed on ``device`` (fast for large CTs on a GPU); otherwise every channel is
    normalised per scan first (:func:`separeg.io.channels.normalise_channels`).

    Raises:
        InputError: a number of arrays other than the spec's channels (which it names).
    """
    channels = spec.input_channels
    if len(arrays) == 1 and len(channels) == 1 and channels[0].normalisation == "window":
        x = to_model_grid(arrays[0], spacing_xy, spec, device=device)
    else:
        x = to_model_grid(normalise_channels(arrays, channels), spacing_xy, spec, device=device)
    return with_context(x, spec.context_slices) if context else x


def neighbour_index(n_slices: int, k: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """``(Z, 2k + 1)`` indices of the slices ``z-k .. z+k`` of each slice ``z``, clamped at the volume's ends
    (the end slice stands in for the missing neighbours, as nnU-Net's 2.5D variants pad by replication)."""
    offsets = torch.arange(-k, k + 1, device=device)
    return (torch.arange(n_slices, device=device)[:, None] + offsets).clamp(0, max(n_slices - 1, 0))


def with_context(x: torch.Tensor, k: int) -> torch.Tensor:
    """``(Z, C, H, W)`` slices of one volume -> ``(Z, C * (2k + 1), H, W)``: channel ``c`` of slice ``z + j`` at
    ``c * (2k + 1) + j + k`` (channel-major, neighbours in order; :meth:`GridSpec.network_channels`)."""
    if k == 0:
        return x
    stacked = x[neighbour_index(len(x), k, x.device)]  # (Z, 2k+1, C, H, W)
    return stacked.transpose(1, 2).flatten(1, 2)


def from_model_grid(logits: torch.Tensor, shape_hw: tuple[int, int], spacing_xy: tuple[float, float],
                    spec: GridSpec) -> torch.Tensor:
    """``(Z, C, H'', W'')`` model-grid logits -> ``(Z, C, H, W)`` on the canonical input grid (bilinear)."""
    size = _model_size(*shape_hw, spacing_xy, spec)
    logits = logits[..., : size[0], : size[1]]
    if size != tuple(shape_hw):
        logits = F.interpolate(logits, size=tuple(shape_hw), mode="bilinear", align_corners=False)
    return logits
