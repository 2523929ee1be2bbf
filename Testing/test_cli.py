from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from separeg.cli import build_parser, main
from separeg.runtime.events import Event, EventType

REPO = Path(__file__).resolve().parent.parent


def _events(stdout: str) -> list[Event]:
    return [Event.from_json(line) for line in stdout.splitlines() if line.startswith("{")]


def test_scan_prints_table_and_writes_manifest(lung1: Path, tmp_path: Path, capsys) -> None:
    assert main(["scan", str(lung1), "--out", str(tmp_path / "m.json")]) == 0
    out = capsys.readouterr().out
    assert "dicom-series" in out and "1 usable CT volume(s)" in out
    assert json.loads((tmp_path / "m.json").read_text())["counts"]["usable"] == 1


def test_scan_of_an_empty_folder_fails_with_a_message(tmp_path: Path, capsys) -> None:
    assert main(["scan", str(tmp_path)]) == 1
    assert "is empty" in capsys.readouterr().err


def test_scan_json_events_end_with_error_when_nothing_usable(shared_data: Path, tmp_path: Path, capsys) -> None:
    shutil.copy(shared_data / "totalseg" / "example_mr_sm.nii.gz", tmp_path)
    assert main(["scan", str(tmp_path), "--json"]) == 1
    events = _events(capsys.readouterr().out)
    assert events[0].type == EventType.PROGRESS and events[0].stage == "scan"
    assert events[-1].type == EventType.ERROR and "no usable CT volumes" in events[-1].msg


