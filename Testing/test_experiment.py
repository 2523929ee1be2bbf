"""The experiment harness end to end on 3 tiny real cases (pretrain, fine-tune, contour, evaluate, report)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from separeg.cli import main
from separeg.experiments.protocol import hidden_organs, load_experiment, plan_runs
from separeg.runtime.errors import InputError

REPO = Path(__file__).resolve().parent.parent
SAMPLES = REPO / "Resources" / "SampleData"


def _config(tmp_path: Path, **changes) -> Path:
    config = {
        "name": "tiny", "data": str(SAMPLES), "train_pool": ["pt_1", "pt_22"], "validation": ["pt_16"],
        "test": ["pt_5"], "train_sizes": [1], "draws": {"1": 2}, "budget": {"pretrain": 1, "finetune": 1},
        "encoder": "resnet18", "device": "cpu", "hide_fraction": 0.5,
        "pretrain": {"iterations": 6, "crop_size": 32, "batch_size": 4, "clusters": 2},
        "finetune": {"epochs": 1, "steps_per_epoch": 2, "batch_size": 2},
        "methods": [{"name": "Random"},
                    {"name": "SepaReg", "pretrain": {"separation": "sis", "iid": True}, "finetune": {}}],
    }
    config.update(changes)
    path = tmp_path / "experiment.json"
    path.write_text(json.dumps(config))
    return path


def test_plan_is_deterministic_and_checks_the_splits(tmp_path: Path) -> None:
    cfg = load_experiment(_config(tmp_path))
    runs = plan_runs(cfg)
    assert [r.key for r in runs] == ["Random/n1_d0", "Random/n1_d1", "SepaReg/n1_d0", "SepaReg/n1_d1"]
    assert runs[0].cases == runs[2].cases  # every method sees the same draws
    assert [r.cases for r in plan_runs(cfg)] == [r.cases for r in runs]
    kept = [v for v in range(1, 8) if v not in hidden_organs(cfg, "pt_1", list(range(1, 8)))]
    assert kept and kept == [v for v in range(1, 8) if v not in hidden_organs(cfg, "pt_1", list(range(1, 8)))]
    with pytest.raises(InputError, match="both train_pool and test: pt_1"):
        load_experiment(_config(tmp_path, test=["pt_1"]))
    with pytest.raises(InputError, match="lacks <case>_ct.nii.gz"):
        load_experiment(_config(tmp_path, test=["pt_999"]))
    with pytest.raises(InputError, match="exceeds the training pool"):
        load_experiment(_config(tmp_path, train_sizes=[3]))
    with pytest.raises(InputError, match="seeds must be distinct"):
        load_experiment(_config(tmp_path, seeds=[0, 0]))


def test_fine_tuning_seeds_run_on_the_same_draws_in_their_own_folders(tmp_path: Path) -> None:
    runs = plan_runs(load_experiment(_config(tmp_path, seeds=[0, 3], methods=[{"name": "Random"}])))
    assert [r.key for r in runs] == ["Random/n1_d0", "Random/n1_d1", "Random/n1_d0_s3", "Random/n1_d1_s3"]
    assert [r.seed for r in runs] == [0, 0, 3, 3] and runs[0].cases == runs[2].cases
    unseeded = plan_runs(load_experiment(_config(tmp_path, methods=[{"name": "Random"}])))
    assert [r.cases for r in unseeded] == [r.cases for r in runs[:2]]  # the seeds do not change the draws



def test_an_archive_method_draws_its_cts_outside_x_tr_once_per_draw(tmp_path: Path) -> None:
    from separeg.experiments.protocol import _archive_draw

    cfg = load_experiment(_config(tmp_path, train_pool=["pt_1", "pt_22", "pt_16", "pt_5"], validation=["pt_203"],
                                  test=["pt_209"], methods=[{"name": "Random"}, {"name": "Archive", "archive": 2}]))
    runs = plan_runs(cfg)
    archive = next(r for r in runs if r.method.name == "Archive")
    folder = _archive_draw(cfg, archive, tmp_path / "out")
    drawn = sorted(p.name.removesuffix("_ct.nii.gz") for p in folder.iterdir())
    assert len(drawn) == 2 and not set(drawn) & set(archive.cases) and set(drawn) <= set(cfg.train_pool)
    assert _archive_draw(cfg, archive, tmp_path / "again").name == folder.name
    assert sorted(p.name for p in (tmp_path / "again" / "archives" / folder.name).iterdir()) == \
        sorted(p.name for p in folder.iterdir())  # the same CTs whenever the draw is run
    with pytest.raises(InputError, match="archive must be 1..1"):
        load_experiment(_config(tmp_path, methods=[{"name": "Archive", "archive": 4}]))


def test_an_atlas_run_for_a_later_seed_is_the_first_seeds_run(tmp_path: Path) -> None:
    from separeg.experiments.protocol import _same_as_first_seed

    cfg = load_experiment(_config(tmp_path, seeds=[0, 1], methods=[{"name": "Atlas", "atlas": {"fusion": "vote"}}]))
    first, _, later, _ = plan_runs(cfg)
    out = tmp_path / "out"
    assert not _same_as_first_seed(later, out)  # the first seed's run is not done yet
    (out / "runs" / "Atlas" / first.folder).mkdir(parents=True)
    (out / "runs" / "Atlas" / first.folder / "metrics.csv").write_text("case\n")
    assert not _same_as_first_seed(first, out) and _same_as_first_seed(later, out)
    assert (out / "runs" / "Atlas" / later.folder / "metrics.csv").read_text() == "case\n"


def test_an_ensemble_method_names_a_trained_method_and_needs_its_models(tmp_path: Path) -> None:
    from separeg.experiments.protocol import _ensemble_contourer

    methods = [{"name": "Random"}, {"name": "Random-ens2", "ensemble": {"of": "Random", "seeds": [0, 1]}}]
    cfg = load_experiment(_config(tmp_path, seeds=[0, 1], methods=methods))
    runs = [r for r in plan_runs(cfg) if r.method.name == "Random-ens2"]
    assert [r.folder for r in runs] == ["n1_d0", "n1_d1", "n1_d0_s1", "n1_d1_s1"] and runs[0].method.seedless
    with pytest.raises(InputError, match="needs Random's models first"):
        _ensemble_contourer(cfg, runs[0], tmp_path / "out", tmp_path / "out" / "runs" / "Random-ens2" / "n1_d0", None)
    with pytest.raises(InputError, match="names a trained method"):
        load_experiment(_config(tmp_path, methods=[{"name": "E", "ensemble": {"of": "Nope", "seeds": [0, 1]}}]))
    with pytest.raises(InputError, match="2 or more of the config's seeds"):
        load_experiment(_config(tmp_path, seeds=[0, 1], methods=[methods[0], {**methods[1], "ensemble": {
            "of": "Random", "seeds": [0, 2]}}]))

def test_experiment_runs_end_to_end_resumes_and_reports(tmp_path: Path) -> None:
    config, out = _config(tmp_path), tmp_path / "out"
    config = _config(tmp_path, draws={"1": 1})
    assert main(["experiment", str(config), "--out", str(out), "--methods", "Random,SepaReg"]) == 0
    for key in ("Random/n1_d0", "SepaReg/n1_d0"):
        rows = list(csv.DictReader(open(out / "runs" / key / "metrics.csv", encoding="utf-8")))
        assert {r["case"] for r in rows} == {"pt_5"} and len(rows) == 7
        run = json.loads((out / "runs" / key / "run.json").read_text())
        assert run["device"].startswith("CPU") and len(run["cases"]) == 1 and run["seed"] == 0
    assert len(list((out / "pretrain").iterdir())) == 1
    report = (out / "results.md").read_text()
    assert "| Random | SepaReg |" in report and "All OARs" in report and "budget 1 x the paper's" in report
    assert "finished runs: Random 1/1, SepaReg 1/1" in report
    assert (out / "boxplots_n1.png").stat().st_size > 0 and (out / "learning_curve.png").stat().st_size > 0
    rows = list(csv.DictReader(open(out / "results.csv", encoding="utf-8")))
    assert {r["method"] for r in rows} == {"Random", "SepaReg"}
    # A finished run is skipped: a re-run only rebuilds the report.
    stamp = (out / "runs" / "Random/n1_d0" / "metrics.csv").stat().st_mtime_ns
    (out / "results.md").unlink()
    assert main(["experiment", str(config), "--out", str(out)]) == 0
    assert (out / "runs" / "Random/n1_d0" / "metrics.csv").stat().st_mtime_ns == stamp
    assert (out / "results.md").exists()


def test_a_method_sets_pretraining_settings_including_the_view_augmentation(tmp_path: Path, monkeypatch) -> None:
    """Issue 22's matched controls set every pretraining setting from the config, the views' augmentation included."""
    import separeg.pretrain.stages as stages
    from separeg.experiments import protocol
    from separeg.runtime.events import Events

    seen = []
    monkeypatch.setattr(stages, "run_pretrain", lambda job, events: seen.append(job.config) or job.run_dir / "e")
    config = load_experiment(_config(tmp_path, methods=[{"name": "Old", "pretrain": {
        "iid": False, "iterations": 40000, "max_magnification": None, "warmup_fraction": 0.0,
        "augment": {"crop_scale": [0.4, 1.0], "brightness": 0.4, "contrast": 0.4}}}],
        budget={"pretrain": 0.06, "finetune": 1}))
    protocol._pretrain(config, config.methods[0], tmp_path / "out", Events())
    (cfg,) = seen
    assert cfg.iterations == 2400 and cfg.max_magnification is None and cfg.warmup_fraction == 0.0
    assert cfg.augment.crop_scale == (0.4, 1.0) and cfg.augment.brightness == 0.4 and cfg.augment.blur_prob == 0.5
