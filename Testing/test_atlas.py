"""Multi-atlas contouring (separeg.atlas.contour, `separeg atlas`, atlas methods of `separeg experiment`) on real
CTs."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from separeg.atlas.contour import AtlasJob, _fuse, _Fusion, run_atlas
from separeg.atlas.registration import RegistrationConfig
from separeg.cli import main
from separeg.runtime.errors import InputError

REPO = Path(__file__).resolve().parent.parent
SAMPLES = REPO / "Resources" / "SampleData"
AFFINE_ONLY = RegistrationConfig(bspline_mesh=0)


@pytest.fixture(autouse=True)
def _one_thread():
    previous = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    yield
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(previous)


def _moved_copy(case: str, folder: Path) -> tuple[Path, np.ndarray]:
    """``case``'s CT under a known affine change (5° about z, 6 % larger, 9 mm shift), on a grid of other spacing,
    origin and axis directions (y flipped); returns the CT's path and its reference labels on that grid."""
    ct = sitk.ReadImage(str(SAMPLES / f"{case}_ct.nii.gz"))
    labels = sitk.ReadImage(str(SAMPLES / f"{case}_oar.nii.gz"))
    centre = ct.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2 for s in ct.GetSize()])
    affine = sitk.AffineTransform(3)
    affine.SetCenter(centre)
    angle = np.deg2rad(5.0)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    affine.SetMatrix((rotation / 1.06).ravel().tolist())  # target -> atlas points: the patient looks 6 % larger
    affine.SetTranslation((4.0, -8.0, 3.0))
    spacing = (4.2, 4.2, 2.8)
    size = [int(round(n * s / t)) for n, s, t in zip(ct.GetSize(), ct.GetSpacing(), spacing, strict=True)]
    grid = sitk.Image(size, sitk.sitkInt16)
    grid.SetSpacing(spacing)
    grid.SetDirection((1, 0, 0, 0, -1, 0, 0, 0, 1))
    grid.SetOrigin((centre[0] - size[0] * spacing[0] / 2, centre[1] + size[1] * spacing[1] / 2,
                    centre[2] - size[2] * spacing[2] / 2))
    moved = sitk.Resample(ct, grid, affine, sitk.sitkLinear, -1000.0, sitk.sitkInt16)
    reference = sitk.Resample(labels, grid, affine, sitk.sitkNearestNeighbor, 0, labels.GetPixelID())
    folder.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(moved, str(folder / "target_ct.nii.gz"))
    return folder / "target_ct.nii.gz", sitk.GetArrayFromImage(reference)