def test_regions_writes_overlay_stats_and_reuses_the_cache(openkbp: Path, tmp_path: Path, capsys) -> None:
    args = ["regions", str(openkbp / "pt_1_ct.nii.gz"), "--out", str(tmp_path), "--reference",
            str(openkbp / "pt_1_oar.nii.gz")]
    assert main(args) == 0
    stats = json.loads((tmp_path / "regions.json").read_text())
    assert stats["from_cache"] is False and stats["regions"] > 100
    assert set(stats["organ_coverage"]) == {"1", "2", "3", "4", "7"}
    assert (tmp_path / "overlay.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "organ coverage" in capsys.readouterr().err
    assert main(args + ["--json"]) == 0
    assert json.loads((tmp_path / "regions.json").read_text())["from_cache"] is True
    assert _events(capsys.readouterr().out)[-1].type == EventType.DONE


def test_regions_refuses_a_reference_on_another_grid(openkbp: Path, tmp_path: Path, capsys) -> None:
    args = ["regions", str(openkbp / "pt_1_ct.nii.gz"), "--out", str(tmp_path), "--reference",
            str(openkbp / "pt_6_oar.nii.gz")]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "not on the volume's grid" in err and "spacing 2.734" in err and "spacing 3.906" in err


def test_bad_arguments_exit_with_usage_error(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as info:
        main(["regions", str(tmp_path / "missing.nii.gz"), "--out", str(tmp_path)])
    assert info.value.code == 2 and "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["regions", str(tmp_path), "--out", str(tmp_path), "--n-segments", "0"])


def _contour_output(openkbp: Path, folder: Path) -> Path:
    """pt_1's OAR label map as `separeg contour` leaves it: segmentation.nii.gz + segmentation.json."""
    from separeg.rt.labels import load_label_table

    folder.mkdir()
    shutil.copy(openkbp / "pt_1_oar.nii.gz", folder / "segmentation.nii.gz")
    labels = [label.to_dict() for label in load_label_table(openkbp / "labels.json")]
    (folder / "segmentation.json").write_text(json.dumps({"model": {"name": "hn", "sha256": "ef" * 32},
                                                          "labels": labels}))
    return folder / "segmentation.nii.gz"


def test_export_writes_seg_and_manifest_with_json_events(openkbp: Path, tmp_path: Path, capsys) -> None:
    labelmap = _contour_output(openkbp, tmp_path / "contour")
    out = tmp_path / "out"
    assert main(["export", str(labelmap), "--ct", str(openkbp / "pt_1_ct.nii.gz"), "--out", str(out), "--seg",
                 "--nifti", "--patient-id", "CASE-1", "--json"]) == 0
    events = _events(capsys.readouterr().out)
    assert events[-1].type == EventType.DONE and "seg.dcm" in events[-1].msg
    assert any(e.type == EventType.LOG and "new DICOM CT series" in (e.msg or "") for e in events)
    manifest = json.loads((out / "export.json").read_text())
    assert manifest["outputs"] == {"ct_dicom": "ct_dicom", "seg": "seg.dcm", "nifti": "segmentation.nii.gz"}
    assert manifest["algorithm"]["name"] == "hn" and manifest["algorithm"]["bundle_sha256"] == "ef" * 32
    assert sorted(p.name for p in out.iterdir()) == ["ct_dicom", "export.json", "seg.dcm", "segmentation.nii.gz"]


def test_export_errors_exit_1_with_a_message(openkbp: Path, tmp_path: Path, capsys) -> None:
    labelmap = _contour_output(openkbp, tmp_path / "contour")
    out = str(tmp_path / "out")
    assert main(["export", str(labelmap), "--ct", str(openkbp / "pt_6_ct.nii.gz"), "--out", out]) == 1
    err = capsys.readouterr().err
    assert "not on the grid" in err and "spacing 2.734" in err and "spacing 3.906" in err
    assert main(["export", str(labelmap), "--ct", str(tmp_path / "nowhere"), "--out", out]) == 1
    assert "nowhere does not exist" in capsys.readouterr().err
    (tmp_path / "few.json").write_text(json.dumps({"1": "Brainstem"}))
    assert main(["export", str(labelmap), "--ct", str(openkbp / "pt_1_ct.nii.gz"), "--out", out,
                 "--labels", str(tmp_path / "few.json")]) == 1
    assert "label values 2, 3, 4, 7 that the label table does not list" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main(["export", str(labelmap), "--out", out])  # --ct is required
    assert info.value.code == 2
    assert not Path(out).exists()


def test_contour_export_flags_parse(openkbp: Path) -> None:
    from separeg.cli import build_parser

    args = build_parser().parse_args(["contour", str(openkbp / "pt_1_ct.nii.gz"), "--model", "hn", "--out", "o",
                                      "--rtstruct", "--seg", "--patient-name", "Doe^J", "--patient-id", "7"])
    assert args.rtstruct and args.seg and args.patient_name == "Doe^J" and args.patient_id == "7"


def test_demo_on_two_cases_writes_report(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    for name in ("pt_1_ct.nii.gz", "pt_1_oar.nii.gz", "pt_203_ct.nii.gz", "pt_203_oar.nii.gz", "pt_209_ct.nii.gz",
                 "pt_209_oar.nii.gz", "labels.json"):
        shutil.copy(REPO / "Resources" / "SampleData" / name, data / name)
    out = tmp_path / "out"
    # Through the module entry point, as the Slicer modules run it.
    result = subprocess.run([sys.executable, "-m", "separeg", "demo", "--data", str(data), "--out", str(out),
                             "--json", "--iterations", "6", "--epochs", "1", "--device", "cpu"], capture_output=True,
                            text=True,
                            cwd=REPO, timeout=600)
    assert result.returncode == 0, result.stderr
    assert _events(result.stdout)[-1].type == EventType.DONE
    report = (out / "report.md").read_text()
    assert "| pt_1 |" in report and "| pt_203 |" in report and "Bone_Mandible" in report
    assert sorted(p.name for p in (out / "overlays").iterdir()) == ["pt_1.png", "pt_203.png", "pt_209.png"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["cases"]["pt_1"]["organ_coverage"]["Brainstem"] > 0.95
    assert (out / "pretrain" / "encoder.separeg").exists() and (out / "pretrain" / "stage_export.done").exists()
    assert summary["split"] == {"train": ["pt_1"], "validation": "pt_203", "test": ["pt_209"]}
    for init in ("shipped", "random"):
        assert (out / init / "contours" / "pt_209" / "segmentation.nii.gz").exists()
        assert (out / init / "evaluation" / "metrics.csv").exists()
    assert "| shipped |" in report and "| random |" in report
    # Before any training: the shipped starter model contours the test case at once.
    assert summary["starter"]["model"] == "hn-oar-7" and (out / "starter" / "evaluation" / "metrics.csv").exists()
    assert "Instant Auto-contour with the shipped model" in report
    # The shipped-encoder model's contours are also exported as RTSTRUCT (+ SEG when an organ was found) on a DICOM
    # copy of the CT.
    exported = out / "shipped" / "contours" / "pt_209"
    manifest = json.loads((exported / "export.json").read_text())
    assert (exported / "rtstruct.dcm").exists() and (exported / "ct_dicom").is_dir()
    assert manifest["ct_dicom_written"] and "DICOM export of pt_209" in report
    assert not (out / "random" / "contours" / "pt_209" / "export.json").exists()


def test_demo_split_trains_on_every_organ_of_its_test_cases() -> None:
    """The demo's fine-tuned models can only find what their two training cases contour: together these must
    contour every organ of the test cases, the validation case (which picks the checkpoint) too, and the spinal
    cord over its whole length (a cord contoured only to mid-neck teaches the lower cord as background)."""
    import SimpleITK as sitk

    from separeg.experiments.demo import SAMPLE_DATA, TEST_CASES, TRAIN_CASES, VALIDATION_CASE

    def labels(case: str) -> np.ndarray:
        return sitk.GetArrayFromImage(sitk.ReadImage(str(SAMPLE_DATA / f"{case}_oar.nii.gz")))

    def organs(case: str) -> set[int]:
        return set(np.unique(labels(case)).tolist()) - {0}

    tested = set().union(*(organs(c) for c in TEST_CASES))
    assert tested <= set().union(*(organs(c) for c in TRAIN_CASES))
    assert tested <= organs(VALIDATION_CASE)
    cord = 2  # SpinalCord in labels.json
    for case in TRAIN_CASES:
        cord_slices = np.flatnonzero((labels(case) == cord).any(axis=(1, 2)))
        assert cord_slices.min() <= 8, f"{case}'s cord starts at slice {cord_slices.min()}"


def test_an_unexpected_exception_is_one_line_and_its_traceback_goes_to_a_file(monkeypatch, capsys) -> None:
    import separeg.cli as cli
    from separeg import commands

    def broken(args, events):
        raise ZeroDivisionError("division by zero\nsecond line")

    monkeypatch.setattr(commands, "run_models", broken)
    assert cli.main(["models"]) == 1
    err = capsys.readouterr().err
    assert "internal error (ZeroDivisionError: division by zero). This is a bug in separeg" in err
    assert "Traceback" not in err and "second line" not in err
    log = Path(err.split("traceback in ")[1].split()[0])
    assert "ZeroDivisionError" in log.read_text() and "Traceback" in log.read_text()
    log.unlink()


def test_finetune_reads_the_synonym_table_and_contour_takes_a_batch_size(tmp_path: Path, capsys) -> None:
    bad = tmp_path / "synonyms.json"
    bad.write_text('["not", "a", "mapping"]')
    data = REPO / "Resources" / "SampleData"
    assert main(["finetune", str(data), "--out", str(tmp_path / "run"), "--synonyms", str(bad)]) == 1
    assert "must be a JSON object" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
    args = build_parser().parse_args(
        ["contour", str(data / "pt_1_ct.nii.gz"), "--model", "m", "--out", str(tmp_path), "--batch-size", "4"])
    assert args.batch_size == 4
