"""`run_evaluate` on real OpenKBP label maps (pt_1): itself, a copy with known damage, folders, grid mismatch."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import write_image
from separeg.evaluate.inputs import match_cases, read_labels
from separeg.evaluate.job import EvaluateJob, run_evaluate
from separeg.evaluate.metrics import STATUS_MISSED, STATUS_NOT_IN_REFERENCE, STATUS_OK
from separeg.runtime.errors import InputError
from separeg.runtime.events import Events, EventType, ListSink

BRAINSTEM, PAROTID_L = 1, 4
SHIFT = 2  # voxels along x (the array's last axis)


@pytest.fixture(scope="module")
def pt1(openkbp: Path):
    import SimpleITK as sitk

    image = sitk.ReadImage(str(openkbp / "pt_1_oar.nii.gz"))
    return image, sitk.GetArrayFromImage(image)


@pytest.fixture()
def damaged(pt1, tmp_path: Path) -> Path:
    """pt_1 with Parotid_L removed and the Brainstem moved 2 voxels along x (it overlaps no other organ there)."""
    import SimpleITK as sitk

    image, ref = pt1
    pred = ref.copy()
    pred[pred == PAROTID_L] = 0
    pred[pred == BRAINSTEM] = 0
    moved = np.zeros_like(ref, bool)
    moved[:, :, SHIFT:] = (ref == BRAINSTEM)[:, :, :-SHIFT]
    assert not (moved & (pred > 0)).any()
    pred[moved] = BRAINSTEM
    out = sitk.GetImageFromArray(pred)
    out.CopyInformation(image)
    path = tmp_path / "damaged.nii.gz"
    sitk.WriteImage(out, str(path))
    return path


def _rows(path: Path) -> dict[int, dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as f:
        return {int(row["organ"]): row for row in csv.DictReader(f)}


def test_against_itself(openkbp: Path, pt1, tmp_path: Path):
    ref = openkbp / "pt_1_oar.nii.gz"
    result = run_evaluate(EvaluateJob(ref, ref, tmp_path / "out", openkbp / "labels.json"))
    present = {int(v) for v in np.unique(pt1[1]) if v}
    assert present == {1, 2, 3, 4, 7}
    by_organ = {r.organ: r for r in result.results}
    assert sorted(by_organ) == [1, 2, 3, 4, 5, 6, 7] and result.cases == ["pt_1_oar"] and not result.errors
    for value in present:
        assert by_organ[value].status == STATUS_OK
        assert by_organ[value].dsc == 1.0 and by_organ[value].hd95_mm == 0.0 and by_organ[value].msd_mm == 0.0
    assert by_organ[5].status == by_organ[6].status == STATUS_NOT_IN_REFERENCE
    assert by_organ[4].name == "Parotid_L" and by_organ[7].name == "Bone_Mandible"  # TG-263 names preferred
    # a voxel is 3.906 x 3.906 x 2.5 mm
    assert by_organ[BRAINSTEM].volume_ref_ml == pytest.approx(251 * 3.906 * 3.906 * 2.5 / 1000, rel=1e-4)

    for path in (result.metrics_csv, result.summary_md, result.summary_json, result.boxplots):
        assert path.is_file() and path.stat().st_size > 0
    assert result.boxplots.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = result.summary_md.read_text(encoding="utf-8")
    assert "DSC (%) mean ± SE" in md and "HD95 (mm) mean ± SE" in md
    assert "| Parotid_L | 1 | 100.0 (one case: no SE) | 0.00 (one case: no SE) |" in md and "n/a" not in md
    assert "| Esophagus | 0 |" in md
    summary = json.loads(result.summary_json.read_text(encoding="utf-8"),
                         parse_constant=lambda c: pytest.fail(f"{c} in summary.json"))  # NaN, Infinity
    assert summary["all_organs"]["dsc_mean_percent"] == 100.0 and summary["all_organs"]["n_not_in_reference"] == 2
    assert len(_rows(result.metrics_csv)) == 7


def test_known_damage_two_files(openkbp: Path, pt1, damaged: Path, tmp_path: Path):
    ref_path = openkbp / "pt_1_oar.nii.gz"
    sink = ListSink()
    result = run_evaluate(EvaluateJob(damaged, ref_path, tmp_path / "out", openkbp / "labels.json"), Events(sink))
    ref = pt1[1] == BRAINSTEM
    shifted = np.zeros_like(ref)
    shifted[:, :, SHIFT:] = ref[:, :, :-SHIFT]
    expected_dsc = 2 * (ref & shifted).sum() / (2 * ref.sum())  # 0.51: half of this thin organ stays in place
    by_organ = {r.organ: r for r in result.results}

    brainstem = by_organ[BRAINSTEM]
    assert brainstem.status == STATUS_OK and brainstem.dsc == pytest.approx(expected_dsc)
    # a translation: no surface voxel moves further than the shift, the outermost ones exactly that far
    assert brainstem.hd100_mm == pytest.approx(SHIFT * 3.906, abs=1e-3)
    assert 0 < brainstem.hd95_mm <= brainstem.hd100_mm
    assert brainstem.volume_diff_percent == pytest.approx(0.0)

    parotid = by_organ[PAROTID_L]
    assert parotid.status == STATUS_MISSED and parotid.dsc == 0.0 and parotid.hd95_mm is None
    assert parotid.volume_diff_percent == -100.0
    for value in (2, 3, 7):
        assert by_organ[value].dsc == 1.0 and by_organ[value].hd95_mm == 0.0

    rows = _rows(result.metrics_csv)
    assert rows[PAROTID_L]["status"] == "missed" and rows[PAROTID_L]["dsc"] == "0" and rows[PAROTID_L]["hd95_mm"] == ""
    assert float(rows[BRAINSTEM]["hd100_mm"]) == pytest.approx(7.812, abs=1e-3)
    summary = {o.organ: o for o in result.organs}
    assert summary[PAROTID_L].n_missed == 1 and summary[PAROTID_L].n_hd95 == 0
    assert summary[PAROTID_L].hd95_mean_mm is None and summary[PAROTID_L].dsc_mean_percent == 0.0
    # all organs, this case: the mean over its 5 evaluated organs, the missed one counting 0
    assert result.overall.dsc_mean_percent == pytest.approx(100 * (expected_dsc + 3) / 5)
    assert "| Parotid_L | 1 | 0.0 (one case: no SE) | – | 0 | -100.0 (one case: no SE) | 1 | 0 |" in \
        result.summary_md.read_text("utf-8")

    progress = sink.of_type(EventType.PROGRESS)
    assert progress[-1].stage == "evaluate" and progress[-1].step == progress[-1].total == 1


def test_folders_with_errors(openkbp: Path, damaged: Path, tmp_path: Path):
    """Two good cases; one reference without prediction, one prediction without reference, one grid mismatch."""
    pred, ref = tmp_path / "pred", tmp_path / "ref"
    pred.mkdir()
    ref.mkdir()
    pt1 = openkbp / "pt_1_oar.nii.gz"
    for name in ("a", "b", "lonely_ref", "grid"):
        shutil.copy(pt1, ref / f"{name}.nii.gz")
    shutil.copy(damaged, pred / "a.nii.gz")
    shutil.copy(pt1, pred / "b.nii.gz")
    shutil.copy(pt1, pred / "lonely_pred.nii.gz")
    shutil.copy(openkbp / "pt_6_oar.nii.gz", pred / "grid.nii.gz")
    (pred / "notes.txt").write_text("not a volume")

    result = run_evaluate(EvaluateJob(pred, ref, tmp_path / "out", openkbp / "labels.json"))
    assert result.cases == ["a", "b"]
    errors = {e.case: e.message for e in result.errors}
    assert set(errors) == {"lonely_ref", "lonely_pred", "grid"}
    assert "no prediction" in errors["lonely_ref"] and "no reference" in errors["lonely_pred"]
    assert "2.734" in errors["grid"] and "3.906" in errors["grid"]

    organs = {o.organ: o for o in result.organs}
    brainstem = [r.dsc for r in result.results if r.organ == BRAINSTEM]  # case a: shifted, case b: perfect
    mean, se = 100 * np.mean(brainstem), 100 * np.std(brainstem, ddof=1) / np.sqrt(2)
    assert organs[BRAINSTEM].n == 2 and organs[BRAINSTEM].dsc_mean_percent == pytest.approx(mean)
    assert organs[BRAINSTEM].dsc_se_percent == pytest.approx(se)
    assert organs[PAROTID_L].dsc_mean_percent == pytest.approx(50.0) and organs[PAROTID_L].n_missed == 1
    assert organs[PAROTID_L].n_hd95 == 1 and organs[PAROTID_L].hd95_se_mm is None
    assert organs[5].n == 0 and organs[5].n_not_in_reference == 2

    md = result.summary_md.read_text(encoding="utf-8")
    assert f"| Brainstem | 2 | {mean:.1f} ± {se:.1f} |" in md
    assert "## Errors" in md and "`lonely_ref`: no prediction" in md and "`grid`:" in md
    assert len(list(csv.DictReader(result.metrics_csv.open(newline="")))) == 2 * 7


def test_geometry_mismatch_two_files(openkbp: Path, tmp_path: Path):
    with pytest.raises(InputError, match="not on the same grid") as info:
        run_evaluate(EvaluateJob(openkbp / "pt_1_oar.nii.gz", openkbp / "pt_6_oar.nii.gz", tmp_path / "out"))
    assert "3.906x3.906x2.5 mm" in str(info.value) and "2.734x2.734x2.5 mm" in str(info.value)
    assert not (tmp_path / "out").exists()


def test_unlabelled_folders_fill_absent_organs(tmp_path: Path):
    """Without a labels file organs are label_<n>; one seen only in case x gets a not_in_reference row in y."""
    pred, ref = tmp_path / "pred", tmp_path / "ref"
    pred.mkdir()
    ref.mkdir()
    x = np.zeros((6, 8, 8), np.uint8)
    x[1:4, 1:4, 1:4] = 1
    x[2:5, 4:7, 4:7] = 3
    y = np.where(x == 3, 0, x).astype(np.uint8)
    for folder in (pred, ref):
        write_image(x, folder / "x.nrrd", spacing=(1.0, 1.0, 2.0))
        write_image(y, folder / "y.mha", spacing=(1.0, 1.0, 2.0))
    result = run_evaluate(EvaluateJob(pred, ref, tmp_path / "out"))
    rows = {(r.case, r.organ): r for r in result.results}
    assert sorted(rows) == [("x", 1), ("x", 3), ("y", 1), ("y", 3)]
    assert rows["y", 3].status == STATUS_NOT_IN_REFERENCE and rows["y", 3].name == "label_3"
    assert rows["x", 3].dsc == 1.0 and rows["x", 3].volume_ref_ml == pytest.approx(27 * 2.0 / 1000)
    assert {o.organ: o.n for o in result.organs} == {1: 2, 3: 1}


def test_bad_inputs(openkbp: Path, tmp_path: Path):
    pt1 = openkbp / "pt_1_oar.nii.gz"
    with pytest.raises(InputError, match="two label-map files or two folders"):
        match_cases(pt1, openkbp)
    with pytest.raises(InputError, match="does not exist"):
        match_cases(tmp_path / "nothing.nii.gz", pt1)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="holds no label map"):
        match_cases(tmp_path / "empty", openkbp)
    twice, once = tmp_path / "twice", tmp_path / "once"
    for folder in (twice, once):
        folder.mkdir()
        shutil.copy(pt1, folder / "c.nii.gz")
        shutil.copy(pt1, folder / "d.nii.gz")
    write_image(np.zeros((4, 4, 4), np.uint8), twice / "c.nrrd")
    pairs, errors = match_cases(twice, once)
    assert [p[0] for p in pairs] == ["d"] and [(e.case, "two files" in e.message) for e in errors] == [("c", True)]
    bad = tmp_path / "labels.json"
    bad.write_text('{"names": {}}')
    with pytest.raises(InputError, match="index_to_name"):
        read_labels(bad)
    assert read_labels(openkbp / "labels.json")[3] == "Parotid_R"
    bad.unlink()  # else it is found beside the maps below
    soft = write_image(np.full((4, 4, 4), 0.5, np.float32), tmp_path / "soft.nii.gz")
    with pytest.raises(InputError, match="non-integer"):
        run_evaluate(EvaluateJob(soft, soft, tmp_path / "out"))


def _save(array: np.ndarray, like, path: Path) -> Path:
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(array)
    image.CopyInformation(like)
    sitk.WriteImage(image, str(path))
    return path


def test_label_tables_of_every_form_and_unknown_values(pt1, openkbp: Path, tmp_path: Path) -> None:
    """A CSV table beside the reference names the organs; a 255 "ignore" region is refused or left out, never a
    missed organ at DSC 0 (before: organs were label_1..7 and the 255 lowered the all-organ DSC)."""
    image, ref = pt1
    (tmp_path / "ref").mkdir()
    (tmp_path / "pred").mkdir()
    marked = ref.copy()
    marked[60:70, 40:60, 40:60] = np.where(ref[60:70, 40:60, 40:60] == 0, 255, ref[60:70, 40:60, 40:60])
    _save(marked, image, tmp_path / "ref" / "pt_1.nii.gz")
    _save(ref, image, tmp_path / "pred" / "pt_1.nii.gz")
    (tmp_path / "ref" / "labels.json").write_text(json.dumps(  # the table form finetune writes and reads
        {"schema": 1, "labels": [{"value": v, "name": n} for v, n in
                                 [(1, "Brainstem"), (2, "SpinalCord"), (3, "RightParotid"), (4, "LeftParotid"),
                                  (5, "Esophagus"), (6, "Larynx"), (7, "Mandible")]]}))
    with pytest.raises(InputError, match="255 are not in the label table .*--unknown-labels ignore"):
        run_evaluate(EvaluateJob(tmp_path / "pred" / "pt_1.nii.gz", tmp_path / "ref" / "pt_1.nii.gz",
                                 tmp_path / "out"))
    sink = ListSink()
    result = run_evaluate(EvaluateJob(tmp_path / "pred", tmp_path / "ref", tmp_path / "out", unknown="ignore"),
                          Events(sink))
    tg263 = ["Brainstem", "SpinalCord", "Parotid_R", "Parotid_L", "Esophagus", "Larynx", "Bone_Mandible"]
    assert len(result.organs) >= 4 and [o.name for o in result.organs] == [tg263[o.organ - 1] for o in result.organs]
    assert result.overall.dsc_mean_percent == pytest.approx(100.0)  # the 255 region is no missed organ
    assert any("left out" in e.msg and e.level == "warning" for e in sink.of_type(EventType.LOG))
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["labels"].endswith("labels.json") and summary["unknown_labels"] == "ignore"
    # A CSV table given with --labels works the same way (evaluate used to read OpenKBP JSON only).
    (tmp_path / "table.csv").write_text("value,name\n" + "".join(f"{v},organ {v}\n" for v in range(1, 8)))
    result = run_evaluate(EvaluateJob(tmp_path / "pred", tmp_path / "ref", tmp_path / "out2", tmp_path / "table.csv",
                                      unknown="ignore"))
    assert result.organs[0].name == "organ 1"
    with pytest.raises(InputError, match="unknown-label policy"):
        EvaluateJob(tmp_path, tmp_path, tmp_path, unknown="organ")
