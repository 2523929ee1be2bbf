"""PL-Seg losses (HADFL, COCL, PSD), Mean Teacher, and fine-tuning with partial labels end to end."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from separeg.runtime.bundle import load_bundle
from separeg.runtime.errors import InputError
from separeg.runtime.events import Event, Events, EventType
from separeg.runtime.runlock import holds_run_lock
from separeg.segment.finetune.losses import marginal_dice_ce
from separeg.segment.finetune.mean_teacher import MeanTeacher, UnlabelledSlices, ema_update
from separeg.segment.finetune.objective import Objective, choose_partial_label_mode
from separeg.segment.finetune.plseg import (
    DeepSupervision,
    HardnessWeights,
    PLSegLoss,
    class_prototypes,
    cocl_loss,
    decoupled_foreground_loss,
    gaussian_rampup,
    psd_loss,
)
from separeg.segment.finetune.train import FinetuneConfig, FinetuneJob, run_finetune
from separeg.segment.network import build_unet

REPO = Path(__file__).resolve().parent.parent
SAMPLES = REPO / "Resources" / "SampleData"


def _unannotated_case() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One sample, 3 classes; organ 2 lies in the left half but the case does not annotate it."""
    torch.manual_seed(0)
    logits = torch.randn(1, 3, 8, 8, requires_grad=True)
    target = torch.zeros(1, 8, 8, dtype=torch.long)
    target[0, 6:, 6:] = 1  # organ 1 annotated, bottom-right corner
    annotated = torch.tensor([[True, True, False]])
    return logits, target, annotated


def test_hadfl_never_pushes_an_unannotated_organ_towards_background() -> None:
    logits, target, annotated = _unannotated_case()
    hidden = (slice(None), slice(0, 4))  # where organ 2 really is (unlabelled: 0 in the label map)
    loss, _, measured = decoupled_foreground_loss(logits, target, annotated)
    assert measured.tolist() == [False, True, False]
    loss[measured].sum().backward()
    # Gradient descent moves a logit against its gradient: organ 2's logit must never be lowered ...
    assert logits.grad[0, 2][hidden].max() <= 0
    # ... whereas the naive loss (every unlabelled voxel is background: --partial-labels background) lowers it.
    naive_logits = logits.detach().clone().requires_grad_(True)
    marginal_dice_ce(naive_logits, target, torch.ones_like(annotated)).backward()
    assert naive_logits.grad[0, 2][hidden].min() > 0


def test_decoupled_loss_is_small_for_a_perfect_prediction_and_ignores_unannotated_classes() -> None:
    target = torch.zeros(2, 8, 8, dtype=torch.long)
    target[:, :4] = 1
    perfect = torch.nn.functional.one_hot(target, 3).permute(0, 3, 1, 2).float() * 30
    loss, dice, measured = decoupled_foreground_loss(perfect, target, torch.tensor([[True, True, False]] * 2))
    assert measured.tolist() == [False, True, False]
    assert loss[1] < 1e-3 and dice[1] < 1e-3 and loss[2] == 0


def test_hardness_weights_follow_the_definition() -> None:
    weights = HardnessWeights(n_classes=4, window=3)
    measured = torch.tensor([False, True, True, False])
    history = [torch.tensor([0.0, 0.8, 0.2, 0.0]), torch.tensor([0.0, 0.6, 0.05, 0.0]),
               torch.tensor([0.0, 0.4, 0.1, 0.0]), torch.tensor([0.0, 0.2, 0.02, 0.0])]
    for dice in history:
        w = weights.update(dice, measured)
    # Window of 3: the first batch has left it.
    d1, d2 = (0.6 + 0.4 + 0.2) / 3, (0.05 + 0.1 + 0.02) / 3
    mean = (d1 + d2) / 2
    torch.testing.assert_close(w, torch.tensor([1.0, d1 / mean, max(d2 / mean, 0.5), 1.0]))
    assert w[2] == 0.5  # the floor: 0.057 / 0.228 < 0.5
    # A class measured only sometimes averages over the batches where it was measured.
    weights = HardnessWeights(n_classes=3, window=10)
    weights.update(torch.tensor([0.0, 0.9, 0.3]), torch.tensor([False, True, True]))
    w = weights.update(torch.tensor([0.0, 0.0, 0.5]), torch.tensor([False, False, True]))
    torch.testing.assert_close(w, torch.tensor([1.0, 0.9 / 0.65, 0.4 / 0.65]))


