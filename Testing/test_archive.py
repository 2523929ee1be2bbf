from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import write_image
from separeg.io.archive import Manifest, format_table, scan_archive
from separeg.runtime.errors import ArchiveError


def test_lung1_series_is_usable_and_paired_with_its_rtstruct(lung1: Path) -> None:
    manifest = scan_archive(lung1)
    (ct,) = manifest.usable()
    assert ct.kind == "dicom-series" and ct.modality == "CT"
    assert ct.size == [512, 512, 134] and ct.spacing[2] == pytest.approx(3.0)
    assert ct.n_files == 134
    rt = next(e for e in manifest.entries if e.kind == "rtstruct")
    assert rt.references == [ct.path] and ct.annotations == [rt.path]
    assert {e.path for e in manifest.entries if e.kind == "other"} == {"LICENSE", "info.json"}


def test_openkbp_ct_usable_labelmaps_skipped(openkbp: Path, tmp_path: Path) -> None:
    for name in ("pt_1_ct.nii.gz", "pt_1_oar.nii.gz", "pt_2_ct.nii.gz"):
        shutil.copy(openkbp / name, tmp_path / name)
    manifest = scan_archive(tmp_path)
    assert sorted(e.path for e in manifest.usable()) == ["pt_1_ct.nii.gz", "pt_2_ct.nii.gz"]
    oar = next(e for e in manifest.entries if e.path == "pt_1_oar.nii.gz")
    assert oar.kind == "labelmap" and "label map" in oar.reason


def test_bad_items_are_listed_not_fatal(openkbp: Path, lung1: Path, tmp_path: Path) -> None:
    shutil.copy(openkbp / "pt_1_ct.nii.gz", tmp_path / "good.nii.gz")
    data = (openkbp / "pt_2_ct.nii.gz").read_bytes()
    (tmp_path / "truncated.nii.gz").write_bytes(data[: len(data) // 2])
    (tmp_path / "notes.txt").write_text("hello")
    write_image(np.zeros((1, 16, 16), np.int16), tmp_path / "one_slice.nrrd")
    write_image(np.full((4, 16, 16), np.nan, np.float32), tmp_path / "nan.mha")
    dicom = tmp_path / "dicom"
    dicom.mkdir()
    good = next((lung1 / "ct").glob("*.dcm")).read_bytes()
    (dicom / "damaged.dcm").write_bytes(good[:400])  # preamble and a cut header
    manifest = scan_archive(tmp_path)
    by_path = {e.path: e for e in manifest.entries}
    assert [e.path for e in manifest.usable()] == ["good.nii.gz"]
    assert by_path["truncated.nii.gz"].status == "error" and "truncated" in by_path["truncated.nii.gz"].reason
    assert "1 slice" in by_path["one_slice.nrrd"].reason
    assert "NaN" in by_path["nan.mha"].reason
    assert by_path["notes.txt"].status == "skipped"
    damaged = [e for e in manifest.entries if e.path.startswith("dicom")]
    assert len(damaged) == 1 and damaged[0].status == "error"
    table = format_table(manifest)
    assert "truncated.nii.gz" in table and "1 usable CT volume(s)" in table


def test_mr_is_not_taken_for_ct(shared_data: Path) -> None:
    manifest = scan_archive(shared_data / "totalseg")
    assert [e.path for e in manifest.usable()] == ["example_ct_sm.nii.gz"]
    mr = next(e for e in manifest.entries if e.path == "example_mr_sm.nii.gz")
    assert mr.status == "skipped" and "--modality" in mr.reason
    with_mr = scan_archive(shared_data / "totalseg", modality="MR")
    assert [e.path for e in with_mr.usable()] == ["example_mr_sm.nii.gz"]


def test_empty_and_missing_folders(tmp_path: Path) -> None:
    with pytest.raises(ArchiveError, match="is empty"):
        scan_archive(tmp_path)
    with pytest.raises(ArchiveError, match="does not exist"):
        scan_archive(tmp_path / "missing")
    (tmp_path / "readme.txt").write_text("no scans here")
    manifest = scan_archive(tmp_path)
    with pytest.raises(ArchiveError, match="no usable CT volumes"):
        manifest.require_usable()


def test_manifest_round_trip_and_order_free_hash(openkbp: Path, tmp_path: Path) -> None:
    archive = tmp_path / "archive"
    archive.mkdir()
    for name in ("pt_1_ct.nii.gz", "pt_2_ct.nii.gz"):
        shutil.copy(openkbp / name, archive / name)
    manifest = scan_archive(archive)
    loaded = Manifest.load(manifest.save(tmp_path / "manifest.json"))
    assert loaded.entries == manifest.entries and loaded.hash == manifest.hash
    (archive / "pt_2_ct.nii.gz").rename(archive / "a_first.nii.gz")
    assert scan_archive(archive).hash == manifest.hash  # names and order do not change the data's identity
    (archive / "a_first.nii.gz").unlink()
    assert scan_archive(archive).hash != manifest.hash
