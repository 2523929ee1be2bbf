"""``separeg finetune --archive``: labelled cases propagated onto unlabelled CTs (separeg/atlas/archive.py, cached per
pair; fused by vote with a confidence) and trained on with their unconfident voxels ignored
(separeg/segment/finetune/propagated.py, data.py, losses.py). Synthetic volumes with an identity registration for the
cache and the fusion; one real OpenKBP case onto two real archive CTs end to end."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import separeg.atlas.archive as archive
from separeg.io.archive import scan_archive
from separeg.runtime.errors import InputError
from separeg.runtime.events import Events
from separeg.segment.case_loading import LoadedCase
from separeg.segment.finetune.data import IGNORE, SliceSet, sample_patches
from separeg.segment.finetune.losses import marginal_dice_ce
from separeg.segment.finetune.propagated import ARCHIVE_SETTINGS, ArchiveTerm, check_archive, with_archive
from separeg.segment.network import GridSpec

SHAPE = (8, 16, 16)  # (Z, Y, X)


def _ct(shift: int = 0):
    """A small CT: a 0 HU block in air (a body for the registration's preparation)."""
    import SimpleITK as sitk

    hu = np.full(SHAPE, -1000, np.int16)
    hu[1:7, 3 + shift:13, 3:13] = 0
    image = sitk.GetImageFromArray(hu)
    image.SetSpacing((4.0, 4.0, 4.0))
    return image


def _case(name: str, organs: dict[int, tuple[slice, ...]]) -> LoadedCase:
    labels = np.zeros(SHAPE, np.uint8)
    for value, where in organs.items():
        labels[where] = value
    return LoadedCase(name, _ct(), labels, frozenset(organs))


@pytest.fixture()
def identity_registration(monkeypatch):
    """``register`` replaced by the identity (MI per case name), counting its calls."""
    import SimpleITK as sitk

    calls, mi = [], {}

    def register(fixed, moving, config):
        calls.append(moving)
        return sitk.Transform(3, sitk.sitkIdentity), mi.get(len(calls), -0.5)

    monkeypatch.setattr(archive, "register", register)
    return SimpleNamespace(calls=calls, mi=mi)


@pytest.fixture()
def two_archive_cts(tmp_path: Path):
    folder = tmp_path / "archive"
    folder.mkdir()
    import SimpleITK as sitk

    for i in range(2):
        sitk.WriteImage(_ct(shift=i), str(folder / f"scan{i}.nii.gz"))
    manifest = scan_archive(folder)
    return manifest.usable(), folder


A = _case("A", {1: np.s_[2:6, 4:8, 4:8], 2: np.s_[2:6, 9:12, 9:12]})  # annotates organs 1 and 2
B = _case("B", {1: np.s_[2:6, 4:8, 6:10]})  # organ 1 shifted; organ 2 not annotated: unknown for B, no vote


def test_fusion_votes_per_organ_over_the_cases_that_annotate_it(identity_registration, two_archive_cts,
                                                               tmp_path: Path) -> None:
    entries, folder = two_archive_cts
    (first, *_) = archive.propagate_archive(entries, folder, [A, B], tmp_path / "out")
    assert first.annotated == {1, 2} and first.cases == ["A", "B"]
    labels, confidence = first.labels, first.confidence
    # Organ 2: only A annotates it, so A's mask alone decides, with full confidence where both cases are sure.
    assert (labels[3, 10, 10], confidence[3, 10, 10]) == (2, pytest.approx(1.0))
    # Organ 1 where both agree: 1; where only one of the two says so: a 50/50 vote (the organ, as separeg atlas
    # fuses: a vote at 0.5 wins), confidence 0: unknown in training.
    assert (labels[3, 5, 7], confidence[3, 5, 7]) == (1, pytest.approx(1.0))
    assert (labels[3, 5, 4], labels[3, 5, 9]) == (1, 1)
    assert confidence[3, 5, 4] == pytest.approx(0.0) and confidence[3, 5, 9] == pytest.approx(0.0)
    assert confidence[0, 0, 0] == pytest.approx(1.0)  # background both are sure of
    assert (tmp_path / "out" / "fused" / f"{first.name}_confidence.nii.gz").exists()


def test_pairs_are_cached_resumed_and_redone_when_an_input_changes(identity_registration, two_archive_cts,
                                                                    tmp_path: Path) -> None:
    entries, folder = two_archive_cts
    out = tmp_path / "out"
    events = []
    first = archive.propagate_archive(entries, folder, [A, B], out, events=Events(events.append, min_interval=0.0))
    assert len(identity_registration.calls) == 4  # 2 archive CTs x 2 cases
    assert [(e.step, e.total) for e in events if e.stage == "archive" and e.total][-1] == (4, 4)
    pairs = sorted((out / "pairs").glob("*.npz"))
    mtimes = [p.stat().st_mtime_ns for p in pairs]
    again = archive.propagate_archive(entries, folder, [A, B], out)
    assert len(identity_registration.calls) == 4 and [p.stat().st_mtime_ns for p in pairs] == mtimes  # all cached
    np.testing.assert_array_equal(again[0].labels, first[0].labels)
    pairs[0].unlink()  # a run stopped in that pair: only it is redone
    archive.propagate_archive(entries, folder, [A, B], out)
    assert len(identity_registration.calls) == 5
    relabelled = replace(B, labels=np.roll(B.labels, 1, axis=2))  # new contours on B: its pairs are redone
    archive.propagate_archive(entries, folder, [A, relabelled], out)
    assert len(identity_registration.calls) == 7
    record = json.loads((out / "pairs.json").read_text())["pairs"][0]
    assert {"mi", "seconds", "archive", "case", "kept"} <= set(record)


def test_a_pair_that_did_not_register_is_dropped_with_a_warning(identity_registration, two_archive_cts,
                                                                tmp_path: Path) -> None:
    entries, folder = two_archive_cts
    identity_registration.mi[2] = -0.01  # the 2nd registration (largest CT <- B) found no anatomy
    events = []
    result = archive.propagate_archive(entries, folder, [A, B], tmp_path / "out",
                                       events=Events(events.append, min_interval=0.0))
    assert result[0].cases == ["A"] and result[1].cases == ["A", "B"]
    assert any("registration dropped" in (e.msg or "") and e.level == "warning" for e in events)


def test_a_stop_request_ends_between_pairs_and_keeps_the_finished_ones(identity_registration, two_archive_cts,
                                                                        tmp_path: Path) -> None:
    from separeg.runtime.errors import CancelledError

    entries, folder = two_archive_cts

    class StopAfterTwo:
        @property
        def requested(self):
            return "test" if len(identity_registration.calls) >= 2 else None

    with pytest.raises(CancelledError, match="run again to resume"):
        archive.propagate_archive(entries, folder, [A, B], tmp_path / "out", stop=StopAfterTwo())
    assert len(list((tmp_path / "out" / "pairs").glob("*.npz"))) == 2


# ------------------------------------------------------------------------------------------- the loss side


def test_unconfident_voxels_are_ignored_by_the_loss() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 8, 8, requires_grad=True)
    target = torch.randint(0, 3, (2, 8, 8))
    annotated = torch.ones(2, 3, dtype=torch.bool)
    known = torch.zeros(2, 8, 8, dtype=torch.bool)
    known[:, :4] = True
    loss = marginal_dice_ce(logits, target, annotated, voxels=known)
    loss.backward()
    assert logits.grad[:, :, 4:].abs().max() == 0  # nothing learnt where the vote was unsure
    other = target.clone()
    other[:, 4:] = (other[:, 4:] + 1) % 3
    assert marginal_dice_ce(logits, other, annotated, voxels=known).item() == pytest.approx(loss.item())
    # Without a mask the loss is the one every other run uses (unchanged).
    assert marginal_dice_ce(logits, target, annotated).item() != pytest.approx(loss.item())


