"""Sparse slices (issue 31): OpenKBP stores CT only inside the contours on slices outside the treated region. An organ
absent there (a cord whose contour ends) is unknown, neither taught as background nor scored; the organs such a slice
shows keep their labels (pt_5's whole larynx lies on such slices)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from separeg.segment.finetune.config import FinetuneConfig
from separeg.segment.finetune.data import SliceSet
from separeg.segment.finetune.validation import case_organ_scores
from separeg.segment.network import GridSpec

BRAINSTEM, CORD, LARYNX = 1, 2, 6


def _slices(openkbp, case: str, min_body_area: float) -> SliceSet:
    import SimpleITK as sitk

    image = sitk.ReadImage(str(openkbp / f"{case}_ct.nii.gz"))
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(openkbp / f"{case}_oar.nii.gz")))
    found = SimpleNamespace(name=case, image=image, images=[image], labels=labels,
                            annotated=frozenset(int(v) for v in set(labels.flatten().tolist()) - {0}))
    return SliceSet([found], 8, GridSpec(spacing_xy=(7.8, 7.8)), torch.device("cpu"), min_body_area=min_body_area)


def _sparse(openkbp, case: str) -> torch.Tensor:
    """Slices whose voxels above -500 HU cover less than the default area (the rule, computed here independently)."""
    import SimpleITK as sitk

    image = sitk.ReadImage(str(openkbp / f"{case}_ct.nii.gz"))
    area = (sitk.GetArrayFromImage(image) > -500).sum(axis=(1, 2)) * image.GetSpacing()[0] * image.GetSpacing()[1]
    return torch.as_tensor(area < FinetuneConfig().min_body_area)


def _shown(slices: SliceSet, organ: int) -> torch.Tensor:
    return (slices.labels == organ).flatten(1).any(1)


def test_an_organ_absent_from_a_sparse_slice_is_unknown_one_it_shows_is_taught(openkbp) -> None:
    masked = _slices(openkbp, "pt_5", FinetuneConfig().min_body_area)
    plain = _slices(openkbp, "pt_5", 0.0)
    rows = torch.nonzero(_sparse(openkbp, "pt_5")).flatten()
    assert len(rows) == 61 + 23  # pt_5: 61 slices hold only contoured tissue, 23 no body at all
    larynx = _shown(masked, LARYNX)
    assert larynx.any() and bool(_sparse(openkbp, "pt_5")[larynx].all())  # the whole larynx lies on them
    assert torch.equal(masked.supervised[rows, LARYNX], larynx[rows])  # taught where shown, unknown elsewhere
    assert torch.equal(masked.supervised[rows, CORD], _shown(masked, CORD)[rows])
    assert masked.supervised[rows, 0].all() and torch.equal(plain.supervised, plain.annotated) and plain.scored.all()


def test_a_cord_that_goes_on_beyond_its_contour_is_not_scored_on_sparse_slices(openkbp) -> None:
    masked = _slices(openkbp, "pt_5", FinetuneConfig().min_body_area)
    plain = _slices(openkbp, "pt_5", 0.0)
    prediction = masked.labels.long().clone()
    beyond = torch.nonzero(~masked.scored[:, CORD]).flatten()
    prediction[beyond, 60:62, 60:62] = CORD  # the model goes on where OpenKBP stored no CT and no contour
    assert case_organ_scores(prediction, masked)[0][CORD] == 1.0
    assert case_organ_scores(prediction, plain)[0][CORD] < 0.9
    assert case_organ_scores(prediction, masked)[0][LARYNX] == 1.0  # scored on its sparse slices


def test_sparse_slice_area_must_not_be_negative() -> None:
    from separeg.runtime.errors import InputError

    with pytest.raises(InputError, match="min-body-area"):
        FinetuneConfig(min_body_area=-1)
