"""Output folders of `contour` and `export`: a file, an unwritable folder or a folder another run is writing into
is refused before any work, naming the user's path."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from separeg.rt.export import ExportJob, run_export
from separeg.runtime.errors import InputError
from separeg.runtime.outdir import check_output_folder, output_folder
from separeg.runtime.runlock import LOCK_FILE, RunLockedError


@pytest.fixture()
def case(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A small CT file, a label map on it and a label table."""
    ct = sitk.GetImageFromArray(np.full((4, 16, 16), -1000, np.int16))
    sitk.WriteImage(ct, str(tmp_path / "ct.nrrd"))
    labelmap = np.zeros((4, 16, 16), np.uint8)
    labelmap[1:3, 4:9, 4:9] = 1
    lm = sitk.GetImageFromArray(labelmap)
    sitk.WriteImage(lm, str(tmp_path / "lm.nrrd"))
    (tmp_path / "labels.csv").write_text("value,name\n1,Heart\n")
    return tmp_path / "ct.nrrd", tmp_path / "lm.nrrd", tmp_path / "labels.csv"


def test_an_out_that_is_a_file_is_refused_up_front(case, tmp_path: Path) -> None:
    ct, lm, labels = case
    (tmp_path / "taken").write_text("x")
    with pytest.raises(InputError, match=f"--out {tmp_path / 'taken'} is a file"):
        run_export(ExportJob(labelmap=lm, ct=ct, out_dir=tmp_path / "taken", labels=labels))
    with pytest.raises(InputError, match="cannot be created: .*taken is a file"):
        check_output_folder(tmp_path / "taken" / "sub")
    # contour: refused before the model is even looked up (a model name that does not exist).
    run = subprocess.run([sys.executable, "-m", "separeg.cli", "contour", str(ct), "--model", "no-such-model",
                          "--out", str(tmp_path / "taken")], capture_output=True, text=True, timeout=120)
    assert run.returncode == 1 and f"{tmp_path / 'taken'} is a file" in run.stderr + run.stdout
    assert "no-such-model" not in run.stderr + run.stdout


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_out_is_refused_up_front(case, tmp_path: Path) -> None:
    ct, lm, labels = case
    locked = tmp_path / "ro"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        with pytest.raises(InputError, match=f"--out {locked}: no permission"):
            run_export(ExportJob(labelmap=lm, ct=ct, out_dir=locked, labels=labels))
    finally:
        locked.chmod(0o755)


def test_a_second_run_into_one_out_is_refused_and_no_lock_file_is_left(case, tmp_path: Path) -> None:
    ct, lm, labels = case
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time\nfrom separeg.runtime.outdir import output_folder\n"
        f"with output_folder({str(out)!r}):\n    print('held', flush=True)\n    time.sleep(60)\n")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunLockedError, match=f"--out {out} is being written by another separeg run: PID "
                                                 f"{holder.pid}"):
            run_export(ExportJob(labelmap=lm, ct=ct, out_dir=out, labels=labels))
    finally:
        holder.kill()
        holder.wait()
    start = time.perf_counter()
    result = run_export(ExportJob(labelmap=lm, ct=ct, out_dir=out, labels=labels))
    assert result.outputs and time.perf_counter() - start < 60
    assert not (out / LOCK_FILE).exists() and not list(out.glob(".separeg-write-test-*"))
    with output_folder(tmp_path / "unused"):
        pass
    assert not (tmp_path / "unused").exists()  # a folder the run created and left empty is removed


# ------------------------------------------------------------------ one folder, one result (issue 30, finding 7)


def _dicom_case(tmp_path: Path) -> tuple[Path, Path]:
    """Another patient: a small DICOM CT series and a label map on its grid (spacing 1 x 1 x 2 mm)."""
    from test_dicom_ct import write_series

    write_series(tmp_path / "other_ct", np.full((4, 16, 16), -1000), patient_id="OTHER")
    labelmap = np.zeros((4, 16, 16), np.uint8)
    labelmap[1:3, 6:12, 6:12] = 1
    image = sitk.GetImageFromArray(labelmap)
    image.SetSpacing((1.0, 1.0, 2.0))
    sitk.WriteImage(image, str(tmp_path / "other_lm.nrrd"))
    return tmp_path / "other_ct", tmp_path / "other_lm.nrrd"


