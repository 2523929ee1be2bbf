"""Test-time left-right mirroring with laterality swapped (separeg.segment.mirror) and its choice per model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
from torch import nn

from separeg.runtime.bundle import load_bundle
from separeg.runtime.model_store import resolve_model
from separeg.segment.contour import LABELS_FILE, SEGMENTATION_FILE, ContourJob, run_contour
from separeg.segment.mirror import MirrorEnsemble, laterality_permutation, mirror_batch

NAMES = {1: "Brainstem", 2: "SpinalCord", 3: "Parotid_R", 4: "Parotid_L", 5: "Lens_L", 6: "Larynx"}


def test_lateral_organs_swap_with_their_partner_only() -> None:
    # Lens_L has no Lens_R in the table: it keeps its channel.
    assert laterality_permutation(NAMES, 7) == [0, 1, 2, 4, 3, 5, 6]
    assert laterality_permutation({1: "Liver", 2: "Spleen"}, 3) == [0, 1, 2]


def test_the_ensemble_is_mirror_equivariant_with_laterality_swapped() -> None:
    """Mirroring the input mirrors the output and exchanges left and right organs: exactly, for any network (a
    wrong flip axis, a missing flip back or an unswapped channel breaks this)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 7, 5, padding=2))
    ensemble = MirrorEnsemble(net, laterality_permutation(NAMES, 7))
    x = torch.randn(2, 1, 12, 16)
    swap = [0, 1, 2, 4, 3, 5, 6]
    torch.testing.assert_close(ensemble(x.flip(-1)), ensemble(x).flip(-1)[:, swap])
    # and it averages the two predictions' probabilities
    expected = (net(x).softmax(1) + net(x.flip(-1)).softmax(1).flip(-1)[:, swap]) / 2
    torch.testing.assert_close(ensemble(x).exp(), expected)


def test_contour_mirrors_as_the_model_chose_unless_told(openkbp: Path, tmp_path: Path) -> None:
    """hn-oar-7 records the choice made on its held-out patients (on); --no-mirror and --mirror override it."""
    assert load_bundle(resolve_model("hn-oar-7")).metadata["test_time_mirroring"]["chosen"] is True
    results = {}
    for name, mirror in (("default", None), ("off", False)):
        out = tmp_path / name
        run_contour(ContourJob(volume=openkbp / "pt_1_ct.nii.gz", model="hn-oar-7", out_dir=out, device="cpu",
                               mirror=mirror))
        assert json.loads((out / LABELS_FILE).read_text())["test_time_mirroring"] is (mirror is None)
        results[name] = sitk.GetArrayFromImage(sitk.ReadImage(str(out / SEGMENTATION_FILE)))
    # Two predictions of the same organs: mostly the same voxels, not identical.
    a, b = results["default"] > 0, results["off"] > 0
    assert 0.9 < 2 * (a & b).sum() / (a.sum() + b.sum()) < 1.0
    assert {1, 2, 3, 4} <= set(np.unique(results["default"]).tolist())


def test_training_mirroring_swaps_lateral_labels_and_their_annotation() -> None:
    """A patch with Parotid_R (3) on the image's left half, from a case that annotates only Parotid_R: mirrored,
    the organ is on the right half, labelled Parotid_L (4), and the case counts as annotating Parotid_L only."""
    x = torch.zeros(64, 1, 4, 6)
    x[..., :3] = 1.0
    y = torch.zeros(64, 4, 6, dtype=torch.long)
    y[:, :, :3] = 3
    annotated = torch.zeros(64, 7, dtype=torch.bool)
    annotated[:, [0, 3]] = True
    swap = laterality_permutation(NAMES, 7)
    mx, my, mann = mirror_batch(x, y, annotated, swap, np.random.default_rng(0))
    flipped = my[:, 0, 5] == 4
    assert 16 < int(flipped.sum()) < 48  # about half
    assert torch.equal(my[flipped][:, :, 3:], torch.full_like(my[flipped][:, :, 3:], 4))
    assert torch.equal(my[flipped][:, :, :3], torch.zeros_like(my[flipped][:, :, :3]))
    assert torch.equal(mx[flipped][..., 3:], torch.ones_like(mx[flipped][..., 3:]))
    assert mann[flipped][:, 4].all() and not mann[flipped][:, 3].any() and mann[flipped][:, 0].all()
    # the others untouched
    assert torch.equal(mx[~flipped], x[~flipped]) and torch.equal(my[~flipped], y[~flipped])
    assert torch.equal(mann[~flipped], annotated[~flipped])
