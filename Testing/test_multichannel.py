"""Multichannel inputs (co-registered MRI sequences, CT + PET): channels, normalisation, co-registration, and 2- and
3-channel cases through pretraining -> fine-tuning -> contouring.

No real multi-sequence case is available here: the extra channels are monotone intensity transforms of a real
OpenKBP CT (an "MR-like" square root and a logarithm), one of them stored on a coarser grid. These tests check
shapes, plumbing and errors, not multimodal accuracy.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from separeg.io.channels import Channel, co_register, normalise, normalise_channels, parse_channels
from separeg.pretrain.config import PretrainConfig, PretrainJob
from separeg.pretrain.stages import run_pretrain
from separeg.rt.labels import load_label_table
from separeg.runtime.bundle import load_bundle
from separeg.runtime.errors import InputError
from separeg.segment.case_loading import load_case
from separeg.segment.cases import find_cases, read_case_list
from separeg.segment.contour import ContourJob, run_contour
from separeg.segment.finetune.train import FinetuneConfig, FinetuneJob, run_finetune

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "Resources" / "SampleData"
CHANNEL_TEXT = {2: "CT,T2", 3: "CT,T2:zscore,STIR"}


def _slab(path: Path, z0: int = 30, z1: int = 54) -> sitk.Image:
    """24 axial slices of a sample CT (enough for every organ near the mandible, small enough to be quick)."""
    return sitk.ReadImage(str(path))[:, :, z0:z1]


def _mr_like(ct: sitk.Image, kind: int) -> sitk.Image:
    """A monotone transform of the CT's intensities, as a float image on the same grid."""
    hu = sitk.GetArrayFromImage(ct).astype(np.float32)
    tissue = np.clip(hu + 1024.0, 0.0, None)
    image = sitk.GetImageFromArray(np.sqrt(tissue) * 20.0 if kind == 1 else np.log1p(tissue) * 150.0)
    image.CopyInformation(ct)
    return image


