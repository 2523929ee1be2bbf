"""Issue 22's transfer fixes and diagnostics: each a config setting, checked on its own and in a tiny real run."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from separeg.pretrain.config import PretrainConfig, PretrainJob
from separeg.pretrain.diagnostics import spread, weight_change
from separeg.pretrain.ssl import channel_kl
from separeg.pretrain.stages import run_pretrain
from separeg.runtime.errors import InputError
from separeg.runtime.training import load_checkpoint

REPO = Path(__file__).resolve().parent.parent


def test_intra_steps_are_equal_per_group_by_default() -> None:
    equal = PretrainConfig(iterations=1000)
    assert equal.intra_steps([900, 90, 10, 0]) == [133, 133, 133, 0]
    proportional = PretrainConfig(iterations=1000, intra_split="proportional")
    assert proportional.intra_steps([900, 90, 10, 0]) == [360, 36, 4, 0]
    with pytest.raises(InputError, match="intra-split"):
        PretrainConfig(intra_split="by size")


def test_warmup_and_magnification_settings() -> None:
    config = PretrainConfig(crop_size=64)
    assert config.warmup_steps(400) == 20 and config.min_crop_window() == 32
    assert PretrainConfig(crop_size=128, max_magnification=None).min_crop_window() == 0
    assert PretrainConfig(crop_size=64, max_magnification=3.0).min_crop_window() == 22
    with pytest.raises(InputError, match="magnification"):
        PretrainConfig(max_magnification=0.5)
    with pytest.raises(InputError, match="warmup"):
        PretrainConfig(warmup_fraction=1.0)
    with pytest.raises(InputError, match="distill-kl"):
        PretrainConfig(distill_kl="sum")


@pytest.mark.filterwarnings("ignore:reduction. 'mean' divides")
def test_per_dimension_kl_is_the_batchmean_over_the_channels() -> None:
    student, teacher = torch.randn(6, 48), torch.randn(6, 48)
    batchmean = channel_kl(student, teacher, 0.1, reduction="batchmean")
    assert channel_kl(student, teacher, 0.1).item() == pytest.approx(batchmean.item() / 48, rel=1e-5)
    kl_mean = torch.nn.KLDivLoss(reduction="mean")
    reference = kl_mean(torch.log_softmax(student / 0.1, 1), torch.softmax(teacher / 0.1, 1))
    assert channel_kl(student, teacher, 0.1).item() == pytest.approx(reference.item(), rel=1e-4)


def test_spread_tells_collapse_from_a_healthy_spread() -> None:
    torch.manual_seed(0)
    healthy = spread(torch.randn(4096, 64))
    assert healthy == pytest.approx(1 / math.sqrt(64), rel=0.05)
    collapsed = spread(torch.ones(4096, 64) + 1e-4 * torch.randn(4096, 64))
    assert collapsed < 0.01 * healthy


def test_weight_change_per_layer() -> None:
    initial = {"encoder.conv1.weight": torch.ones(4, 4), "encoder.layer1.0.conv1.weight": torch.ones(2, 2),
               "encoder.bn1.running_mean": torch.zeros(4), "encoder.bn1.num_batches_tracked": torch.tensor(3)}
    final = {"encoder.conv1.weight": torch.ones(4, 4) * 1.5, "encoder.layer1.0.conv1.weight": torch.ones(2, 2),
             "encoder.bn1.running_mean": torch.ones(4), "encoder.bn1.num_batches_tracked": torch.tensor(9)}
    assert weight_change(initial, final) == {"conv1": pytest.approx(0.5), "layer1": 0.0}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    archive = tmp_path_factory.mktemp("archive")
    for name in ("pt_1_ct.nii.gz", "pt_203_ct.nii.gz"):
        shutil.copy(REPO / "Resources" / "SampleData" / name, archive / name)
    out = tmp_path_factory.mktemp("run") / "run"
    config = PretrainConfig(encoder="resnet18-slim", iterations=20, batch_size=8, crop_size=32, clusters=2)
    run_pretrain(PretrainJob(archive=archive, run_dir=out, config=config, device="cpu"))
    return out


def test_teachers_and_student_start_from_the_inter_organ_model(run_dir: Path) -> None:
    inter = load_checkpoint(run_dir / "checkpoints" / "inter.pt")["model"]
    inter_backbone = {k.removeprefix("backbone."): v for k, v in inter.items() if k.startswith("backbone.")}
    for stage in ("intra0", "distill"):
        initial = torch.load(run_dir / "checkpoints" / "initial" / f"{stage}.pt", weights_only=True)
        assert initial.keys() == inter_backbone.keys()
        for key, value in initial.items():
            torch.testing.assert_close(value, inter_backbone[key])
    # A random start is not the inter model: the inter stage's own initial weights differ from its result.
    start = torch.load(run_dir / "checkpoints" / "initial" / "inter.pt", weights_only=True)
    assert not torch.equal(start["encoder.conv1.weight"], inter_backbone["encoder.conv1.weight"])


def test_report_shows_collapse_weight_change_and_distillation_balance(run_dir: Path) -> None:
    diagnostics = json.loads((run_dir / "diagnostics.json").read_text())
    stages = [s["stage"] for s in diagnostics["stages"]]
    assert stages[0] == "inter" and stages[-1] == "distill" and any(s.startswith("intra") for s in stages)
    for s in diagnostics["stages"]:
        assert 0 < s["feature_spread"] < 1 and 0 < s["projection_spread"] < 1
        assert all(v >= 0 for v in s["weight_change"].values())
    assert any(v > 0 for v in diagnostics["stages"][0]["weight_change"].values())
    terms = diagnostics["distill_terms"]
    assert terms["kl"]["steps"] == 4 and terms["cosine"]["steps"] == 4 and -1 <= terms["cosine"]["last"] <= 1
    report = (run_dir / "report.md").read_text()
    assert "## Representation diagnostics" in report and "| distill |" in report and "Distillation balance" in report


def test_each_fix_is_one_flag_away() -> None:
    import argparse

    from separeg.runtime.flags import add_flags, config_from_args
    from separeg.sis.regions import SISConfig

    parser = argparse.ArgumentParser()
    add_flags(parser, PretrainConfig)
    add_flags(parser, SISConfig)
    old = config_from_args(PretrainConfig, parser.parse_args(
        ["--no-init-from-inter", "--intra-split", "proportional", "--distill-kl", "batchmean", "--warmup-fraction", "0",
         "--max-magnification", "none"]))
    assert (old.init_from_inter, old.intra_split, old.distill_kl, old.warmup_fraction, old.max_magnification) == (
        False, "proportional", "batchmean", 0.0, None)
    assert config_from_args(PretrainConfig, parser.parse_args(["--max-magnification", "3"])).max_magnification == 3.0