def _slice_set(known: bool) -> SliceSet:
    spec = GridSpec((-1000.0, 1000.0), (4.0, 4.0), context_slices=1)
    mask = np.zeros(SHAPE, bool)
    mask[:, :8] = True
    return SliceSet([A], 3, spec, torch.device("cpu"), known=[mask] if known else None)


def test_patches_carry_ignore_where_the_propagated_labels_are_unknown() -> None:
    plain, masked = _slice_set(False), _slice_set(True)
    assert plain.known is None
    x0, y0, a0 = sample_patches(plain, 4, 16, 0.5, np.random.default_rng(1))
    x1, y1, a1 = sample_patches(masked, 4, 16, 0.5, np.random.default_rng(1))
    assert (y0 >= 0).all() and torch.equal(x0, x1) and torch.equal(a0, a1)  # the same draws
    assert (y1 == IGNORE).any() and torch.equal(y1[y1 != IGNORE], y0[y1 != IGNORE])


def test_archive_term_ignores_unknown_voxels_through_mirroring_and_augmentation() -> None:
    masked = _slice_set(True)
    unet = torch.nn.Conv2d(3, 3, 1)
    losses = []
    for change in (False, True):
        if change:  # other labels where they are unknown: the same loss
            unknown = ~masked.known
            masked.labels[unknown] = (masked.labels[unknown] + 1) % 3
        term = ArchiveTerm(masked, 0.5, foreground_fraction=0.5, augmentation="nnunet", swap=[0, 2, 1])
        losses.append(term.loss(unet, 4, 16, np.random.default_rng(3), torch.Generator().manual_seed(3)).item())
    assert losses[0] == pytest.approx(losses[1]) and losses[0] > 0


