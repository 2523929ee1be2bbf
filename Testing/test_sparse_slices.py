"""Sparse slices (issue 31): OpenKBP stores CT only inside the contours on slices outside the treated region, so a
contour ending there is an artefact. Such slices are unknown for every organ in training and not scored."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from separeg.segment.finetune_config import FinetuneConfig
from separeg.segment.finetune_data import SliceSet
from separeg.segment.finetune_validation import case_organ_scores
from separeg.segment.network import GridSpec


def _pt_1(openkbp) -> SimpleNamespace:
    import SimpleITK as sitk

    image = sitk.ReadImage(str(openkbp / "pt_1_ct.nii.gz"))
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(openkbp / "pt_1_oar.nii.gz")))
    return SimpleNamespace(name="pt_1", image=image, images=[image], labels=labels, annotated=frozenset({1, 2}))


def test_contour_only_slices_teach_and_score_nothing(openkbp) -> None:
    case = _pt_1(openkbp)
    spec = GridSpec(spacing_xy=(7.8, 7.8))
    masked = SliceSet([case], 8, spec, torch.device("cpu"), min_body_area=FinetuneConfig().min_body_area)
    plain = SliceSet([case], 8, spec, torch.device("cpu"))
    cord = (masked.labels == 2).flatten(1).any(1)
    sparse = ~masked.scored
    # pt_1: 42 slices hold only contoured tissue (the cord is contoured on some of them), 25 none at all.
    assert int(sparse.sum()) == 42 + 25 and bool((cord & sparse).any()) and bool((cord & ~sparse).any())
    assert not masked.supervised[sparse, 1:].any() and masked.supervised[sparse, 0].all()
    assert masked.supervised[~sparse][:, [1, 2]].all() and plain.scored.all()
    # A prediction that stops the cord where the CT does is perfect on the scored slices, not on all of them.
    prediction = masked.labels.clone()
    prediction[sparse] = 0
    assert case_organ_scores(prediction, masked)[0][2] == 1.0
    assert case_organ_scores(prediction, plain)[0][2] < 0.95


def test_sparse_slice_area_must_not_be_negative() -> None:
    import pytest

    from separeg.runtime.errors import InputError

    with pytest.raises(InputError, match="min-body-area"):
        FinetuneConfig(min_body_area=-1)