def _coarser(image: sitk.Image) -> sitk.Image:
    """The same volume on a grid with twice the in-plane spacing (a channel acquired at another resolution)."""
    size = [image.GetSize()[0] // 2, image.GetSize()[1] // 2, image.GetSize()[2]]
    spacing = [image.GetSpacing()[0] * 2, image.GetSpacing()[1] * 2, image.GetSpacing()[2]]
    origin = np.array(image.GetOrigin()) + np.array(image.GetDirection()).reshape(3, 3) @ np.array(
        [image.GetSpacing()[0] / 2, image.GetSpacing()[1] / 2, 0.0])
    return sitk.Resample(image, size, sitk.Transform(), sitk.sitkLinear, origin.tolist(), spacing,
                         image.GetDirection(), 0.0, sitk.sitkFloat32)


@pytest.fixture(scope="module", params=[2, 3], ids=["2ch", "3ch"])
def dataset(request, tmp_path_factory) -> tuple[int, Path]:
    """nnU-Net layout: imagesTr/<case>_000k + labelsTr/<case>, for pt_22 and pt_1, with ``n`` channels."""
    n = request.param
    root = tmp_path_factory.mktemp(f"mc{n}")
    (root / "imagesTr").mkdir()
    (root / "labelsTr").mkdir()
    for case in ("pt_22", "pt_1"):
        ct = _slab(SAMPLE / f"{case}_ct.nii.gz")
        sitk.WriteImage(ct, str(root / "imagesTr" / f"{case}_0000.nii.gz"))
        for k in range(1, n):
            extra = _mr_like(ct, k)
            sitk.WriteImage(_coarser(extra) if k == 1 else extra, str(root / "imagesTr" / f"{case}_{k:04d}.nii.gz"))
        sitk.WriteImage(_slab(SAMPLE / f"{case}_oar.nii.gz"), str(root / "labelsTr" / f"{case}.nii.gz"))
    shutil.copy(SAMPLE / "labels.json", root / "labels.json")
    return n, root


def test_channel_text_defaults_and_errors() -> None:
    ct, t2, pet = parse_channels("CT, T2, PET:zscore")
    assert (ct.normalisation, t2.normalisation, pet.normalisation) == ("window", "percentile", "zscore")
    assert parse_channels(None) == (Channel("CT"),)
    with pytest.raises(InputError, match="twice"):
        parse_channels("T1,t1")
    with pytest.raises(InputError, match="unknown normalisation"):
        parse_channels("T1:minmax")
    with pytest.raises(InputError, match="empty channel name"):
        parse_channels("T1,,T2")


def test_normalisations_map_each_scan_to_the_unit_range(pt1_hu: np.ndarray) -> None:
    pt1_hu = pt1_hu[30:54]
    window = normalise(pt1_hu, Channel("CT"))
    assert window.min() == 0.0 and window.max() == 1.0
    assert normalise(np.array([-1000.0, 0.0, 1000.0]), Channel("CT")) == pytest.approx([0.0, 0.5, 1.0])
    mr = _mr_like(sitk.GetImageFromArray(pt1_hu), 1)
    array = sitk.GetArrayFromImage(mr)
    percentile = normalise(array, Channel("T2", "percentile"))
    z = normalise(array, Channel("T2", "zscore"))
    for scaled in (percentile, z):
        assert scaled.dtype == np.float32 and 0.0 <= scaled.min() and scaled.max() <= 1.0
    # Scaling the scanner's arbitrary unit changes nothing: per-scan normalisation.
    assert normalise(array * 7.0, Channel("T2", "percentile")) == pytest.approx(percentile, abs=1e-5)
    # Monotone: brighter stays brighter.
    order = np.argsort(array.ravel()[::997])
    assert np.all(np.diff(percentile.ravel()[::997][order]) >= -1e-6)
    with pytest.raises(InputError, match="takes 2 channel"):
        normalise_channels([array], parse_channels("T1,T2"))


def test_co_register_resamples_onto_the_first_grid_and_warns_when_extents_differ() -> None:
    ct = _slab(SAMPLE / "pt_1_ct.nii.gz")
    mr = _mr_like(ct, 1)
    coarse = _coarser(mr)
    (same, resampled), warnings = co_register([ct, coarse], ["CT", "T2"])
    assert same is ct and resampled.GetSize() == ct.GetSize() and resampled.GetSpacing() == ct.GetSpacing()
    assert not warnings
    # Resampling the coarse copy back recovers the original closely inside the body.
    original, back = sitk.GetArrayFromImage(mr), sitk.GetArrayFromImage(resampled)
    inner = (slice(None), slice(20, -20), slice(20, -20))
    assert np.median(np.abs(back[inner] - original[inner])) < 0.05 * float(np.ptp(original))
    shifted = sitk.Image(coarse)
    shifted.SetOrigin((np.array(coarse.GetOrigin()) + [0.0, 0.0, 40.0]).tolist())  # 40 mm further up
    _, warnings = co_register([ct, shifted], ["CT", "T2"])
    assert len(warnings) == 1 and "different physical extent" in warnings[0] and "T2" in warnings[0]


def test_cases_group_channels_by_nnunet_names_and_case_lists(dataset: tuple[int, Path]) -> None:
    n, root = dataset
    cases, unpaired = find_cases(root)
    assert [c.name for c in cases] == ["pt_1", "pt_22"] and not unpaired
    assert [p.name for p in cases[0].images] == [f"pt_1_{k:04d}.nii.gz" for k in range(n)]
    table = load_label_table(root / "labels.json")
    loaded = load_case(cases[0], table)
    assert len(loaded.images) == n and all(im.GetSize() == loaded.image.GetSize() for im in loaded.images)
    listing = root / "cases.json"
    listing.write_text(json.dumps([{"name": "a", "image": [f"imagesTr/pt_1_{k:04d}.nii.gz" for k in range(n)],
                                    "labels": "labelsTr/pt_1.nii.gz"}]))
    (listed,) = read_case_list(listing)
    assert listed.images == cases[0].images
    csv_listing = root / "cases.csv"
    csv_listing.write_text("name,image,labels\nb," + ";".join(f"imagesTr/pt_1_{k:04d}.nii.gz" for k in range(n))
                           + ",labelsTr/pt_1.nii.gz\n")
    assert read_case_list(csv_listing)[0].images == cases[0].images


def test_pretrain_finetune_contour_with_several_channels(dataset: tuple[int, Path], tmp_path: Path) -> None:
    n, root = dataset
    archive = tmp_path / "archive"
    shutil.copytree(root / "imagesTr", archive)
    channels = CHANNEL_TEXT[n]
    config = PretrainConfig(encoder="resnet18-slim", iterations=6, batch_size=8, crop_size=32, clusters=2,
                            channels=channels, sis_channel=n - 1)
    encoder = run_pretrain(PretrainJob(archive=archive, run_dir=tmp_path / "pretrain", config=config, device="cpu"))
    bundle = load_bundle(encoder, expected_kind="encoder")
    assert bundle.architecture["in_channels"] == n
    assert [c["name"] for c in bundle.metadata["inputs"]["channels"]] == channels.replace(":zscore", "").split(",")

    tiny = FinetuneConfig(epochs=1, steps_per_epoch=2, batch_size=4, validation_cases=1, context_slices=1)
    model = run_finetune(FinetuneJob(data=root, out_dir=tmp_path / "finetune", init=encoder, config=tiny,
                                     device="cpu"))
    segmentation = load_bundle(model, expected_kind="segmentation")
    # 2.5D: each of the n channels at the slice and one neighbour on each side, in training and in contour.
    assert segmentation.architecture["in_channels"] == 3 * n and segmentation.metadata["inputs"]["context_slices"] == 1
    assert segmentation.metadata["inputs"]["channels"] == bundle.metadata["inputs"]["channels"]

    volumes = [root / "imagesTr" / f"pt_1_{k:04d}.nii.gz" for k in range(n)]
    result = run_contour(ContourJob(volume=volumes[0], channels=tuple(volumes[1:]), model=str(model),
                                    out_dir=tmp_path / "contour", device="cpu"))
    labels = sitk.ReadImage(str(result.segmentation))
    assert labels.GetSize() == sitk.ReadImage(str(volumes[0])).GetSize()

    with pytest.raises(InputError, match=f"1 volume\\(s\\) but the model takes {n} channel"):
        run_contour(ContourJob(volume=volumes[0], model=str(model), out_dir=tmp_path / "bad", device="cpu"))
    with pytest.raises(InputError, match=f"takes {n}"):
        run_finetune(FinetuneJob(data=root, out_dir=tmp_path / "mismatch", init=encoder, device="cpu",
                                 config=FinetuneConfig(epochs=1, steps_per_epoch=1, batch_size=2,
                                                       validation_cases=1, channels="CT")))


def test_a_case_with_too_few_channels_is_refused(dataset: tuple[int, Path], tmp_path: Path) -> None:
    n, root = dataset
    tiny = FinetuneConfig(encoder="resnet18-slim", epochs=1, steps_per_epoch=1, batch_size=2, validation_cases=1,
                          channels=",".join(["CT", "T2", "STIR", "PET"][: n + 1]))
    with pytest.raises(InputError, match=f"case pt_\\d+ has {n} volume\\(s\\) but the model takes {n + 1} channel"):
        run_finetune(FinetuneJob(data=root, out_dir=tmp_path / "run", config=tiny, device="cpu"))


def test_single_channel_mr_pretrain_finetune_contour(shared_data: Path, tmp_path: Path) -> None:
    """The real abdominal MR sample (TotalSegmentator's; its segmentation is model-made): the MR path without HU."""
    totalseg = shared_data / "totalseg"
    archive, data = tmp_path / "archive", tmp_path / "data"
    for folder in (archive, data / "images", data / "labels"):
        folder.mkdir(parents=True)
    shutil.copy(totalseg / "example_mr_sm.nii.gz", archive / "abdomen.nii.gz")
    shutil.copy(totalseg / "example_mr_sm.nii.gz", data / "images" / "abdomen.nii.gz")
    shutil.copy(totalseg / "example_seg_mr.nii.gz", data / "labels" / "abdomen.nii.gz")
    shutil.copy(totalseg / "labels_mr.json", data / "labels.json")
    config = PretrainConfig(encoder="resnet18-slim", iterations=6, batch_size=8, crop_size=32, clusters=2,
                            channels="MR", modality="MR")
    encoder = run_pretrain(PretrainJob(archive=archive, run_dir=tmp_path / "pretrain", config=config, device="cpu"))
    assert load_bundle(encoder).metadata["inputs"]["channels"] == [
        {"name": "MR", "normalisation": "percentile", "percentiles": [0.5, 99.5]}]
    tiny = FinetuneConfig(epochs=1, steps_per_epoch=2, batch_size=4, validation_cases=0)
    model = run_finetune(FinetuneJob(data=data, out_dir=tmp_path / "finetune", init=encoder, config=tiny,
                                     device="cpu"))
    inputs = load_bundle(model).metadata["inputs"]
    assert [c["normalisation"] for c in inputs["channels"]] == ["percentile"]
    result = run_contour(ContourJob(volume=archive / "abdomen.nii.gz", model=str(model), out_dir=tmp_path / "out",
                                    device="cpu"))
    assert sitk.ReadImage(str(result.segmentation)).GetSize() == (117, 91, 20)
    assert not any("HU" in w for w in result.warnings)  # no CT intensity check on an MR model
