"""Fine-tuning's validation cost (issue 32): the epoch-end validation predicts a crop of slices around the organs,
on a cadence that keeps it cheaper than training; patience still counts epochs."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from separeg.runtime.events import Events
from separeg.runtime.training import Runtime
from separeg.segment.finetune import validation
from separeg.segment.finetune.validation import EpochValidator, validation_cadence, validation_rows


def _slices(organ_slices: list[list[int]], depth: int = 40) -> SimpleNamespace:
    """Cases of ``depth`` 4 x 4 slices each; case ``i`` has an organ voxel on the slices ``organ_slices[i]``."""
    labels = torch.zeros(depth * len(organ_slices), 4, 4, dtype=torch.uint8)
    for case, rows in enumerate(organ_slices):
        for row in rows:
            labels[case * depth + row, 1, 1] = 1
    return SimpleNamespace(labels=labels, case_of=np.repeat(np.arange(len(organ_slices)), depth))


def test_validation_rows_keep_each_cases_organs_and_a_margin() -> None:
    slices = _slices([[10, 15], [], [0, 39]])
    rows = validation_rows(slices, margin=3)
    assert rows.tolist() == list(range(7, 19)) + list(range(40, 80)) + list(range(80, 120))
    assert validation_rows(slices, margin=0)[:6].tolist() == [10, 11, 12, 13, 14, 15]


def test_validation_cadence_keeps_validation_below_training_cost() -> None:
    # One case, 7 steps of 16 patches of 64^2 per epoch; 300 validation slices of 128^2: validate every 4 epochs.
    assert validation_cadence(300 * 128 * 128, 7, 16, 64 * 64) == 4
    assert validation_cadence(10 * 64 * 64, 50, 16, 64 * 64) == 1  # cheap validation: every epoch


def test_the_validator_runs_on_its_cadence_and_counts_patience_in_epochs(tmp_path: Path, monkeypatch) -> None:
    means = iter([0.5, 0.4, 0.3, 0.2])
    calls = []

    def fake_validate(model, slices, runtime, rows=None):
        calls.append(rows)
        return {"1": next(means)}

    monkeypatch.setattr(validation, "validate", fake_validate)
    model = torch.nn.Conv2d(1, 2, 1)
    validator = EpochValidator(model, None, on_training_data=False, steps_per_epoch=5, total=100, patience=4,
                               best_path=tmp_path / "best.pt", runtime=Runtime(torch.device("cpu")), events=Events(),
                               every=2, rows=np.array([3, 4]))
    stopped = next(step for step in range(1, 101) if validator(step))
    assert [e["epoch"] for e in validator.history["epochs"]] == [2, 4, 6]  # every 2nd epoch
    assert stopped == 30 and validator.history["stale"] == 4  # 4 epochs (2 validations) without improvement
    assert all(r.tolist() == [3, 4] for r in calls) and (tmp_path / "best.pt").exists()


def test_runs_from_before_these_settings_resume_when_given_their_old_values() -> None:
    """A run folder written before the settings existed records no value for them: given the old behaviour
    (``LEGACY_VALIDATION``, which hn-oar-7's build pins) it is the same run; with the new defaults it is another."""
    from separeg.segment.finetune.config import LEGACY_VALIDATION
    from separeg.segment.finetune.train import _without_legacy_validation

    old = {"config": {"epochs": 5, **LEGACY_VALIDATION, "bn_momentum": 0.1}}
    assert _without_legacy_validation(old) == {"config": {"epochs": 5}}
    new = {"config": {"epochs": 5, **LEGACY_VALIDATION, "validate_every": 0, "bn_momentum": 0.1}}
    assert _without_legacy_validation(new) == {"config": {"epochs": 5, **LEGACY_VALIDATION, "validate_every": 0}}
    smoother = {"config": {"epochs": 5, **LEGACY_VALIDATION, "bn_momentum": 0.01}}
    assert _without_legacy_validation(smoother) == {"config": {"epochs": 5, "bn_momentum": 0.01}}


def test_the_batchnorm_momentum_reaches_every_normalisation_layer(tmp_path: Path) -> None:
    from separeg.runtime.training import Runtime
    from separeg.segment.finetune.config import FinetuneConfig
    from separeg.segment.finetune.train import _build_network, _Start
    from separeg.segment.network import GridSpec

    unet = _build_network(_Start("resnet18-slim"), GridSpec(spacing_xy=(4.0, 4.0)), 3,
                          FinetuneConfig(bn_momentum=0.01), Runtime(torch.device("cpu")))
    momenta = {m.momentum for m in unet.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)}
    assert momenta == {0.01}