def test_without_archive_the_run_identity_is_as_before() -> None:
    identity = {"data": "d", "config": {"lr": 1e-3, "archive_weight": 0.5, "archive_confidence": 0.5}}
    assert with_archive(identity, None) == {"data": "d", "config": {"lr": 1e-3}}
    assert set(ARCHIVE_SETTINGS) == {"archive_weight", "archive_confidence"}
    manifest = SimpleNamespace(root="/x", hash="h")
    assert with_archive(identity, manifest)["archive"] == {"folder": str(Path("/x").resolve()), "volumes": "h"}


# ------------------------------------------------------------------------------------------------ refusals


def test_refusals(tmp_path: Path, openkbp: Path) -> None:
    from separeg.io.volumes import read_volume

    job = SimpleNamespace(archive=tmp_path)
    with pytest.raises(InputError, match="--archive .* empty"):
        check_archive(job, ("CT",), [], Events())
    with pytest.raises(InputError, match="2 input channels"):
        check_archive(job, (SimpleNamespace(name="T1"), SimpleNamespace(name="T2")), [], Events())
    shutil.copy(openkbp / "pt_10_ct.nii.gz", tmp_path / "copy.nii.gz")
    labelled = LoadedCase("pt_10", read_volume(openkbp / "pt_10_ct.nii.gz"), np.zeros(1), frozenset())
    with pytest.raises(InputError, match="copy.nii.gz is pt_10"):
        check_archive(job, ("CT",), [labelled], Events())
    assert check_archive(SimpleNamespace(archive=None), ("CT",), [], Events()) is None


# ------------------------------------------------------------------------------------------------ end to end


def _half(source: Path, target: Path) -> None:
    """Every other voxel along each axis (spacing doubled): 64^3 registers in a few seconds."""
    import SimpleITK as sitk

    sitk.WriteImage(sitk.ReadImage(str(source))[::2, ::2, ::2], str(target))


def test_tiny_finetune_with_an_archive(openkbp: Path, tmp_path: Path) -> None:
    from separeg.runtime.bundle import load_bundle
    from separeg.segment.finetune.train import FinetuneConfig, FinetuneJob, run_finetune

    data, ctf, other = tmp_path / "data", tmp_path / "archive", tmp_path / "other"
    for folder in (data, ctf, other):
        folder.mkdir()
    shutil.copy(openkbp / "labels.json", data / "labels.json")
    for name, folder in (("pt_10_ct", data), ("pt_10_oar", data), ("pt_11_ct", ctf), ("pt_12_ct", ctf),
                         ("pt_13_ct", other)):
        _half(openkbp / f"{name}.nii.gz", folder / f"{name}.nii.gz")
    config = FinetuneConfig(encoder="resnet18", epochs=1, steps_per_epoch=2, batch_size=2, validation_cases=0,
                            postprocessing="none", context_slices=0, deep_supervision=False)
    job = FinetuneJob(data=data, out_dir=tmp_path / "run", config=config, device="cpu", archive=ctf,
                      archive_threads=2)
    events = []
    bundle = load_bundle(run_finetune(job, Events(events.append, min_interval=0.0)))
    assert bundle.metadata["training"]["training_cases"] == 1
    assert len(list((tmp_path / "run" / "archive" / "pairs").glob("*.npz"))) == 2
    assert [(e.step, e.total) for e in events if e.stage == "archive" and e.total][-1] == (2, 2)
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["archive"]["folder"] == str(ctf.resolve()) and saved["config"]["archive_weight"] == 0.5
    with pytest.raises(InputError, match="another configuration"):  # the same run folder with another archive
        run_finetune(replace(job, archive=other))
