"""Issue 30 C: the demo report counts an organ missed in a test case (DSC 0, HD95 over the cases where it was found,
"missed 1/2") instead of showing the other case's HD95 as the organ's."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from separeg.evaluate.job import EvaluateJob, run_evaluate
from separeg.experiments.demo import _organ_rows, _report


def _write(array: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = sitk.GetImageFromArray(array.astype(np.uint8))
    image.SetSpacing((2.0, 2.0, 2.0))
    sitk.WriteImage(image, str(path))


def test_the_demo_report_counts_a_missed_organ(tmp_path: Path) -> None:
    ref = np.zeros((20, 20, 20), np.uint8)
    ref[2:8, 2:8, 2:8] = 1
    ref[10:16, 10:16, 10:16] = 2
    for case in ("pt_a", "pt_b"):
        _write(ref, tmp_path / "ref" / f"{case}.nii.gz")
    _write(ref, tmp_path / "pred" / "pt_a.nii.gz")
    _write(np.where(ref == 2, 0, ref), tmp_path / "pred" / "pt_b.nii.gz")  # pt_b misses the cord
    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps({"1": "Brainstem", "2": "SpinalCord"}))
    result = run_evaluate(EvaluateJob(pred=tmp_path / "pred", ref=tmp_path / "ref", out_dir=tmp_path / "eval",
                                      labels=labels))
    rows = _organ_rows(result)
    cord = rows["organs"]["SpinalCord"]
    assert cord["dsc_percent"] == 50.0 and cord["n"] == 2 and cord["n_missed"] == 1 and cord["n_hd95"] == 1
    report = _report({"cases": {}, "starter": {"model": "hn-oar-7", "seconds": [1.0, 1.0], **rows},
                      "split": {"train": ["pt_1"], "validation": "pt_22", "test": ["pt_a", "pt_b"]},
                      "segmentation": {"shipped": {**rows, "not_contoured": ["Esophagus"]}}})
    assert "| SpinalCord | 50.0 | 0.0 (1 of 2 cases) | 1/2 |" in report  # before: "| SpinalCord | 50.0 | 0.0 |"
    assert "| Brainstem | 100.0 | 0.0 | 0/2 |" in report and "| All organs | 75.0 | 0.0 | 1/4 |" in report
    assert "| shipped | 100.0 (0.0), missed 0/2 | 50.0 (0.0), missed 1/2 | 75.0 (0.0), missed 1/4 |" in report
    assert "a reference holding one counts a miss: shipped: Esophagus." in report  # left out by contour, said so