def test_cocl_is_zero_for_orthogonal_prototypes_and_grows_with_overlap() -> None:
    orthogonal = torch.eye(4)[None].repeat(2, 1, 1) * torch.tensor([1.0, 2.0, 3.0, 0.5])[:, None]
    assert abs(float(cocl_loss(orthogonal))) < 1e-6
    half = orthogonal.clone()
    half[:, 1] = orthogonal[:, 0] + orthogonal[:, 1]  # classes 0 and 1 share a feature
    same = torch.ones(2, 4, 4)
    assert 0 < float(cocl_loss(half)) < float(cocl_loss(same))
    # Prototypes average the features under each class's probability map.
    features = torch.arange(2 * 8 * 8, dtype=torch.float32).reshape(1, 2, 8, 8)
    probs = torch.zeros(1, 2, 8, 8)
    probs[0, 0, :4], probs[0, 1, 4:] = 1, 1
    prototypes = class_prototypes(features, probs)
    torch.testing.assert_close(prototypes[0, 0], features[0, :, :4].mean(dim=(1, 2)))
    torch.testing.assert_close(prototypes[0, 1], features[0, :, 4:].mean(dim=(1, 2)))


def test_psd_ramps_and_distils_fine_to_coarse() -> None:
    assert gaussian_rampup(0.0, 0.1) == pytest.approx(0.1 * math.exp(-5))
    assert gaussian_rampup(0.5, 0.1) == pytest.approx(0.1 * math.exp(-1.25))
    assert gaussian_rampup(1.0, 0.1) == pytest.approx(0.1) == gaussian_rampup(2.0, 0.1)
    values = [gaussian_rampup(t / 10, 0.1) for t in range(11)]
    assert values == sorted(values)
    fine = torch.randn(2, 3, 16, 16)
    coarse = torch.nn.functional.interpolate(fine, size=(8, 8), mode="bilinear", align_corners=False)
    assert float(psd_loss([fine, coarse])) < 1e-6  # already agrees
    student = torch.randn(2, 3, 8, 8, requires_grad=True)
    loss = psd_loss([fine.requires_grad_(True), student])
    loss.backward()
    assert loss.item() > 0 and fine.grad is None  # the finer output is the teacher: no gradient into it
    assert student.grad.abs().sum() > 0


def test_deep_supervision_gives_four_scales_and_leaves_the_unet_deployable() -> None:
    unet = build_unet("resnet18", 4)
    net = DeepSupervision(unet, 4)
    x = torch.randn(2, 1, 64, 64)
    out = net(x)
    assert [tuple(o.shape[-2:]) for o in out.logits] == [(64, 64), (32, 32), (16, 16), (8, 8)]
    assert out.features.shape == (2, 16, 64, 64)
    unet.eval()
    net.eval()
    torch.testing.assert_close(net(x).logits[0], unet(x))
    assert all(not k.startswith("heads") for k in unet.state_dict())  # the bundle holds the plain U-Net
    loss_fn = PLSegLoss(4)
    target = torch.randint(0, 4, (2, 64, 64))
    loss = loss_fn(net(x), target, torch.ones(2, 4, dtype=torch.bool), progress=0.5)
    loss.backward()
    assert torch.isfinite(loss) and set(loss_fn.last) == {"sup", "psd", "cocl"}
    assert all(h.weight.grad is not None for h in net.heads)
    assert int(loss_fn.hardness.count) == 1


def test_teacher_is_the_ema_of_the_student() -> None:
    torch.manual_seed(0)
    student = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2))
    teacher = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2))
    teacher.load_state_dict(student.state_dict())
    expected = {k: v.clone() for k, v in teacher.state_dict().items()}
    for _ in range(3):
        with torch.no_grad():
            for p in student.parameters():
                p.add_(torch.randn_like(p))
        student(torch.randn(4, 1, 6, 6))  # moves the batch-norm statistics
        ema_update(teacher, student, 0.9)
        for key, value in student.state_dict().items():
            expected[key] = value.clone() if not value.is_floating_point() else 0.9 * expected[key] + 0.1 * value
    for key, value in teacher.state_dict().items():
        torch.testing.assert_close(value, expected[key], msg=key)
    assert int(teacher[1].num_batches_tracked) == 3


def test_mean_teacher_consistency_trains_only_the_student() -> None:
    unet = build_unet("resnet18", 3)
    slices = UnlabelledSlices([torch.rand(5, 1, 48, 40, dtype=torch.float32).half()], ["a"])
    crops = slices.sample(4, 32, np.random.default_rng(0))
    assert crops.shape == (4, 1, 32, 32) and crops.dtype == torch.float32
    assert slices.sample(2, 64, np.random.default_rng(0)).shape == (2, 1, 64, 64)  # zero-padded
    teacher = MeanTeacher(unet, slices, decay=0.99, consistency=1.0, rampup=0.5)
    assert teacher.weight(0.0) == pytest.approx(math.exp(-5)) and teacher.weight(0.5) == teacher.weight(0.9) == 1
    loss = teacher.loss(unet, 4, 32, 1.0, np.random.default_rng(0), torch.Generator().manual_seed(0))
    loss.backward()
    assert loss.item() > 0
    assert all(p.grad is None for p in teacher.teacher.parameters())
    assert next(unet.parameters()).grad is not None
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(1.0)
    teacher.update(unet, step=1)  # the first steps follow the student closely: decay min(0.99, 1 - 1/2) = 0.5
    first = next(teacher.teacher.parameters())
    torch.testing.assert_close(first, next(unet.parameters()) - 0.5)


