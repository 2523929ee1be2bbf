"""The pretraining pipeline end to end on real OpenKBP CTs, with a tiny budget."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from monai.networks.nets import FlexibleUNet

from separeg.cli import main
from separeg.pretrain.config import STAGES, PretrainConfig, PretrainJob
from separeg.pretrain.stages import run_pretrain
from separeg.runtime.bundle import load_bundle
from separeg.runtime.errors import CancelledError, InputError
from separeg.runtime.events import Event, Events, EventType, ListSink
from separeg.runtime.training import load_checkpoint
from separeg.sis.regions import SISConfig

REPO = Path(__file__).resolve().parent.parent
TINY = ["--encoder", "resnet18", "--iterations", "10", "--batch-size", "8", "--crop-size", "32", "--clusters", "2"]


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("archive")
    for name in ("pt_1_ct.nii.gz", "pt_203_ct.nii.gz", "pt_1_oar.nii.gz"):
        shutil.copy(REPO / "Resources" / "SampleData" / name, folder / name)
    return folder


def tiny_config(**changes) -> PretrainConfig:
    values = dict(encoder="resnet18", iterations=10, batch_size=8, crop_size=32, clusters=2)
    values.update(changes)
    return PretrainConfig(**values)


def read_events(run_dir: Path) -> list[Event]:
    return [Event.from_json(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]


def test_full_run_exports_an_encoder_that_loads_into_the_unet(archive: Path, tmp_path: Path, capsys) -> None:
    run_dir = tmp_path / "run"
    assert main(["pretrain", str(archive), "--out", str(run_dir), "--device", "cpu", *TINY]) == 0
    assert all((run_dir / f"stage_{s}.done").exists() for s in STAGES)
    bundle = load_bundle(run_dir / "encoder.separeg", expected_kind="encoder")
    assert bundle.architecture["encoder"] == "resnet18"
    training = bundle.metadata["training"]
    assert training["volumes"] == 2 and training["regions"] > 500 and sum(training["cluster_sizes"]) == training[
        "regions"]
    assert "pt_1" not in json.dumps(bundle.metadata)  # no file names or identifiers travel with the model
    unet = FlexibleUNet(in_channels=1, out_channels=8, backbone="resnet18", pretrained=False, spatial_dims=2)
    result = unet.encoder.load_state_dict(bundle.state_dict, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    for name in ("inter", "intra0", "intra1", "distill"):
        losses = load_checkpoint(run_dir / "checkpoints" / f"{name}.pt")["losses"]
        assert losses and all(torch.isfinite(torch.tensor(losses)))
    report = (run_dir / "report.md").read_text()
    assert "| inter |" in report and "Organ groups" in report
    assert (run_dir / "clusters.png").exists() and (run_dir / "loss_curves.png").exists()
    stages = [e.stage for e in read_events(run_dir) if e.type == EventType.LOG and e.msg.startswith("done in")]
    assert stages == list(STAGES)
    # Running the finished command again does nothing but say so.
    assert main(["pretrain", str(archive), "--out", str(run_dir), "--device", "cpu", *TINY]) == 0
    assert "[inter] already done" in capsys.readouterr().err


def test_stop_then_resume_gives_the_uninterrupted_weights(archive: Path, tmp_path: Path) -> None:
    config = tiny_config(iterations=20, iid=False)  # inter only: 20 steps
    stop_file = tmp_path / "STOP"

    class StopAtStep:
        def __call__(self, event: Event) -> None:
            if event.type == EventType.PROGRESS and event.stage == "inter" and event.step == 7:
                stop_file.touch()

    interrupted = tmp_path / "interrupted"
    job = PretrainJob(archive=archive, run_dir=interrupted, config=config, device="cpu", stop_file=stop_file)
    with pytest.raises(CancelledError, match="inter stopped at step 7/20"):
        run_pretrain(job, Events(StopAtStep(), min_interval=0.0))
    assert load_checkpoint(interrupted / "checkpoints" / "inter.pt")["step"] == 7
    assert not (interrupted / "stage_inter.done").exists()
    sink = ListSink()
    run_pretrain(job, Events(sink))  # the stale stop file is removed at start
    assert any(e.msg == "resumed at step 7/20" for e in sink.of_type(EventType.LOG))
    assert (interrupted / "encoder.separeg").exists()

    straight = tmp_path / "straight"
    run_pretrain(PretrainJob(archive=archive, run_dir=straight, config=config, device="cpu"))
    resumed = load_checkpoint(interrupted / "checkpoints" / "inter.pt")
    reference = load_checkpoint(straight / "checkpoints" / "inter.pt")
    assert resumed["losses"] == pytest.approx(reference["losses"], rel=1e-5)
    for key, value in reference["model"].items():
        torch.testing.assert_close(resumed["model"][key], value, rtol=1e-5, atol=1e-6, msg=key)


def test_changed_config_is_refused_until_restart(archive: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    first = PretrainJob(archive=archive, run_dir=run_dir, config=tiny_config(iid=False, iterations=2), device="cpu")
    run_pretrain(first)
    changed = PretrainJob(archive=archive, run_dir=run_dir, device="cpu",
                          config=tiny_config(iid=False, iterations=2, batch_size=4))
    with pytest.raises(InputError, match="batch_size: 8 -> 4"):
        run_pretrain(changed)
    restarted = PretrainJob(archive=archive, run_dir=run_dir, device="cpu", restart=True,
                            config=tiny_config(iid=False, iterations=2, batch_size=4))
    run_pretrain(restarted)
    assert json.loads((run_dir / "config.json").read_text())["config"]["batch_size"] == 4


def test_resume_needs_a_run(archive: Path, tmp_path: Path) -> None:
    job = PretrainJob(archive=archive, run_dir=tmp_path / "none", config=tiny_config(), device="cpu", resume=True)
    with pytest.raises(InputError, match="no run to resume"):
        run_pretrain(job)


@pytest.mark.parametrize("separation", ["regular", "image", "dense"])
def test_baseline_separations_train(archive: Path, tmp_path: Path, separation: str) -> None:
    config = tiny_config(iid=False, iterations=3, sis=SISConfig(mode=separation))
    run_pretrain(PretrainJob(archive=archive, run_dir=tmp_path, config=config, device="cpu"))
    assert (tmp_path / "encoder.separeg").exists()


def test_dense_needs_the_no_iid_setting() -> None:
    with pytest.raises(InputError, match="--no-iid"):
        tiny_config(sis=SISConfig(mode="dense"))


def test_empty_archive_and_bad_device(tmp_path: Path, capsys) -> None:
    (tmp_path / "empty").mkdir()
    assert main(["pretrain", str(tmp_path / "empty"), "--out", str(tmp_path / "run"), *TINY]) == 1
    assert "is empty" in capsys.readouterr().err
    assert main(["pretrain", str(REPO / "Resources" / "SampleData"), "--out", str(tmp_path / "run2"),
                 "--device", "cuda:3", *TINY]) == 1
    assert "no CUDA GPU is available" in capsys.readouterr().err


@pytest.mark.slow
def test_two_process_torchrun_keeps_ranks_identical(archive: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "separeg",
         "pretrain", str(archive), "--out", str(run_dir), "--device", "cpu", "--json", *TINY],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    events = read_events(run_dir)
    identical = [e for e in events if e.msg and e.msg.startswith("weights identical on all 2 ranks")]
    assert {e.stage for e in identical} == {"inter", "distill"}
    assert (run_dir / "checkpoints" / "intra0.pt").exists() and (run_dir / "checkpoints" / "intra1.pt").exists()
    assert load_bundle(run_dir / "encoder.separeg").kind == "encoder"


def test_ctrl_c_saves_a_checkpoint_and_the_same_command_resumes(archive: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "separeg", "pretrain", str(archive), "--out", str(run_dir), "--device", "cpu",
               "--json", "--no-iid", *TINY[:2], "--iterations", "40", *TINY[4:8]]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    for line in process.stdout:
        event = Event.from_json(line)
        if event.type == EventType.PROGRESS and event.stage == "inter" and (event.step or 0) >= 2:
            process.send_signal(signal.SIGINT)
            break
    rest = process.communicate(timeout=300)[0]
    assert process.returncode == 130
    last = Event.from_json(rest.splitlines()[-1])
    assert last.type == EventType.CANCELLED and "SIGINT" in last.msg
    step = load_checkpoint(run_dir / "checkpoints" / "inter.pt")["step"]
    assert 2 <= step < 40
    assert not (run_dir / "encoder.separeg").exists()
    finished = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert finished.returncode == 0, finished.stdout[-2000:]
    assert any(e.msg == f"resumed at step {step}/40" for e in _events_of(finished.stdout))
    assert (run_dir / "encoder.separeg").exists()


def _events_of(stdout: str) -> list[Event]:
    return [Event.from_json(line) for line in stdout.splitlines() if line.startswith("{")]
