"""The Swin encoder (MONAI SwinUNETR's ``swinViT``) and MoCo v3 pretraining."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import fixed_batch_losses, region_crops
from separeg.pretrain.config import PretrainConfig, PretrainJob
from separeg.pretrain.encoders import ENCODER_DIMS, PooledEncoder, build_encoder
from separeg.pretrain.ssl import SSLModel, info_nce
from separeg.pretrain.stages import run_pretrain
from separeg.runtime.bundle import load_bundle
from separeg.runtime.errors import InputError
from separeg.segment.finetune.plseg import DeepSupervision
from separeg.segment.network import build_unet, load_encoder_weights, unet_architecture, unet_encoder

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def crops64(pt1_hu: np.ndarray) -> torch.Tensor:
    """8 real region crops of OpenKBP pt_1 at 64 x 64."""
    return region_crops(pt1_hu[55:65], 8, 64)


@pytest.mark.parametrize("in_channels", [1, 3])
def test_swin_encoder_returns_five_maps_deepest_last(in_channels: int) -> None:
    encoder = build_encoder("swin", in_channels)
    maps = encoder(torch.zeros(2, in_channels, 64, 96))
    assert [tuple(m.shape) for m in maps] == [(2, 24 * 2**i, 32 // 2**i, 48 // 2**i) for i in range(5)]
    assert ENCODER_DIMS["swin"] == maps[-1].shape[1] == 384
    pooled = PooledEncoder("swin", in_channels)
    assert pooled(torch.rand(2, in_channels, 64, 64)).shape == (2, 384)
    assert sum(p.numel() for p in encoder.parameters()) == pytest.approx(1.59e6, rel=0.01)


def test_swin_encoder_weights_load_into_swinunetr_exactly() -> None:
    from monai.networks.nets import SwinUNETR

    torch.manual_seed(0)
    pooled = PooledEncoder("swin")
    unet = build_unet("swin", 8)
    assert isinstance(unet, SwinUNETR) and sum(p.numel() for p in unet.parameters()) == pytest.approx(6.30e6, rel=0.01)
    load_encoder_weights(unet, pooled.encoder.state_dict())
    for key, value in pooled.encoder.state_dict().items():
        assert torch.equal(unet_encoder(unet).state_dict()[key], value), key
    # The encoder is configured as MONAI's own SwinUNETR builds its swinViT.
    monai_unet = SwinUNETR(in_channels=1, out_channels=8, spatial_dims=2, feature_size=24)
    result = monai_unet.swinViT.load_state_dict(pooled.encoder.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    with pytest.raises(InputError, match="do not fit"):
        load_encoder_weights(unet, PooledEncoder("resnet18-slim").encoder.state_dict())
    with pytest.raises(InputError, match="same --encoder"):
        load_encoder_weights(build_unet("resnet18-slim", 8), pooled.encoder.state_dict())


def test_unet_architecture_rebuilds_the_network() -> None:
    assert unet_architecture("resnet18", 1, 8) == {"network": "monai.networks.nets.FlexibleUNet",
                                                   "backbone": "resnet18", "spatial_dims": 2, "in_channels": 1,
                                                   "out_channels": 8}
    arch = unet_architecture("swin", 1, 5)
    assert arch["network"] == "monai.networks.nets.SwinUNETR" and arch["feature_size"] == 24
    unet = build_unet(arch["backbone"], arch["out_channels"], arch.get("in_channels", 1))
    assert unet(torch.zeros(1, 1, 64, 96)).shape == (1, 5, 64, 96)
    with pytest.raises(InputError, match="resnet50, resnet18, resnet18-slim, swin"):
        unet_architecture("vit", 1, 5)


def test_deep_supervision_taps_swinunetr_decoder() -> None:
    torch.manual_seed(0)
    unet = build_unet("swin", 4)
    model = DeepSupervision(unet, 4)
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        out = model(x)
        plain = unet(x)
    assert [tuple(t.shape) for t in out.logits] == [(2, 4, 64, 64), (2, 4, 32, 32), (2, 4, 16, 16), (2, 4, 8, 8)]
    torch.testing.assert_close(out.logits[0], plain)
    assert out.features.shape == (2, 24, 64, 64)


def test_info_nce_on_known_cases() -> None:
    eye = torch.eye(8)
    assert info_nce(eye, eye, 0.05).item() < 1e-6  # orthogonal, identical pairs: nothing to learn
    # All keys alike: chance level, log(B), scaled by 2 tau.
    assert info_nce(torch.ones(4, 3), torch.ones(4, 3), 0.2).item() == pytest.approx(0.4 * math.log(4), rel=1e-5)


@pytest.mark.parametrize("encoder", ["swin"])  # the ResNets: test_ssl.py's test over every method
def test_mocov3_learns_on_a_fixed_batch(encoder: str, crops64: torch.Tensor) -> None:
    torch.manual_seed(0)
    losses = fixed_batch_losses(SSLModel("mocov3", encoder, hidden_dim=256, out_dim=64), crops64, 20)
    assert all(math.isfinite(v) for v in losses)
    assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.01, losses


def test_mocov3_keys_carry_no_gradient_and_follow_by_ema(crops64: torch.Tensor) -> None:
    torch.manual_seed(0)
    model = SSLModel("mocov3", "resnet18-slim", hidden_dim=32, out_dim=16, momentum=0.9)
    assert model.temperature == 0.2 and SSLModel("mocov3", "resnet18-slim", temperature=0.1).temperature == 0.1
    assert sum(isinstance(m, torch.nn.Linear) for m in model.projector) == 3
    assert sum(isinstance(m, torch.nn.Linear) for m in model.predictor) == 2
    out = model(crops64, crops64.flip(3))
    assert set(out) == {"z1", "z2", "p1", "p2", "t1", "t2"} and not out["t1"].requires_grad
    model.loss(out).backward()
    targets = [*model.target_backbone.parameters(), *model.target_projector.parameters()]
    assert all(not p.requires_grad and p.grad is None for p in targets)
    online, target = next(model.backbone.parameters()), next(model.target_backbone.parameters())
    with torch.no_grad():
        online.add_(1.0)
    before = target.clone()
    model.after_step(0.0)  # momentum 0.9 at the start of training
    torch.testing.assert_close(target, 0.9 * before + 0.1 * online)


def test_pretrain_mocov3_with_swin_exports_an_encoder_for_swinunetr(tmp_path: Path) -> None:
    archive = tmp_path / "archive"
    archive.mkdir()
    shutil.copy(REPO / "Resources" / "SampleData" / "pt_1_ct.nii.gz", archive / "pt_1_ct.nii.gz")
    config = PretrainConfig(method="mocov3", encoder="swin", iterations=4, batch_size=4, crop_size=64, iid=False)
    path = run_pretrain(PretrainJob(archive=archive, run_dir=tmp_path / "run", config=config, device="cpu"))
    bundle = load_bundle(path, expected_kind="encoder")
    assert bundle.architecture["encoder"] == "swin"
    load_encoder_weights(build_unet("swin", 3), bundle.state_dict)
