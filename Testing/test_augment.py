from __future__ import annotations

import time

import pytest
import torch

from separeg.pretrain.augment import AugmentConfig, TwoViews, _crop_flip_theta, _draw, _gaussian_kernels, _warp, augment
from separeg.runtime.errors import InputError

# Only the crop (scale and ratio fixed at 1 on a square input): the identity.
IDENTITY = AugmentConfig(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip_prob=0.0, jitter_prob=0.0, blur_prob=0.0)
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def seeded(seed: int, device: str = "cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def noise(batch: int = 8, size: int = 32, seed: int = 0, channels: int = 1) -> torch.Tensor:
    return torch.rand(batch, channels, size, size, generator=seeded(seed))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_shape_dtype_device(device: str, dtype: torch.dtype) -> None:
    x = noise(batch=4, channels=2).to(device, dtype)
    y = augment(x, AugmentConfig(), seeded(1, device))
    assert y.shape == x.shape and y.dtype == dtype and y.device == x.device
    assert torch.isfinite(y.float()).all()
    a, b = TwoViews()(x, seeded(2, device))
    assert a.shape == b.shape == x.shape and a.dtype == b.dtype == dtype
    assert not torch.equal(a, b)


def test_non_square_and_empty_batches() -> None:
    x = torch.rand(3, 1, 24, 40, generator=seeded(0))
    assert augment(x, AugmentConfig(), seeded(1)).shape == (3, 1, 24, 40)
    assert augment(x[:0], AugmentConfig(), seeded(1)).shape == (0, 1, 24, 40)


@pytest.mark.parametrize("device", DEVICES)
def test_same_seed_same_views_other_seed_other_views(device: str) -> None:
    x = noise(batch=16).to(device)
    config = AugmentConfig(blur_prob=0.5, jitter_prob=0.8)
    first = augment(x, config, seeded(7, device))
    assert torch.equal(first, augment(x, config, seeded(7, device)))
    assert not torch.equal(first, augment(x, config, seeded(8, device)))
    # A generator that moved on gives new views; restoring its state gives the old ones again (resume).
    g = seeded(7, device)
    state = g.get_state()
    assert torch.equal(augment(x, config, g), first)
    assert not torch.equal(augment(x, config, g), first)
    g.set_state(state)
    assert torch.equal(augment(x, config, g), first)
    views = TwoViews(config)(x, seeded(3, device))
    again = TwoViews(config)(x, seeded(3, device))
    assert torch.equal(views[0], again[0]) and torch.equal(views[1], again[1])


def test_global_rng_when_no_generator() -> None:
    x = noise()
    torch.manual_seed(5)
    first = augment(x, AugmentConfig())
    torch.manual_seed(5)
    assert torch.equal(first, augment(x, AugmentConfig()))


def test_identity_config_returns_input() -> None:
    x = noise(batch=4, channels=3)
    assert (augment(x, IDENTITY, seeded(0)) - x).abs().max() < 1e-5
    # Non-square input: the ratio that fills it is width / height.
    wide = torch.rand(2, 1, 24, 40, generator=seeded(1))
    config = AugmentConfig(crop_scale=(1.0, 1.0), crop_ratio=(40 / 24, 40 / 24), flip_prob=0.0, jitter_prob=0.0,
                           blur_prob=0.0)
    assert (augment(wide, config, seeded(0)) - wide).abs().max() < 1e-5


def test_flips() -> None:
    x = noise(batch=4)
    both = AugmentConfig(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip_prob=1.0, jitter_prob=0.0, blur_prob=0.0)
    assert (augment(x, both, seeded(0)) - x.flip(-1, -2)).abs().max() < 1e-5
    # One axis at a time through the warp the crop uses.
    h_flip = torch.tensor([[-1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]).expand(4, 2, 3)
    v_flip = torch.tensor([[1.0, 0.0, 0.0], [0.0, -1.0, 0.0]]).expand(4, 2, 3)
    assert (_warp(x, h_flip) - x.flip(-1)).abs().max() < 1e-5
    assert (_warp(x, v_flip) - x.flip(-2)).abs().max() < 1e-5
    # flip_prob 0.5: each of the four flip combinations turns up, horizontal and vertical drawn separately.
    x = noise(batch=64, size=8)
    half = AugmentConfig(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip_prob=0.5, jitter_prob=0.0, blur_prob=0.0)
    y = augment(x, half, seeded(1))
    seen = set()
    for i in range(64):
        for dims, name in (((), "none"), ((-1,), "h"), ((-2,), "v"), ((-1, -2), "hv")):
            if (y[i] - x[i].flip(dims) if dims else y[i] - x[i]).abs().max() < 1e-5:
                seen.add(name)
    assert seen == {"none", "h", "v", "hv"}


def test_crop_magnifies_a_centred_square() -> None:
    x = torch.zeros(32, 1, 64, 64)
    x[:, :, 26:38, 26:38] = 1.0  # 12 x 12 pixels, normalised extent +-0.1875
    # Scale 0.36, ratio 1: box half-extent 0.6, centre within +-0.4, so the box always holds the square,
    # and its 144 pixels become 144 / 0.36 = 400.
    config = AugmentConfig(crop_scale=(0.36, 0.36), crop_ratio=(1.0, 1.0), flip_prob=0.0, jitter_prob=0.0,
                           blur_prob=0.0)
    y = augment(x, config, seeded(0))
    bright = (y > 0.5).sum(dim=(1, 2, 3)).float()
    assert ((bright - 400.0).abs() <= 50.0).all(), bright
    assert torch.allclose(y.sum(dim=(1, 2, 3)), torch.full((32,), 400.0), rtol=0.02)
    # The squares land in different places (the centre is random).
    assert len({tuple(torch.nonzero(y[i, 0] > 0.5).min(0).values.tolist()) for i in range(32)}) > 5


def test_crop_boxes_stay_inside_the_input() -> None:
    # A constant image stays constant: no box (nor bilinear tap) reaches the zero padding.
    x = torch.ones(256, 1, 20, 36)
    config = AugmentConfig(crop_scale=(0.01, 1.0), crop_ratio=(0.2, 5.0), jitter_prob=0.0, blur_prob=0.0)
    y = augment(x, config, seeded(0))
    assert (y - 1.0).abs().max() < 1e-5
    theta = _crop_flip_theta(_draw(4096, x, seeded(1)), config, 20, 36)
    w, h = theta[:, 0, 0].abs(), theta[:, 1, 1].abs()
    cx, cy = theta[:, 0, 2], theta[:, 1, 2]
    assert (w <= 1.0).all() and (h <= 1.0).all() and (w > 0).all() and (h > 0).all()
    assert (cx.abs() + w <= 1.0 + 1e-6).all() and (cy.abs() + h <= 1.0 + 1e-6).all()
    # Areas where the box is not clamped follow crop_scale; clamped ones are smaller.
    area = w * h
    assert (area <= 1.0 + 1e-6).all() and (area >= 0.01 - 1e-6).all()


def test_blur_smooths_noise_and_keeps_the_mean() -> None:
    x = noise(batch=8, size=64, channels=2)
    config = AugmentConfig(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip_prob=0.0, jitter_prob=0.0,
                           blur_prob=1.0, blur_sigma=(1.0, 2.0))
    y = augment(x, config, seeded(0))
    assert (y.var(dim=(2, 3)) < 0.5 * x.var(dim=(2, 3))).all()
    assert (y.mean(dim=(2, 3)) - x.mean(dim=(2, 3))).abs().max() < 0.01
    # Both channels of a sample share its sigma: equal channels stay equal.
    same = noise(batch=4, size=32).expand(4, 2, 32, 32).contiguous()
    z = augment(same, config, seeded(1))
    assert torch.equal(z[:, 0], z[:, 1])
    # blur_prob 0.5: unselected samples get the delta kernel and come back exactly.
    half = AugmentConfig(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip_prob=0.0, jitter_prob=0.0, blur_prob=0.5)
    x = noise(batch=32, size=32)
    y = augment(x, half, seeded(2))
    unchanged = (y == augment(x, IDENTITY, seeded(2))).flatten(1).all(dim=1)
    assert 4 < int(unchanged.sum()) < 28
    assert (y[~unchanged].var(dim=(1, 2, 3)) < x[~unchanged].var(dim=(1, 2, 3))).all()


def test_gaussian_kernels() -> None:
    sigma = torch.tensor([1.0, 1.5, 2.0, 1.5])
    kernels = _gaussian_kernels(sigma, torch.tensor([True, True, True, False]), 13)
    assert kernels.shape == (4, 13)
    assert torch.allclose(kernels.sum(dim=1), torch.ones(4))
    t = torch.arange(13.0) - 6
    assert torch.allclose((kernels[:3] * t**2).sum(dim=1), sigma[:3] ** 2, rtol=0.02)  # truncated at 3 sigma
    assert torch.equal(kernels[3], (t == 0).float())
    assert AugmentConfig().kernel_size == 13 and AugmentConfig(blur_sigma=(0.1, 0.3)).kernel_size == 3


def test_jitter_within_bounds() -> None:
    x = noise(batch=256, size=16)
    config = AugmentConfig(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip_prob=0.0, jitter_prob=1.0,
                           brightness=0.2, contrast=0.3, blur_prob=0.0)
    y = augment(x, config, seeded(0))
    shift = y.mean(dim=(1, 2, 3)) - x.mean(dim=(1, 2, 3))
    factor = y.std(dim=(1, 2, 3)) / x.std(dim=(1, 2, 3))
    assert (shift.abs() <= 0.2 + 1e-5).all() and shift.abs().max() > 0.18 and shift.min() < 0 < shift.max()
    assert ((factor >= 0.7 - 1e-5) & (factor <= 1.3 + 1e-5)).all()
    assert factor.min() < 0.75 and factor.max() > 1.25
    # A pure affine change of each sample: y = factor * x + offset, not clamped to [0, 1].
    centred_x = x - x.mean(dim=(1, 2, 3), keepdim=True)
    centred_y = y - y.mean(dim=(1, 2, 3), keepdim=True)
    assert torch.allclose(centred_y, centred_x * factor.view(-1, 1, 1, 1), atol=1e-5)
    assert y.max() > 1.0 and y.min() < 0.0
    # jitter_prob 0.5: the others are untouched (compared with the same draws' warp, exact to the bit).
    half = AugmentConfig(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip_prob=0.0, jitter_prob=0.5, blur_prob=0.0)
    y = augment(x, half, seeded(1))
    unchanged = (y == augment(x, IDENTITY, seeded(1))).flatten(1).all(dim=1)
    assert 96 < int(unchanged.sum()) < 160


@pytest.mark.parametrize(
    "kwargs",
    [
        {"crop_scale": (0.0, 1.0)},
        {"crop_scale": (0.5, 1.2)},
        {"crop_scale": (0.8, 0.4)},
        {"crop_scale": (0.5,)},
        {"crop_ratio": (0.0, 1.0)},
        {"crop_ratio": (2.0, 1.0)},
        {"crop_ratio": (1.0, float("inf"))},
        {"flip_prob": -0.1},
        {"flip_prob": 1.5},
        {"jitter_prob": float("nan")},
        {"blur_prob": 2.0},
        {"brightness": -0.1},
        {"contrast": 1.5},
        {"contrast": -0.2},
        {"blur_sigma": (0.0, 1.0)},
        {"blur_sigma": (2.0, 1.0)},
    ],
)
def test_invalid_configs_raise(kwargs: dict) -> None:
    with pytest.raises(InputError):
        AugmentConfig(**kwargs)


def test_config_normalises_pairs() -> None:
    config = AugmentConfig(crop_scale=[0.5, 1], blur_sigma=[1, 2])
    assert config.crop_scale == (0.5, 1.0) and config.blur_sigma == (1.0, 2.0)
    assert isinstance(config.crop_scale, tuple)


def test_invalid_inputs_raise() -> None:
    with pytest.raises(InputError, match="floating"):
        augment(torch.zeros(2, 1, 16, 16, dtype=torch.uint8), AugmentConfig())
    with pytest.raises(InputError, match=r"\(B, C, H, W\)"):
        augment(torch.zeros(1, 16, 16), AugmentConfig())
    with pytest.raises(InputError, match="too small"):
        augment(torch.zeros(2, 1, 6, 6), AugmentConfig(blur_prob=1.0))
    # Small crops are fine without blur.
    assert augment(torch.zeros(2, 1, 6, 6), AugmentConfig(blur_prob=0.0)).shape == (2, 1, 6, 6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_generator_on_another_device_type_raises() -> None:
    with pytest.raises(InputError, match="torch.Generator"):
        augment(noise().cuda(), AugmentConfig(), seeded(0, "cpu"))
    with pytest.raises(InputError, match="torch.Generator"):
        augment(noise(), AugmentConfig(), seeded(0, "cuda"))


def test_pretraining_batch_runs(capsys: pytest.CaptureFixture[str]) -> None:
    x = torch.rand(256, 1, 128, 128, generator=seeded(0))
    config = AugmentConfig()
    g = seeded(1)
    augment(x, config, g)  # warm-up (allocator, thread pool)
    start = time.perf_counter()
    y = augment(x, config, g)
    elapsed = time.perf_counter() - start
    assert y.shape == x.shape and torch.isfinite(y).all()
    with capsys.disabled():
        print(f"\naugment (256, 1, 128, 128) on {x.device}, {torch.get_num_threads()} threads: {elapsed * 1000:.0f} ms")
