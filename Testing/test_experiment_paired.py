"""The paired comparison of two experiment arms: pairing by draw and patient, the bootstrap CI and Wilcoxon p."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from separeg.experiments.paired import ALL, compare, paired_difference, per_patient


def _write_run(out: Path, method: str, draw: int, dsc: dict[str, dict[str, float | None]], seed: str = "") -> None:
    run = out / "runs" / method / f"n1_d{draw}{seed}"
    (run / "finetune").mkdir(parents=True)
    with open(run / "metrics.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["case", "name", "status", "dsc", "hd95_mm"])
        writer.writeheader()
        for case, organs in dsc.items():
            for organ, value in organs.items():
                writer.writerow({"case": case, "name": organ, "status": "missed" if value is None else "ok",
                                 "dsc": "" if value is None else value, "hd95_mm": ""})
    history = {"epochs": [{"epoch": 1, "step": 25}, {"epoch": 2, "step": 50}], "best": 0.5, "best_epoch": 2}
    (run / "finetune" / "history.json").write_text(json.dumps(history), encoding="utf-8")


def test_pairs_by_draw_and_patient_and_counts_a_missed_organ_as_zero(tmp_path: Path) -> None:
    patients = [f"p{i}" for i in range(8)]
    for draw in (0, 1):
        _write_run(tmp_path / "a", "A", draw, {p: {"Brainstem": 0.5, "Larynx": 0.3} for p in patients})
        _write_run(tmp_path / "b", "B", draw, {p: {"Brainstem": 0.6 + 0.01 * i, "Larynx": None}
                                               for i, p in enumerate(patients)})
    _write_run(tmp_path / "a", "A", 2, {p: {"Brainstem": 0.0, "Larynx": 0.0} for p in patients})  # B lacks draw 2
    a, b = per_patient(tmp_path / "a", "A", 1), per_patient(tmp_path / "b", "B", 1)
    assert a["d0"]["p0"][ALL] == pytest.approx(40.0) and b["d0"]["p0"]["Larynx"] == 0.0
    brainstem = paired_difference(a, b, "Brainstem")
    assert brainstem["n"] == 8 and brainstem["draws"] == 2  # draw 2 is not shared: left out
    assert brainstem["mean"] == pytest.approx(10.0 + 3.5)
    assert brainstem["ci95"][0] > 0 and brainstem["wilcoxon_p"] < 0.01
    overall = paired_difference(a, b)
    assert overall["mean"] == pytest.approx(((60 + 3.5) / 2) - 40.0)
    result, text = compare(tmp_path / "a", "A", tmp_path / "b", "B", 1)
    assert "| All OARs | 8 |" in text and result["peaks"]["A"][0]["best_step"] == 50


def test_no_shared_draw_gives_an_empty_comparison(tmp_path: Path) -> None:
    _write_run(tmp_path / "a", "A", 0, {"p0": {"Brainstem": 0.5}})
    assert paired_difference(per_patient(tmp_path / "a", "A", 1), {}) == {"n": 0, "runs": 0, "draws": 0, "seeds": 0}


def test_arm_means_use_only_the_shared_draws(tmp_path: Path) -> None:
    _write_run(tmp_path / "a", "A", 0, {"p0": {"Brainstem": 0.2}, "p1": {"Brainstem": 0.4}})
    _write_run(tmp_path / "a", "A", 1, {"p0": {"Brainstem": 0.9}, "p1": {"Brainstem": 0.9}})
    _write_run(tmp_path / "b", "B", 0, {"p0": {"Brainstem": 0.3}, "p1": {"Brainstem": 0.6}})
    row = paired_difference(per_patient(tmp_path / "a", "A", 1), per_patient(tmp_path / "b", "B", 1))
    assert row["a_mean"] == pytest.approx(30.0) and row["b_mean"] == pytest.approx(45.0)
    assert row["mean"] == pytest.approx(row["b_mean"] - row["a_mean"])


def test_two_runs_of_one_method_are_told_apart_by_name(tmp_path: Path) -> None:
    """Two settings of the same method (e.g. Random with two fine-tuning recipes) share a method folder name."""
    _write_run(tmp_path / "a", "Random", 0, {"p0": {"Brainstem": 0.2}, "p1": {"Brainstem": 0.4}})
    _write_run(tmp_path / "b", "Random", 0, {"p0": {"Brainstem": 0.3}, "p1": {"Brainstem": 0.6}})
    result, text = compare(tmp_path / "a", "Random", tmp_path / "b", "Random", 1, names=("Random", "Random, gentle"))
    assert "## Random, gentle − Random" in text and "| Random | Random, gentle |" in text
    assert set(result["peaks"]) == {"Random", "Random, gentle"} and all(result["peaks"].values())


def test_fine_tuning_seeds_pair_run_by_run_and_are_counted(tmp_path: Path) -> None:
    """Runs of a second seed (``n1_d0_s1``) pair with the same draw and seed of the other arm, never across seeds."""
    for seed, shift in (("", 0.0), ("_s1", 0.2)):
        for draw in (0, 1):
            _write_run(tmp_path / "a", "A", draw, {"p0": {"Brainstem": 0.2 + shift}, "p1": {"Brainstem": 0.4}}, seed)
            _write_run(tmp_path / "b", "B", draw, {"p0": {"Brainstem": 0.3 + shift}, "p1": {"Brainstem": 0.6}}, seed)
    _write_run(tmp_path / "b", "B", 0, {"p0": {"Brainstem": 0.0}, "p1": {"Brainstem": 0.0}}, "_s2")  # A lacks it
    a, b = per_patient(tmp_path / "a", "A", 1), per_patient(tmp_path / "b", "B", 1)
    assert sorted(a) == ["d0", "d0_s1", "d1", "d1_s1"] and "d0_s2" in b
    row = paired_difference(a, b, "Brainstem")
    assert (row["runs"], row["draws"], row["seeds"]) == (4, 2, 2)
    assert row["mean"] == pytest.approx((10.0 + 20.0) / 2)  # a cross-seed pairing would change p0's difference
    assert row["a_mean"] == pytest.approx((30.0 + 40.0) / 2)
    result, text = compare(tmp_path / "a", "A", tmp_path / "b", "B", 1)
    assert "2 draw(s) x 2 fine-tuning seed(s)" in text
    # p0 differs by 10 points and p1 by 20 in every run: each run's mean difference is 15
    assert result["per_run"] == pytest.approx({"d0": 15.0, "d0_s1": 15.0, "d1": 15.0, "d1_s1": 15.0})
    assert "B ahead in 4 of 4" in text
    assert result["run_level"]["mean"] == pytest.approx(15.0) and result["run_level"]["ci95"] == pytest.approx([15, 15])