def _earlier_result(case, out: Path) -> None:
    """What an earlier export left: the CT written as DICOM, RTSTRUCT, SEG, export.json; and a file of the user's."""
    ct, lm, labels = case
    run_export(ExportJob(labelmap=lm, ct=ct, out_dir=out, labels=labels, formats=("rtstruct", "seg")))
    assert {"ct_dicom", "rtstruct.dcm", "seg.dcm", "export.json"} <= {p.name for p in out.iterdir()}
    (out / "notes.txt").write_text("the planner's notes")


def test_a_reused_out_keeps_no_file_of_the_earlier_patient(case, tmp_path: Path) -> None:
    """Before: the second export left the first patient's seg.dcm and ct_dicom/ beside the second's RTSTRUCT."""
    import json

    _, _, labels = case
    out = tmp_path / "out"
    _earlier_result(case, out)
    other_ct, other_lm = _dicom_case(tmp_path)
    run_export(ExportJob(labelmap=other_lm, ct=other_ct, out_dir=out, labels=labels, formats=("rtstruct",)))
    assert sorted(p.name for p in out.iterdir()) == ["export.json", "notes.txt", "rtstruct.dcm"]
    assert json.loads((out / "export.json").read_text())["outputs"] == {"rtstruct": "rtstruct.dcm"}
    # The folder `contour` wrote, exported into: the label map and its description are inputs, kept.
    sitk.WriteImage(sitk.ReadImage(str(other_lm)), str(out / "segmentation.nii.gz"))
    (out / "segmentation.json").write_text('{"labels": [{"value": 1, "name": "Heart"}]}')
    run_export(ExportJob(labelmap=out / "segmentation.nii.gz", ct=other_ct, out_dir=out, formats=("seg",)))
    assert sorted(p.name for p in out.iterdir()) == ["export.json", "notes.txt", "seg.dcm", "segmentation.json",
                                                     "segmentation.nii.gz"]


def test_a_run_that_fails_while_writing_leaves_no_half_result(case, tmp_path: Path, monkeypatch) -> None:
    import separeg.rt.rtstruct_write as rtstruct_write

    _, _, labels = case
    out = tmp_path / "out"
    _earlier_result(case, out)
    other_ct, other_lm = _dicom_case(tmp_path)

    def fail(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(rtstruct_write, "write_rtstruct", fail)
    with pytest.raises(OSError):
        run_export(ExportJob(labelmap=other_lm, ct=other_ct, out_dir=out, labels=labels, formats=("seg", "rtstruct")))
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]  # not this run's seg.dcm beside nothing


def test_contour_into_a_reused_out_replaces_the_earlier_result(case, tmp_path: Path) -> None:
    import torch

    from separeg.cli import main
    from separeg.rt.labels import LabelTable
    from separeg.runtime.bundle import save_bundle
    from separeg.segment.network import GridSpec, build_unet

    out = tmp_path / "out"
    _earlier_result(case, out)
    other_ct, _ = _dicom_case(tmp_path)
    torch.manual_seed(0)
    model = save_bundle(tmp_path / "tiny.separeg", kind="segmentation",
                        architecture={"network": "monai.networks.nets.FlexibleUNet", "backbone": "resnet18",
                                      "spatial_dims": 2, "in_channels": 1, "out_channels": 2},
                        state_dict=build_unet("resnet18", 2).state_dict(),
                        metadata={"inputs": {**GridSpec(spacing_xy=(1.0, 1.0)).to_dict(), "orientation": "LPS"},
                                  "labels": LabelTable.from_names(["Heart"]).to_dict()})
    assert main(["contour", str(other_ct), "--model", str(model), "--out", str(out), "--rtstruct",
                 "--device", "cpu"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["export.json", "notes.txt", "rtstruct.dcm", "segmentation.json",
                                                     "segmentation.nii.gz"]


def test_the_result_names_are_those_contour_and_export_write() -> None:
    from separeg.rt import export
    from separeg.runtime.outdir import RESULT_FILES, RESULT_FOLDERS
    from separeg.segment import contour

    assert set(RESULT_FILES) == {contour.SEGMENTATION_FILE, contour.LABELS_FILE, export.RTSTRUCT_FILE, export.SEG_FILE,
                                 export.NIFTI_FILE, export.MANIFEST_FILE}
    assert RESULT_FOLDERS == (export.CT_DICOM_DIR,)