def test_auto_mode_picks_plseg_only_when_cases_annotate_different_organs() -> None:
    seen: list[Event] = []
    events = Events(seen.append, min_interval=0.0)
    names = {1: "Brainstem", 2: "SpinalCord", 3: "Larynx"}
    assert choose_partial_label_mode("auto", [frozenset({1, 2}), frozenset({1, 2})], ["a", "b"], names,
                                     events) == "background"
    assert any("Larynx: the model cannot learn" in (e.msg or "") for e in seen)
    assert choose_partial_label_mode("auto", [frozenset({1, 2}), frozenset({1, 3})], ["a", "b"], names,
                                     events) == "plseg"
    assert any("a lacks Larynx; b lacks SpinalCord" in (e.msg or "") for e in seen)
    assert choose_partial_label_mode("marginal", [frozenset({1})], ["a"], names, events) == "marginal"
    with pytest.raises(InputError, match="unknown partial-label mode"):
        choose_partial_label_mode("ignore", [frozenset({1})], ["a"], names, events)


def test_objective_modes_give_finite_losses_on_the_same_batch() -> None:
    torch.manual_seed(0)
    x = torch.rand(2, 1, 64, 64)
    target = torch.randint(0, 3, (2, 64, 64))
    annotated = torch.tensor([[True, True, False], [True, True, True]])
    rng, generator = np.random.default_rng(0), torch.Generator().manual_seed(0)
    for mode in ("plseg", "marginal", "background"):
        objective = Objective(build_unet("resnet18", 3), mode, 3)
        loss = objective(x, target, annotated, progress=0.3, rng=rng, generator=generator)
        assert torch.isfinite(loss), mode
    plain = Objective(build_unet("resnet18", 3), "plseg", 3, psd_weight=0.0, cocl_weight=0.0, hardness=False)
    assert len(plain.net.heads) == 0 and plain.plseg.hardness is None
    assert torch.isfinite(plain(x, target, annotated, progress=0.3, rng=rng, generator=generator))


def _partial_cases(folder: Path, hide: dict[str, list[int]]) -> Path:
    """Sample OpenKBP cases with the given organs removed from their label maps (not annotated there)."""
    import SimpleITK as sitk

    folder.mkdir()
    shutil.copy(SAMPLES / "labels.json", folder)
    for name, organs in hide.items():
        shutil.copy(SAMPLES / f"{name}_ct.nii.gz", folder)
        labels = sitk.ReadImage(str(SAMPLES / f"{name}_oar.nii.gz"))
        array = sitk.GetArrayFromImage(labels)
        array[np.isin(array, organs)] = 0
        out = sitk.GetImageFromArray(array)
        out.CopyInformation(labels)
        sitk.WriteImage(out, str(folder / f"{name}_oar.nii.gz"))
    return folder


def test_finetune_switches_to_partial_labels_and_mean_teacher_end_to_end(tmp_path: Path) -> None:
    data = _partial_cases(tmp_path / "data", {"pt_22": [7], "pt_1": [], "pt_16": [1, 2]})
    archive = tmp_path / "archive"
    archive.mkdir()
    shutil.copy(SAMPLES / "pt_5_ct.nii.gz", archive)
    seen: list[Event] = []
    config = FinetuneConfig(encoder="resnet18", epochs=2, steps_per_epoch=2, batch_size=2, validation_cases=1,
                            mean_teacher=True, unlabelled_slices=16, validate_every=1)
    path = run_finetune(FinetuneJob(data=data, out_dir=tmp_path / "run", config=config, device="cpu",
                                    unlabelled=archive), Events(seen.append, min_interval=0.0))
    bundle = load_bundle(path, expected_kind="segmentation")
    assert bundle.metadata["training"]["partial_labels"] == "plseg"
    assert bundle.metadata["training"]["mean_teacher"] is True
    assert not any(k.startswith(("heads", "net.", "teacher.")) for k in bundle.state_dict)
    assert build_unet("resnet18", 8, bundle.architecture["in_channels"]).load_state_dict(bundle.state_dict)  # strict
    messages = [e.msg or "" for e in seen if e.type != EventType.PROGRESS]
    assert any("partial-label mode (PL-Seg)" in m for m in messages)
    assert any("Mean Teacher: 16 unlabelled slice(s) from 1 volume(s)" in m for m in messages)
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    assert len(history["epochs"]) == 2
    assert not holds_run_lock(tmp_path / "run")  # released: one process may run many fine-tunes
    with pytest.raises(InputError, match="--unlabelled ARCHIVE"):
        run_finetune(FinetuneJob(data=data, out_dir=tmp_path / "no_archive", config=config, device="cpu"))
