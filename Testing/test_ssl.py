from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from conftest import fixed_batch_losses, region_crops
from separeg.pretrain.encoders import ENCODER_DIMS, PooledEncoder, build_encoder
from separeg.pretrain.ssl import METHODS, SSLModel, channel_kl, negative_cosine, nt_xent
from separeg.runtime.errors import InputError
from separeg.segment.network import build_unet, unet_encoder


@pytest.fixture(scope="module")
def fixed_batch(pt1_hu: np.ndarray) -> torch.Tensor:
    """16 real region crops of OpenKBP pt_1 at 32 x 32."""
    return region_crops(pt1_hu[50:70], 16, 32)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_each_method_learns_on_a_fixed_batch(method: str, fixed_batch: torch.Tensor) -> None:
    torch.manual_seed(0)
    losses = fixed_batch_losses(SSLModel(method, "resnet18", hidden_dim=256, out_dim=64), fixed_batch, 12)
    assert all(math.isfinite(v) for v in losses)
    assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.01, losses


def test_simsiam_targets_carry_no_gradient(fixed_batch: torch.Tensor) -> None:
    model = SSLModel("simsiam", "resnet18", hidden_dim=64, out_dim=32)
    out = model(fixed_batch, fixed_batch)
    assert set(out) == {"z1", "z2", "p1", "p2"} and out["z1"].shape == (16, 32)
    assert "t1" not in out and not hasattr(model, "target_backbone")


def test_byol_target_follows_online_by_ema() -> None:
    model = SSLModel("byol", "resnet18", hidden_dim=32, out_dim=16, momentum=0.9)
    online = next(model.backbone.parameters())
    target = next(model.target_backbone.parameters())
    assert not target.requires_grad and torch.equal(online, target)
    with torch.no_grad():
        online.add_(1.0)
    before = target.clone()
    model.after_step(0.0)  # momentum 0.9 at the start of training
    torch.testing.assert_close(target, 0.9 * before + 0.1 * online)


def test_loss_functions_on_known_cases() -> None:
    z = torch.nn.functional.normalize(torch.randn(8, 16), dim=1)
    assert negative_cosine(z, z).item() == pytest.approx(-1.0)
    assert negative_cosine(z, -z).item() == pytest.approx(1.0)
    # SimCLR: orthogonal, identical pairs are easy; the loss approaches 0 as the temperature falls.
    eye = torch.eye(8)
    assert nt_xent(eye, eye, 0.05).item() < 1e-6
    assert nt_xent(torch.ones(4, 3), torch.ones(4, 3), 1.0).item() == pytest.approx(math.log(7), rel=1e-5)
    features = torch.randn(4, 32)
    assert channel_kl(features, features, 0.1).item() == pytest.approx(0.0, abs=1e-6)
    assert channel_kl(features, torch.randn(4, 32), 0.1).item() > 0


@pytest.mark.parametrize("name", sorted(ENCODER_DIMS))
def test_encoder_weights_load_into_the_unet_exactly(name: str) -> None:
    pooled = PooledEncoder(name)
    assert pooled(torch.zeros(2, 1, 64, 64)).shape == (2, ENCODER_DIMS[name])
    unet = build_unet(name, 8)
    result = unet_encoder(unet).load_state_dict(pooled.encoder.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys


def test_unknown_names_list_the_valid_ones() -> None:
    with pytest.raises(InputError, match="resnet50, resnet18, resnet18-slim"):
        build_encoder("vgg16")
    with pytest.raises(InputError, match="simsiam"):
        SSLModel("moco", "resnet18")


def test_dense_pairs_pixels_that_show_the_same_place() -> None:
    from separeg.pretrain.augment import AugmentConfig, augment_with_geometry
    from separeg.pretrain.ssl.dense import DenseSSLModel, corresponding_points

    # A horizontal flip: pixel column j of one view is column w-1-j of the other.
    identity = torch.tensor([[[1.0, 0, 0], [0, 1, 0]]])
    flipped = torch.tensor([[[-1.0, 0, 0], [0, 1, 0]]])
    points = corresponding_points(identity, flipped, 4, 4)
    grid = torch.nn.functional.affine_grid(identity, [1, 1, 4, 4], align_corners=False)
    torch.testing.assert_close(points[..., 0], -grid[..., 0])
    torch.testing.assert_close(points[..., 1], grid[..., 1])
    # A zoomed crop: its pixels land inside the full view; the full view's border falls outside the crop.
    crop = torch.tensor([[[0.5, 0, 0.25], [0, 0.5, 0]]])
    assert (corresponding_points(crop, identity, 8, 8).abs() < 1).all()
    assert not (corresponding_points(identity, crop, 8, 8).abs() < 1).all()
    # Batch, height and width all differ: each sample uses its own matrices.
    both = corresponding_points(torch.cat([identity, crop, flipped]), torch.cat([flipped, identity, identity]), 5, 7)
    assert both.shape == (3, 5, 7, 2)
    torch.testing.assert_close(both[1], corresponding_points(crop, identity, 5, 7)[0])
    torch.testing.assert_close(both[2, ..., 0], -corresponding_points(identity, identity, 5, 7)[0, ..., 0])
    # Maps that agree at corresponding places give the minimal loss.
    x = torch.rand(2, 1, 64, 64)
    views, theta = augment_with_geometry(torch.cat([x, x]), AugmentConfig(), torch.Generator().manual_seed(0))
    model = DenseSSLModel("resnet18", hidden_dim=64, out_dim=32)
    out = model(views[:2], views[2:])
    loss = model.loss(out, theta[:2], theta[2:])
    assert torch.isfinite(loss) and -1.0 <= loss.item() <= 1.0
    same = {"z1": out["z1"], "z2": out["z1"], "p1": out["z1"], "p2": out["z1"]}
    assert model.loss(same, theta[:2], theta[:2]).item() == pytest.approx(-1.0, abs=1e-4)
