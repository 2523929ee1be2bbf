"""Crash and resume: real `separeg pretrain` / `separeg finetune` processes SIGKILLed at chosen points, then resumed.

Each kill is either on seeing an event line of ``--json`` (mid-stage, between stages) or exact, from inside the
process (``crash_runner.py``): half-way through one file write, or half-way through a volume of the quick sis
stage. After every kill: each checkpoint on disk passes its checksum, and the resumed run starts from the step
on disk, which is at least the last step reported before the kill (with ``--checkpoint-minutes 0`` a checkpoint
is written every step, so at most one checkpoint interval is lost). A damaged checkpoint is never loaded: its
stage starts over, saying so. The runs end with valid bundles.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from separeg.runtime.atomic import PARTIAL_MARK
from separeg.runtime.bundle import load_bundle
from separeg.runtime.events import Event, EventType
from separeg.runtime.training import checksum_path, load_checkpoint, verify_checkpoint

REPO = Path(__file__).resolve().parent.parent
RUNNER = Path(__file__).resolve().parent / "crash_runner.py"
KILLED = -signal.SIGKILL

pytestmark = [pytest.mark.slow, pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL is POSIX")]


@dataclass
class Outcome:
    returncode: int
    events: list[Event]
    stderr: str

    def logs(self, stage: str | None = None) -> list[str]:
        return [e.msg for e in self.events if e.type == EventType.LOG and (stage is None or e.stage == stage)]

    def warnings(self) -> list[str]:
        return [e.msg for e in self.events if e.type == EventType.LOG and e.level == "warning"]

    def last_step(self, stage: str) -> int:
        return max((e.step for e in self.events if e.type == EventType.PROGRESS and e.stage == stage), default=0)

    def resumed_at(self, stage: str) -> int | None:
        for msg in self.logs(stage):
            if match := re.fullmatch(r"resumed at step (\d+)/\d+", msg):
                return int(match.group(1))
        return None


def launch(args: list[str], *, kill_when: Callable[[Event], bool] | None = None, fault: str | None = None,
           timeout: float = 300) -> Outcome:
    """Run ``separeg ARGS --json``; SIGKILL it when ``kill_when`` is true for an event, or by ``fault``."""
    # One thread: on a shared CPU, OpenMP threads that spin-wait for a descheduled peer make steps 5-10x slower.
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    env.pop("SEPAREG_KILL_DURING", None)
    if fault:
        env["SEPAREG_KILL_DURING"] = fault
    command = [sys.executable, str(RUNNER) if fault else "-m", *([] if fault else ["separeg.cli"]), *args, "--json"]
    with tempfile.TemporaryFile("w+", encoding="utf-8") as stderr:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=stderr, text=True, cwd=REPO, env=env)
        watchdog = threading.Timer(timeout, process.kill)
        watchdog.start()
        events = []
        try:
            for line in process.stdout:
                if not line.startswith("{"):
                    continue
                events.append(Event.from_json(line))
                if kill_when is not None and kill_when(events[-1]):
                    process.send_signal(signal.SIGKILL)
                    break
            process.stdout.close()
            returncode = process.wait()
        finally:
            watchdog.cancel()
        stderr.seek(0)
        return Outcome(returncode, events, stderr.read())


def assert_killed(outcome: Outcome) -> None:
    assert outcome.returncode == KILLED, f"not killed (exit {outcome.returncode}): {outcome.stderr[-2000:]}"


def assert_finished(outcome: Outcome) -> None:
    assert outcome.returncode == 0, f"exit {outcome.returncode}: {outcome.stderr[-2000:]} {outcome.events[-3:]}"
    assert outcome.events[-1].type == EventType.DONE


def assert_checkpoints_intact(run_dir: Path) -> None:
    """Every checkpoint on disk has a checksum file and matches it: a kill never leaves a damaged one."""
    for path in (run_dir / "checkpoints").glob("*.pt"):
        assert checksum_path(path).exists(), path
        verify_checkpoint(path)


def partial_files(folder: Path) -> list[Path]:
    return sorted(folder.glob(f".*{PARTIAL_MARK}*"))


def step_on_disk(path: Path) -> int:
    return int(load_checkpoint(path)["step"])


def on_progress(stage: str, min_step: int) -> Callable[[Event], bool]:
    return lambda e: e.type == EventType.PROGRESS and e.stage == stage and (e.step or 0) >= min_step


def on_log(stage: str, prefix: str) -> Callable[[Event], bool]:
    return lambda e: e.type == EventType.LOG and e.stage == stage and (e.msg or "").startswith(prefix)


def damage(path: Path) -> None:
    """Flip bytes in the middle of a file, as a failing disk or an incomplete copy would."""
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 16] = bytes(b ^ 0xFF for b in data[middle:middle + 16])
    path.write_bytes(bytes(data))


# ----------------------------------------------------------------------------------------------- pretraining


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("archive")
    for name in ("pt_1_ct.nii.gz", "pt_203_ct.nii.gz"):
        shutil.copy(REPO / "Resources" / "SampleData" / name, folder / name)
    return folder


def test_pretrain_survives_sigkill_at_six_points(archive: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    args = ["pretrain", str(archive), "--out", str(run), "--device", "cpu", "--encoder", "resnet18", "--iterations",
            "20", "--batch-size", "8", "--crop-size", "32", "--clusters", "2", "--checkpoint-minutes", "0"]
    resume = [*args, "--resume"]
    survived = []

    # 1. SIS, half-way through the second volume's regions (inside the process: a volume takes a fraction of a
    # second); the first volume's cache is kept and reused.
    assert_killed(launch(args, fault="progress:sis:64:2"))
    assert not (run / "stage_sis.done").exists()
    [first_cache] = (run / "sis_cache").glob("*.npz")
    first_stat = first_cache.stat()
    survived.append("sis: mid-volume")

    # 2. SIS, half-way through writing the second volume's cache file.
    assert_killed(launch(resume, fault="numpy.savez_compressed:sis_cache:1"))
    assert len(partial_files(run / "sis_cache")) == 1
    assert [p.name for p in (run / "sis_cache").glob("[!.]*.npz")] == [first_cache.name]
    survived.append("sis: cache write")

    # 3. Inter-organ stage, mid-stage; the half-written cache file is cleared and the first volume not redone.
    killed = launch(resume, kill_when=on_progress("inter", 3))
    assert_killed(killed)
    assert not partial_files(run / "sis_cache") and len(list((run / "sis_cache").glob("*.npz"))) == 2
    assert first_cache.stat().st_mtime_ns == first_stat.st_mtime_ns and first_cache.stat().st_ino == first_stat.st_ino
    assert_checkpoints_intact(run)
    on_disk = step_on_disk(run / "checkpoints" / "inter.pt")
    assert on_disk >= killed.last_step("inter") >= 3
    survived.append("inter: mid-stage")

    # 4. Inter-organ stage, half-way through writing the second checkpoint after resuming.
    killed = launch(resume, fault="torch.save:inter.pt:2")
    assert_killed(killed)
    assert killed.resumed_at("inter") == on_disk
    assert len(partial_files(run / "checkpoints")) == 1
    assert_checkpoints_intact(run)
    assert step_on_disk(run / "checkpoints" / "inter.pt") == on_disk + 1 == killed.last_step("inter")
    on_disk += 1
    survived.append("inter: checkpoint write")

    # 5. Between stages: right after the inter-organ stage is marked done.
    killed = launch(resume, kill_when=on_log("inter", "done in"))
    assert_killed(killed)
    assert killed.resumed_at("inter") == on_disk  # only the write that was cut short was lost
    assert not partial_files(run / "checkpoints")
    assert (run / "stage_inter.done").exists()
    survived.append("between inter and cluster")

    # 6. Distillation, mid-stage; then both its checkpoint and a finished stage's are damaged on disk.
    killed = launch(resume, kill_when=on_progress("distill", 1))
    assert_killed(killed)
    assert "already done" in killed.logs("inter") and killed.resumed_at("inter") is None
    assert_checkpoints_intact(run)
    assert step_on_disk(run / "checkpoints" / "distill.pt") >= killed.last_step("distill") >= 1
    survived.append("distill: mid-stage")
    damage(run / "checkpoints" / "distill.pt")
    damage(run / "checkpoints" / "intra0.pt")

    finished = launch(resume)
    assert_finished(finished)
    warnings = " | ".join(finished.warnings())
    assert "intra0.pt is damaged" in warnings and "running the intra stage again" in warnings
    assert "distill.pt is damaged" in warnings and "starting distill over from step 0" in warnings
    assert finished.resumed_at("distill") is None and finished.resumed_at("intra0") is None
    assert_checkpoints_intact(run)
    assert not partial_files(run) and not partial_files(run / "checkpoints")
    assert load_bundle(run / "encoder.separeg", expected_kind="encoder").architecture["encoder"] == "resnet18"
    assert len(survived) == 6


# ----------------------------------------------------------------------------------------------- fine-tuning


@pytest.fixture(scope="module")
def cases(tmp_path_factory) -> Path:
    """Two OpenKBP cases cut to 32 slices that hold organs: validation, the slowest part, takes a quarter as long."""
    import SimpleITK as sitk

    folder = tmp_path_factory.mktemp("cases")
    for name in ("pt_22_ct.nii.gz", "pt_22_oar.nii.gz", "pt_1_ct.nii.gz", "pt_1_oar.nii.gz"):
        sitk.WriteImage(sitk.ReadImage(str(REPO / "Resources" / "SampleData" / name))[:, :, 40:72], str(folder / name))
    shutil.copy(REPO / "Resources" / "SampleData" / "labels.json", folder / "labels.json")
    return folder


def test_finetune_survives_sigkill_at_three_points(cases: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    args = ["finetune", str(cases), "--out", str(run), "--device", "cpu", "--encoder", "resnet18", "--epochs", "2",
            "--steps-per-epoch", "3", "--batch-size", "4", "--validation-cases", "1", "--checkpoint-minutes", "0",
            "--validate-every", "1"]  # a validation (and its best.pt) at every epoch's end: the kill points
    resume = [*args, "--resume"]
    checkpoint = run / "checkpoints" / "finetune.pt"

    # 1. Mid-epoch 1.
    killed = launch(args, kill_when=on_progress("finetune", 1))
    assert_killed(killed)
    assert_checkpoints_intact(run)
    on_disk = step_on_disk(checkpoint)
    assert 1 <= killed.last_step("finetune") <= on_disk < 3

    # 2. Half-way through writing the best model after epoch 1's validation.
    killed = launch(resume, fault="torch.save:best.pt:1")
    assert_killed(killed)
    assert killed.resumed_at("finetune") == on_disk
    assert [p.name.split(PARTIAL_MARK)[0] for p in partial_files(run / "checkpoints")] == [".best.pt"]
    assert_checkpoints_intact(run)
    assert step_on_disk(checkpoint) == 2  # epoch 1 ends at step 3: its checkpoint comes after its validation

    # 3. After the last validation, while the last checkpoint or the model is written.
    killed = launch(resume, kill_when=on_log("finetune", "epoch 2:"))
    assert_killed(killed)
    assert killed.resumed_at("finetune") == 2
    assert_checkpoints_intact(run)

    finished = launch(resume)
    assert_finished(finished)
    assert_checkpoints_intact(run)
    assert not partial_files(run) and not partial_files(run / "checkpoints")
    bundle = load_bundle(run / "model.separeg", expected_kind="segmentation")
    assert bundle.metadata["training"]["epochs_run"] == 2  # each epoch's validation counted once, none lost
    assert bundle.metadata["training"]["best_epoch"] in (1, 2)