def _atlas_folder(folder: Path, cases: dict[str, list[int]]) -> Path:
    """Atlas cases ``{name: organs hidden}``, each a copy of pt_1 (the hidden organs set to 0)."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(SAMPLES / "labels.json", folder / "labels.json")
    for name, hidden in cases.items():
        shutil.copy(SAMPLES / "pt_1_ct.nii.gz", folder / f"{name}_ct.nii.gz")
        labels = sitk.ReadImage(str(SAMPLES / "pt_1_oar.nii.gz"))
        array = sitk.GetArrayFromImage(labels)
        array[np.isin(array, hidden)] = 0
        partial = sitk.GetImageFromArray(array)
        partial.CopyInformation(labels)
        sitk.WriteImage(partial, str(folder / f"{name}_oar.nii.gz"))
    return folder


def _dsc(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float(np.logical_and(a, b).sum()) / float(a.sum() + b.sum())


def test_registering_a_case_to_a_moved_copy_recovers_its_organs(tmp_path: Path) -> None:
    target, reference = _moved_copy("pt_1", tmp_path / "target")
    atlases = _atlas_folder(tmp_path / "atlases", {"pt_1": []})
    assert main(["atlas", str(target), "--atlases", str(atlases), "--out", str(tmp_path / "out"),
                 "--workers", "1"]) == 0
    result = sitk.ReadImage(str(tmp_path / "out" / "segmentation.nii.gz"))
    image = sitk.ReadImage(str(target))
    # The output lies on the target's exact grid (flipped y axis included).
    assert result.GetSize() == image.GetSize() and result.GetSpacing() == image.GetSpacing()
    assert result.GetOrigin() == image.GetOrigin() and result.GetDirection() == image.GetDirection()
    labels = sitk.GetArrayFromImage(result)
    present = [int(v) for v in np.unique(reference) if v]
    scores = {v: _dsc(labels == v, reference == v) for v in present}
    assert present and all(score >= 0.9 for score in scores.values()), scores
    description = json.loads((tmp_path / "out" / "segmentation.json").read_text())
    assert [lb["tg263"] for lb in description["labels"]][:2] == ["Brainstem", "SpinalCord"]
    assert description["seconds"] > 0 and description["atlas"]["cases"][0]["case"] == "pt_1"
    assert description["model"]["name"] == "atlas-vote-1" and "review" in description["notice"]


def test_an_organ_hidden_in_one_atlas_is_still_labelled_and_not_outvoted(tmp_path: Path) -> None:
    target, reference = _moved_copy("pt_1", tmp_path / "target")
    atlases = _atlas_folder(tmp_path / "atlases", {"a": [4], "b": []})  # Parotid_L only in b
    result = run_atlas(AtlasJob(volume=target, atlases=atlases, out_dir=tmp_path / "out", cases=("a", "b"),
                                registration=AFFINE_ONLY, threads=1))
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(result.segmentation)))
    assert _dsc(labels == 4, reference == 4) >= 0.85
    assert result.volumes_cc["Parotid_L"] > 5
    cases = json.loads(result.labels_json.read_text())["atlas"]["cases"]
    assert [c["annotated"] for c in cases] == [[1, 2, 3, 7], [1, 2, 3, 4, 7]]
    with pytest.raises(InputError, match="not in"):
        run_atlas(AtlasJob(volume=target, atlases=atlases, out_dir=tmp_path / "x", cases=("c",)))


def _fused(method: str, votes: dict[int, list[np.ndarray]], shape: tuple[int, ...]) -> np.ndarray:
    fusion = _Fusion(method)
    for value, masks in votes.items():
        for mask in masks:
            fusion.add(value, mask)
    return _fuse(fusion, shape)


def test_fusion_votes_only_among_the_atlases_that_annotate_an_organ() -> None:
    organ = np.zeros((1, 4, 4), np.float32)
    organ[0, :2] = 1.0
    other = np.zeros_like(organ)
    other[0, 1:3] = 1.0
    # Organ 1 is annotated by one atlas of three: it is labelled there, not outvoted by the other two.
    for method in ("vote", "staple"):
        labels = _fused(method, {1: [organ], 2: [other, other, np.zeros_like(other)]}, organ.shape)
        assert (labels[0, 0] == 1).all() and (labels[0, 3] == 0).all()
        assert (labels[0, 1] == 1).all()  # a tie between organs: the lower value
        assert (labels[0, 2] == 2).all()  # 2 of 3 atlases
    labels = _fused("vote", {2: [other, np.zeros_like(other), np.zeros_like(other)]}, organ.shape)
    assert not labels.any()  # 1 of 3: no majority


def test_an_atlas_method_runs_in_the_experiment_harness(tmp_path: Path) -> None:
    config = {
        "name": "tiny atlas", "data": str(SAMPLES), "train_pool": ["pt_1", "pt_22"], "validation": ["pt_16"],
        "test": ["pt_5"], "train_sizes": [1], "hide_fraction": 0.5, "device": "cpu",
        "methods": [{"name": "Atlas", "atlas": {"fusion": "vote", "bspline_mesh": 0, "threads": 1}}],
    }
    path = tmp_path / "experiment.json"
    path.write_text(json.dumps(config))
    out = tmp_path / "out"
    assert main(["experiment", str(path), "--out", str(out)]) == 0
    run = out / "runs" / "Atlas" / "n1_d0"
    rows = list(csv.DictReader(open(run / "metrics.csv", encoding="utf-8")))
    assert {r["case"] for r in rows} == {"pt_5"} and len(rows) == 7
    seconds = json.loads((run / "seconds.json").read_text())
    assert set(seconds) == {"pt_5"} and seconds["pt_5"] > 0
    assert json.loads((run / "run.json").read_text())["atlas"]["fusion"] == "vote"
    assert not (run / "finetune").exists()
    report = (out / "results.md").read_text()
    assert "| Atlas |" in report and "seconds per test case (n=1)" in report
    rows = list(csv.DictReader(open(out / "results.csv", encoding="utf-8")))
    assert rows and float(rows[0]["seconds_mean"]) > 0
    path.write_text(json.dumps({**config, "methods": [{"name": "Atlas", "atlas": {}, "pretrain": {}}]}))
    assert main(["experiment", str(path), "--out", str(tmp_path / "bad")]) == 1


def test_a_registration_without_overlap_is_handled_not_a_crash(tmp_path: Path, monkeypatch) -> None:
    """ITK's "all samples map outside the moving image" (an OpenKBP pair of the pool did it in the B-spline stage):
    the B-spline stage falls back to the affine registration; a linear stage leaves that atlas out with a warning;
    no atlas left is a clear error, never an internal one."""
    import SimpleITK

    from separeg.runtime.events import Events

    target, reference = _moved_copy("pt_1", tmp_path / "target")
    atlases = _atlas_folder(tmp_path / "atlases", {"a": [], "b": []})
    execute = SimpleITK.ImageRegistrationMethod.Execute
    failing = {"stage": "B-spline", "calls": 0}  # per atlas: translation search, similarity, affine, B-spline

    def no_overlap(method, fixed, moving):
        failing["calls"] += 1
        if (failing["stage"] == "B-spline" and failing["calls"] % 4 == 0) or (
                failing["stage"] == "similarity" and failing["calls"] % 2 == 0):
            raise RuntimeError("ITK ERROR: MattesMutualInformationImageToImageMetricv4: All samples map outside "
                               "moving image buffer. The images do not sufficiently overlap.")
        return execute(method, fixed, moving)

    monkeypatch.setattr(SimpleITK.ImageRegistrationMethod, "Execute", no_overlap)
    result = run_atlas(AtlasJob(volume=target, atlases=atlases, out_dir=tmp_path / "affine", cases=("a",),
                                threads=1))
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(result.segmentation)))
    assert _dsc(labels == 7, reference == 7) >= 0.8  # the affine registration carried the mandible
    failing.update(stage="similarity", calls=0)  # each atlas: search (call 1) then similarity (call 2) fails
    warnings = []
    events = Events(lambda e: warnings.append(e.msg or ""), min_interval=0.0)
    with pytest.raises(InputError, match="no atlas could be registered"):
        run_atlas(AtlasJob(volume=target, atlases=atlases, out_dir=tmp_path / "none", cases=("a", "b"), threads=1),
                  events)
    assert sum("left out: the similarity registration found no overlap" in w for w in warnings) == 2
