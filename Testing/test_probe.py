"""The frozen-encoder probe (issue 22) on real OpenKBP cases: deterministic, frozen, and clear about bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from separeg.evaluate.probe import ProbeConfig, main, probe_encoders
from separeg.runtime.bundle import load_bundle
from separeg.runtime.model_store import resolve_model

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "Resources" / "SampleData"


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("cases")
    for name in ("pt_1_ct.nii.gz", "pt_1_oar.nii.gz", "pt_203_ct.nii.gz", "pt_203_oar.nii.gz", "labels.json"):
        shutil.copy(SAMPLE / name, folder / name)
    return folder


def test_probe_scores_each_encoder_on_the_same_slices(data: Path) -> None:
    shipped = load_bundle(resolve_model("separeg-encoder-hn-ct")).state_dict
    before = {k: v.clone() for k, v in shipped.items()}
    report = probe_encoders({"random": None, "again": None, "shipped": shipped}, "resnet18-slim", data, ["pt_1"],
                            ["pt_203"], cfg=ProbeConfig(steps=30))
    results = report["results"]
    assert results["random"] == results["again"]  # same random encoder, batches and head for every entry
    for result in results.values():
        assert 0 <= result["all"] <= 1 and set(result["per_case"]) == {"pt_203"}
        assert result["organs"] and all(0 <= v <= 1 for v in result["organs"].values())
    assert results["shipped"]["final_loss"] != results["random"]["final_loss"]  # the features differ
    assert all(torch.equal(before[k], shipped[k]) for k in before)  # the encoder is frozen


def test_probe_command_writes_markdown_and_json(data: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "probe.md"
    assert main(["--data", str(data), "--train", "pt_1", "--validation", "pt_203", "--encoder", "random=random",
                 "--steps", "5", "--out", str(out)]) == 0
    assert "| random |" in out.read_text() and json.loads(out.with_suffix(".json").read_text())["train"] == ["pt_1"]
    assert main(["--data", str(data), "--train", "pt_9", "--validation", "pt_203", "--encoder", "random=random",
                 "--out", str(out)]) == 2
    assert "no case pt_9" in capsys.readouterr().err
    assert main(["--data", str(data), "--train", "pt_1", "--validation", "pt_203", "--encoder", "random",
                 "--out", str(out)]) == 2
    assert "NAME=SOURCE" in capsys.readouterr().err
    not_a_bundle = tmp_path / "notes.txt"
    not_a_bundle.write_text("not a model")
    assert main(["--data", str(data), "--train", "pt_1", "--validation", "pt_203", "--encoder", f"x={not_a_bundle}",
                 "--out", str(out)]) == 2
    assert "is not a SepaReg bundle" in capsys.readouterr().err
    assert main(["--data", str(tmp_path / "missing"), "--train", "pt_1", "--validation", "pt_203", "--encoder",
                 "random=random", "--out", str(out)]) == 2
    assert "is not a folder of labelled cases" in capsys.readouterr().err


def test_probe_of_a_run_goes_into_its_report(data: Path, tmp_path: Path) -> None:
    from separeg.pretrain.config import PretrainConfig, PretrainJob
    from separeg.pretrain.stages import run_pretrain

    archive = tmp_path / "archive"
    archive.mkdir()
    shutil.copy(data / "pt_203_ct.nii.gz", archive)
    run = tmp_path / "run"
    run_pretrain(PretrainJob(archive=archive, run_dir=run, device="cpu", config=PretrainConfig(
        encoder="resnet18-slim", iterations=4, batch_size=4, crop_size=32, clusters=2)))
    for _ in range(2):  # a second probe replaces the first in the report
        assert main(["--data", str(data), "--train", "pt_1", "--validation", "pt_203", "--run", str(run),
                     "--encoder", "random=random", "--steps", "3", "--out", str(run / "probe.md")]) == 0
    report = (run / "report.md").read_text()
    assert report.count("## Frozen-encoder probe") == 1 and "| run inter-organ |" in report
    assert "| run distilled |" in report and "## Representation diagnostics" in report
