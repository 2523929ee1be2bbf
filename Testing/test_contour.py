"""Auto-contour: geometry, laterality and outputs, with a small random-weight model (the pipeline, not accuracy)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from separeg.io.volumes import Geometry, read_volume
from separeg.rt.labels import load_label_table
from separeg.runtime.bundle import save_bundle
from separeg.runtime.errors import InputError
from separeg.runtime.model_store import resolve_model
from separeg.segment.contour import (
    CPU_BATCH,
    LABELS_FILE,
    REVIEW_NOTICE,
    SEGMENTATION_FILE,
    ContourJob,
    postprocess,
    run_contour,
)
from separeg.segment.network import GridSpec, build_unet, from_canonical, to_canonical


@pytest.fixture(scope="module")
def model_bundle(tmp_path_factory, openkbp: Path) -> Path:
    torch.manual_seed(0)
    table = load_label_table(openkbp / "labels.json")
    unet = build_unet("resnet18", max(table.values) + 1)
    path = tmp_path_factory.mktemp("model") / "tiny.separeg"
    return save_bundle(path, kind="segmentation",
                       architecture={"network": "monai.networks.nets.FlexibleUNet", "backbone": "resnet18",
                                     "spatial_dims": 2, "in_channels": 1, "out_channels": max(table.values) + 1},
                       state_dict=unet.state_dict(),
                       metadata={"inputs": {**GridSpec(spacing_xy=(3.9, 3.9)).to_dict(), "orientation": "LPS"},
                                 "labels": table.to_dict(),
                                 "data": {"spacing_min": [3.9, 3.9, 2.5], "spacing_max": [3.9, 3.9, 2.5]}})


def _contour(volume, model: Path, out: Path) -> tuple[sitk.Image, dict]:
    run_contour(ContourJob(volume=volume, model=str(model), out_dir=out, device="cpu"))
    return sitk.ReadImage(str(out / SEGMENTATION_FILE)), json.loads((out / LABELS_FILE).read_text())


def test_output_has_the_input_geometry_for_nifti_and_dicom(model_bundle: Path, openkbp: Path,
                                                           lung1_subset: Path, tmp_path: Path) -> None:
    for volume in (openkbp / "pt_1_ct.nii.gz", lung1_subset):
        segmentation, description = _contour(volume, model_bundle, tmp_path / Path(volume).name)
        assert Geometry.of(segmentation).matches(Geometry.of(read_volume(volume)))
        assert segmentation.GetPixelID() == sitk.sitkUInt8
        assert description["notice"] == REVIEW_NOTICE
        assert [lb["tg263"] for lb in description["labels"]][:3] == ["Brainstem", "SpinalCord", "Parotid_R"]
        assert description["labels"][2]["display_name"] == "Right parotid gland"
        assert description["labels"][2]["terminology"].split("~")[2:4] == ["SCT^45289007^Parotid gland",
                                                                           "SCT^24028007^Right"]
    # LUNG1 has 0.98 mm pixels, the model was trained at 3.9 mm: resampled to the model's grid, not reported.
    assert not any("voxel size" in w for w in description["warnings"])


def _flipped_lr(image: sitk.Image) -> sitk.Image:
    """The same patient stored with the x axis reversed (direction -1 along x): same physical voxels."""
    array = sitk.GetArrayFromImage(image)[:, :, ::-1]
    flipped = sitk.GetImageFromArray(np.ascontiguousarray(array))
    flipped.SetSpacing(image.GetSpacing())
    origin = list(image.GetOrigin())
    origin[0] += (image.GetSize()[0] - 1) * image.GetSpacing()[0]
    flipped.SetOrigin(origin)
    flipped.SetDirection((-1, 0, 0, 0, 1, 0, 0, 0, 1))
    return flipped


def test_laterality_follows_the_direction_matrix(model_bundle: Path, openkbp: Path, tmp_path: Path) -> None:
    original = read_volume(openkbp / "pt_1_ct.nii.gz")
    flipped = _flipped_lr(original)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(to_canonical(flipped)), sitk.GetArrayFromImage(original))
    sitk.WriteImage(flipped, str(tmp_path / "flipped.nii.gz"))
    seg_a, _ = _contour(openkbp / "pt_1_ct.nii.gz", model_bundle, tmp_path / "a")
    seg_b, _ = _contour(tmp_path / "flipped.nii.gz", model_bundle, tmp_path / "b")
    a, b = sitk.GetArrayFromImage(seg_a), sitk.GetArrayFromImage(seg_b)
    assert a.any()
    # Same physical voxel, same label: what is on the patient's left stays on the patient's left.
    np.testing.assert_array_equal(b[:, :, ::-1], a)


def test_oblique_direction_round_trips_exactly(openkbp: Path) -> None:
    image = read_volume(openkbp / "pt_1_ct.nii.gz")
    angle = np.radians(20)
    image.SetDirection((np.cos(angle), -np.sin(angle), 0, np.sin(angle), np.cos(angle), 0, 0, 0, 1))
    canonical = to_canonical(image)
    back = from_canonical(canonical, image)
    assert Geometry.of(back).matches(Geometry.of(image))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(image))


def test_oblique_nifti_contour_keeps_its_geometry(model_bundle: Path, openkbp: Path, tmp_path: Path) -> None:
    image = read_volume(openkbp / "pt_203_ct.nii.gz")
    angle = np.radians(-15)
    image.SetDirection((1, 0, 0, 0, np.cos(angle), -np.sin(angle), 0, np.sin(angle), np.cos(angle)))
    sitk.WriteImage(image, str(tmp_path / "oblique.nii.gz"))
    segmentation, _ = _contour(tmp_path / "oblique.nii.gz", model_bundle, tmp_path / "out")
    assert Geometry.of(segmentation).matches(Geometry.of(read_volume(tmp_path / "oblique.nii.gz")))


def test_postprocess_keeps_the_largest_part_and_fills_holes() -> None:
    labels = np.zeros((3, 20, 20), np.uint8)
    labels[:, 2:12, 2:12] = 1
    labels[1, 6:8, 6:8] = 0  # a hole
    labels[:, 16:18, 16:18] = 1  # a stray island
    labels[:, 14:16, 2:4] = 2
    out = postprocess(labels, [1, 2], largest_component=True, fill_holes=True)
    assert out[1, 6, 6] == 1 and not (out[:, 16:18, 16:18] == 1).any()
    assert (out == 2).sum() == (labels == 2).sum()


def test_unknown_model_names_list_the_folders(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("SEPAREG_MODELS", str(tmp_path))
    with pytest.raises(InputError, match=r"nor a known model name \(known: .*hn-oar-7.*folders searched"):
        resolve_model("hn-oar-8")
    assert resolve_model("hn-oar-7").parent.name == "models"  # the shipped one
    (tmp_path / "hn-oar-7.separeg").write_bytes(b"x")
    assert resolve_model("hn-oar-7") == tmp_path / "hn-oar-7.separeg"  # a user model hides a shipped one


def test_contour_writes_rtstruct_and_seg_referencing_the_input_series(model_bundle: Path, openkbp: Path,
                                                                      lung1_subset: Path, tmp_path: Path) -> None:
    from separeg.io.dicom_ct import read_ct_series
    from separeg.rt.rtstruct import read_rtstruct
    from separeg.rt.seg import read_seg

    # A DICOM series: the exports reference it; no CT is written.
    out = tmp_path / "dicom"
    result = run_contour(ContourJob(volume=lung1_subset, model=str(model_bundle), out_dir=out, device="cpu",
                                    rtstruct=True, seg=True))
    ct = read_ct_series(lung1_subset)
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(result.segmentation)))
    table = load_label_table(openkbp / "labels.json")
    manifest = json.loads((out / "export.json").read_text())
    assert manifest["referenced_series_instance_uid"] == ct.series_instance_uid and not (out / "ct_dicom").exists()
    assert manifest["algorithm"]["bundle_sha256"] == json.loads((out / LABELS_FILE).read_text())["model"]["sha256"]
    assert (out / "rtstruct.dcm").exists() and read_rtstruct(out / "rtstruct.dcm", ct) is not None
    if labels.any():
        assert np.array_equal(read_seg(result.exports["seg"], ct).to_labelmap(table)[0], labels)
    else:
        assert "seg" not in result.exports and manifest["skipped"] == {"seg": "the label map is empty"}
    # A NIfTI CT: written as a new DICOM series first, which the exports reference.
    out = tmp_path / "nifti"
    result = run_contour(ContourJob(volume=openkbp / "pt_1_ct.nii.gz", model=str(model_bundle), out_dir=out,
                                    device="cpu", seg=True, patient_name="Test^Contour"))
    assert set(result.exports) == {"ct_dicom", "seg"}
    ct = read_ct_series(out / "ct_dicom")
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(result.segmentation)))
    assert np.array_equal(read_seg(out / "seg.dcm", ct).to_labelmap(table)[0], labels)


# ------------------------------------------------------------------------------ the fast path (issue 24) vs the old one


def test_upsampled_argmax_equals_the_argmax_of_resampled_logits() -> None:
    import torch.nn.functional as F

    from separeg.segment.inference import upsampled_argmax

    torch.manual_seed(0)
    for coarse, fine in (((32, 32), (128, 128)), ((25, 23), (83, 75)), ((16, 16), (10, 13)), ((5, 7), (5, 21))):
        logits = F.interpolate(torch.randn(3, 8, coarse[0] // 3 + 2, coarse[1] // 3 + 2) * 3, size=coarse,
                               mode="bilinear")  # smooth, like a network's: organs with borders
        expected = F.interpolate(logits, size=fine, mode="bilinear", align_corners=False).argmax(1)
        for layout in (torch.contiguous_format, torch.channels_last):
            labels = upsampled_argmax(logits.contiguous(memory_format=layout), fine, chunk=1000)
            assert labels.dtype == torch.uint8 and labels.shape == (3, *fine)
            assert torch.equal(labels.long(), expected), (coarse, fine)


def test_postprocess_in_bounding_boxes_equals_the_whole_volume() -> None:
    from separeg.segment.contour_legacy import _postprocess_legacy

    rng = np.random.default_rng(0)
    labels = np.zeros((12, 40, 40), np.uint8)
    for value in (1, 2, 3):
        for _ in range(4):  # blobs, some touching the volume's border, some overlapping others
            z, y, x = rng.integers(0, [10, 34, 34])
            labels[z:z + rng.integers(1, 4), y:y + rng.integers(2, 9), x:x + rng.integers(2, 9)] = value
    labels[rng.random(labels.shape) < 0.05] = 0  # holes
    labels[0, 0:6, 0:6], labels[0, 2:4, 2:4] = 3, 0  # a ring on the border around a hole
    for largest, fill in ((True, True), (True, False), (False, True)):
        expected = _postprocess_legacy(labels, [1, 2, 3, 4], largest_component=largest, fill_holes=fill)
        np.testing.assert_array_equal(postprocess(labels, [1, 2, 3, 4], largest_component=largest,
                                                  fill_holes=fill), expected)


def _dsc_per_organ(a: np.ndarray, b: np.ndarray) -> dict[int, float]:
    from separeg.evaluate.metrics import dice

    return {v: float(dice(a == v, b == v)) for v in range(1, 256) if (a == v).any() or (b == v).any()}


def _old_and_new(volume: Path, model: str, out: Path) -> tuple[np.ndarray, np.ndarray]:
    from separeg.segment.contour_legacy import _run_contour_legacy

    arrays = []
    for name, run in (("new", run_contour), ("old", _run_contour_legacy)):
        result = run(ContourJob(volume=volume, model=model, out_dir=out / name, device="cpu"))
        segmentation = sitk.ReadImage(str(result.segmentation))
        assert Geometry.of(segmentation).matches(Geometry.of(read_volume(volume)))
        arrays.append(sitk.GetArrayFromImage(segmentation))
    return arrays[0], arrays[1]


def test_the_fast_path_agrees_with_the_old_one(openkbp: Path, tmp_path: Path) -> None:
    """Issue 24: the shipped model's first network (v2, the model the paths were compared with) on two validation
    patients, and on one resampled to 1 mm pixels (the logits go from the 3.9 mm model grid to 500 x 500 slices):
    per-organ DSC >= 0.99 between the old and the new path."""
    one_mm = read_volume(openkbp / "pt_209_ct.nii.gz")[:, :, 40:88]  # 48 slices with the organs: a quick test
    size = [round(n * s) for n, s in zip(one_mm.GetSize()[:2], one_mm.GetSpacing()[:2], strict=True)]
    one_mm = sitk.Resample(one_mm, [*size, one_mm.GetSize()[2]], sitk.Transform(), sitk.sitkLinear,
                           one_mm.GetOrigin(), (1.0, 1.0, one_mm.GetSpacing()[2]), one_mm.GetDirection(), -1000)
    sitk.WriteImage(one_mm, str(tmp_path / "pt_209_1mm.nii.gz"))
    from separeg.runtime.bundle import load_bundle, save_bundle
    from separeg.segment.ensemble import member_bundle

    first = member_bundle(load_bundle(resolve_model("hn-oar-7")), 0)  # one network: the paths, not the ensemble
    model = save_bundle(tmp_path / "first.separeg", kind="segmentation", architecture=first.architecture,
                        state_dict=first.state_dict, metadata=first.metadata)
    for volume in (openkbp / "pt_203_ct.nii.gz", openkbp / "pt_209_ct.nii.gz", tmp_path / "pt_209_1mm.nii.gz"):
        new, old = _old_and_new(volume, str(model), tmp_path / f"out_{volume.name}")
        scores = _dsc_per_organ(new, old)
        assert len(scores) >= 4 and min(scores.values()) >= 0.99, (volume.name, scores)


def test_a_25d_model_contours_with_its_context_slices(openkbp: Path, tmp_path: Path, monkeypatch) -> None:
    """A model with k = 1 context slices (3 input channels): the network sees exactly the old path's input
    (model_input of the whole volume), though the new one resamples chunks of slices and stacks the context on the
    model grid; fp32 on both paths, so the labels differ by rounding at most."""
    monkeypatch.setattr("separeg.runtime.training.cpu_has_bf16", lambda: False)
    torch.manual_seed(0)
    table = load_label_table(openkbp / "labels.json")
    spec = GridSpec(spacing_xy=(7.8, 7.8), context_slices=1)
    assert spec.network_channels == 3
    unet = build_unet("resnet18-slim", max(table.values) + 1, spec.network_channels)
    model = save_bundle(tmp_path / "k1.separeg", kind="segmentation",
                        architecture={"network": "monai.networks.nets.FlexibleUNet", "backbone": "resnet18-slim",
                                      "spatial_dims": 2, "in_channels": 3, "out_channels": max(table.values) + 1},
                        state_dict=unet.state_dict(), metadata={"inputs": {**spec.to_dict(), "orientation": "LPS"},
                                                                "labels": table.to_dict()})
    inputs: list[torch.Tensor] = []

    def recording(*args, **kwargs):
        network = build_unet(*args, **kwargs)
        forward = network.forward
        network.forward = lambda x: inputs.append(x.clone()) or forward(x)
        return network

    monkeypatch.setattr("separeg.segment.network.build_unet", recording)
    volume = tmp_path / "pt_203_part.nii.gz"
    sitk.WriteImage(read_volume(openkbp / "pt_203_ct.nii.gz")[:, :, 50:90], str(volume))  # 40 slices: 3 chunks
    new, old = _old_and_new(volume, str(model), tmp_path / "out")
    batches = -(-40 // CPU_BATCH)  # new: batches of CPU_BATCH slices; old: one slice at a time
    assert len(inputs) == batches + 40
    fed_new, fed_old = torch.cat(inputs[:batches]), torch.cat(inputs[batches:])
    assert fed_new.shape == (40, 3, 64, 64) and torch.equal(fed_new, fed_old)
    assert not torch.equal(fed_new[:, 0], fed_new[:, 1])  # the neighbours are there
    assert (new == old).mean() >= 0.999


def test_an_ensemble_averages_its_members_probabilities(model_bundle: Path, openkbp: Path, tmp_path: Path) -> None:
    """``--ensemble``: the members' softmax probabilities averaged (a model with itself gives its own labels, with
    another seed something between the two); members with other organs are refused."""
    from separeg.runtime.bundle import load_bundle
    from separeg.segment.ensemble import ModelEnsemble

    volume = tmp_path / "part.nii.gz"
    sitk.WriteImage(read_volume(openkbp / "pt_203_ct.nii.gz")[:, :, 60:76], str(volume))
    single, _ = _contour(volume, model_bundle, tmp_path / "single")
    run_contour(ContourJob(volume=volume, model=str(model_bundle), out_dir=tmp_path / "twice", device="cpu",
                           ensemble=(str(model_bundle),)))
    twice = sitk.ReadImage(str(tmp_path / "twice" / SEGMENTATION_FILE))
    assert np.array_equal(sitk.GetArrayFromImage(single), sitk.GetArrayFromImage(twice))
    described = json.loads((tmp_path / "twice" / LABELS_FILE).read_text())["model"]["ensemble"]
    assert [m["sha256"] for m in described] == [load_bundle(model_bundle).weights_sha256]
    torch.manual_seed(1)
    a, b = build_unet("resnet18", 3).eval(), build_unet("resnet18", 3).eval()
    x = torch.randn(2, 1, 64, 64)
    expected = (a(x).softmax(1) + b(x).softmax(1)) / 2
    torch.testing.assert_close(ModelEnsemble([a, b])(x).exp(), expected, atol=1e-5, rtol=1e-4)
    bundle = load_bundle(model_bundle)
    other = save_bundle(tmp_path / "other.separeg", kind="segmentation", architecture=bundle.architecture,
                        state_dict=bundle.state_dict,
                        metadata={**bundle.metadata, "labels": load_label_table(openkbp / "labels.json").to_dict()
                                  | {"labels": bundle.metadata["labels"]["labels"][::-1]}})
    with pytest.raises(InputError, match="other organs"):
        run_contour(ContourJob(volume=volume, model=str(model_bundle), out_dir=tmp_path / "bad", device="cpu",
                               ensemble=(str(other),)))


def test_a_packed_ensemble_contours_like_its_members_given_at_contour_time(model_bundle: Path, openkbp: Path,
                                                                           tmp_path: Path) -> None:
    """``separeg pack --ensemble``: one bundle holding both members gives the labels of ``contour --ensemble``;
    fine-tuning from it continues its first member (:func:`member_bundle`)."""
    from separeg.cli import main
    from separeg.runtime.bundle import load_bundle

    torch.manual_seed(2)
    bundle = load_bundle(model_bundle)
    other = save_bundle(tmp_path / "seed2.separeg", kind="segmentation", architecture=bundle.architecture,
                        state_dict=build_unet("resnet18", bundle.architecture["out_channels"]).state_dict(),
                        metadata=bundle.metadata)
    packed = tmp_path / "ensemble.separeg"
    assert main(["pack", str(model_bundle), "--ensemble", str(other), "--out", str(packed)]) == 0
    assert len(load_bundle(packed).architecture["members"]) == 2
    volume = tmp_path / "part.nii.gz"
    sitk.WriteImage(read_volume(openkbp / "pt_203_ct.nii.gz")[:, :, 60:76], str(volume))
    given, _ = _contour(volume, packed, tmp_path / "packed")
    run_contour(ContourJob(volume=volume, model=str(model_bundle), out_dir=tmp_path / "given", device="cpu",
                           ensemble=(str(other),)))
    expected = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "given" / SEGMENTATION_FILE)))
    assert np.array_equal(sitk.GetArrayFromImage(given), expected)
    from separeg.segment.ensemble import member_bundle

    first = member_bundle(load_bundle(packed), 0)
    assert first.architecture == bundle.architecture and all(
        torch.equal(first.state_dict[k], v) for k, v in bundle.state_dict.items())
