"""Running out of resources: a full disk during a checkpoint write, GPU memory during contouring, and two runs
pointed at one run directory."""

from __future__ import annotations

import errno
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from separeg.cli import main
from separeg.pretrain.rundir import check_identity
from separeg.rt.labels import load_label_table
from separeg.runtime.atomic import PARTIAL_MARK, DiskFullError, format_bytes, write_json
from separeg.runtime.bundle import save_bundle
from separeg.runtime.errors import InputError
from separeg.runtime.events import Events, EventType, ListSink
from separeg.runtime.runlock import LOCK_FILE, RunLockedError, acquire_run_lock, holds_run_lock, release_run_lock
from separeg.runtime.training import Runtime, load_checkpoint, save_checkpoint, verify_checkpoint
from separeg.segment.contour import SEGMENTATION_FILE, ContourJob, run_contour
from separeg.segment.inference import ContourMemoryError, predict_labels
from separeg.segment.network import GridSpec, build_unet

REPO = Path(__file__).resolve().parent.parent

# ------------------------------------------------------------------------------------------------ disk full


class _FillsUpAfter:
    """A file whose disk fills up after ``room`` bytes."""

    def __init__(self, file, room: int) -> None:
        self.file, self.room = file, room

    def write(self, data) -> int:
        if len(data) > self.room:
            self.file.write(bytes(data[: self.room]))
            self.room = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.file.write(data)

    def flush(self) -> None:
        self.file.flush()

    def fileno(self) -> int:
        return self.file.fileno()

    def __enter__(self) -> _FillsUpAfter:
        return self

    def __exit__(self, *exc) -> None:
        self.file.close()


def test_disk_full_during_a_checkpoint_write_keeps_the_previous_one(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "checkpoints" / "inter.pt"
    save_checkpoint(path, {"step": 3, "weights": torch.ones(50_000)})
    size = path.stat().st_size
    real_open = open
    monkeypatch.setattr("separeg.runtime.training.open", lambda *a, **k: _FillsUpAfter(real_open(*a, **k), size // 2),
                        raising=False)
    with pytest.raises(DiskFullError) as caught:
        save_checkpoint(path, {"step": 4, "weights": torch.zeros(50_000)})
    message = str(caught.value)
    assert message.startswith(f"the disk is full: writing {path} stopped after")
    assert f"free in {path.parent}" in message and f"needs at least {format_bytes(size)}" in message
    assert "The previous inter.pt is intact" in message
    assert isinstance(caught.value, OSError) and caught.value.errno == errno.ENOSPC
    monkeypatch.undo()
    verify_checkpoint(path)
    assert load_checkpoint(path)["step"] == 3
    assert not list(path.parent.glob(f".*{PARTIAL_MARK}*"))  # the half-written file is removed


def test_disk_full_is_reported_by_every_atomic_writer(tmp_path: Path, monkeypatch) -> None:
    def no_space(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", no_space)
    with pytest.raises(DiskFullError, match=r"the disk is full: writing .*config.json stopped after 0 bytes"):
        write_json({"a": 1}, tmp_path / "config.json")
    assert not (tmp_path / "config.json").exists() and not list(tmp_path.iterdir())


# ------------------------------------------------------------------------------------------------ GPU memory


def fail_above(model: torch.nn.Module, limit: int) -> list[int]:
    """Patch ``model.forward``: batches of more than ``limit`` slices fail like an exhausted GPU. Returns the list
    of batch sizes tried."""
    forward, tried = model.forward, []

    def limited(x: torch.Tensor) -> torch.Tensor:
        tried.append(len(x))
        if len(x) > limit:
            raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {len(x)} slices")
        return forward(x)

    model.forward = limited
    return tried


@pytest.fixture(scope="module")
def small_ct(tmp_path_factory, openkbp: Path) -> Path:
    image = sitk.ReadImage(str(openkbp / "pt_1_ct.nii.gz"))
    path = tmp_path_factory.mktemp("ct") / "ct.nii.gz"
    sitk.WriteImage(image[:, :, 44:56], str(path))  # 12 slices
    return path


@pytest.fixture(scope="module")
def model_bundle(tmp_path_factory, openkbp: Path) -> Path:
    torch.manual_seed(0)
    table = load_label_table(openkbp / "labels.json")
    n_classes = max(table.values) + 1
    return save_bundle(tmp_path_factory.mktemp("model") / "tiny.separeg", kind="segmentation",
                       architecture={"network": "monai.networks.nets.FlexibleUNet", "backbone": "resnet18",
                                     "spatial_dims": 2, "in_channels": 1, "out_channels": n_classes},
                       state_dict=build_unet("resnet18", n_classes).state_dict(),
                       metadata={"inputs": {**GridSpec(spacing_xy=(7.8, 7.8)).to_dict(), "orientation": "LPS"},
                                 "labels": table.to_dict()})  # a coarse grid: 64 x 64 slices, a quick test


def test_contour_halves_the_batch_when_out_of_memory(small_ct: Path, model_bundle: Path, tmp_path: Path,
                                                     monkeypatch) -> None:
    reference = tmp_path / "reference"
    run_contour(ContourJob(volume=small_ct, model=str(model_bundle), out_dir=reference, device="cpu", batch_size=4))
    batches: list[list[int]] = []

    def build_limited(*args, **kwargs):
        model = build_unet(*args, **kwargs)
        batches.append(fail_above(model, limit=4))
        return model

    monkeypatch.setattr("separeg.segment.network.build_unet", build_limited)
    sink = ListSink()
    run_contour(ContourJob(volume=small_ct, model=str(model_bundle), out_dir=tmp_path / "out", device="cpu",
                           batch_size=16), Events(sink))
    warnings = [e.msg for e in sink.of_type(EventType.LOG) if e.level == "warning"]
    assert warnings == ["out of memory on cpu with 16 slices per batch; continuing with 8",
                        "out of memory on cpu with 8 slices per batch; continuing with 4"]
    assert batches == [[12, 8, 4, 4, 4]]  # 12 slices: a failed batch is retried smaller, no slice is skipped
    result = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "out" / SEGMENTATION_FILE)))
    expected = sitk.GetArrayFromImage(sitk.ReadImage(str(reference / SEGMENTATION_FILE)))
    np.testing.assert_array_equal(result, expected)


def test_out_of_memory_with_one_slice_says_what_to_do() -> None:
    model = torch.nn.Identity()
    tried = fail_above(model, limit=0)
    with pytest.raises(ContourMemoryError, match=r"even one slice at a time .*--device cpu"):
        predict_labels(model, torch.zeros(3, 1, 8, 8), (8, 8), lambda x: x, Runtime(torch.device("cpu")), 2,
                       Events())
    assert tried == [2, 1]


# ------------------------------------------------------------------------------------------------ run lock


def _hold_lock_in_another_process(root: Path) -> subprocess.Popen:
    code = ("import sys, time; from separeg.runtime.runlock import acquire_run_lock; acquire_run_lock(sys.argv[1]); "
            "print('locked', flush=True); time.sleep(120)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(root), "--out", "x"], stdout=subprocess.PIPE,
                              text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert holder.stdout.readline().strip() == "locked"
    return holder


def _identity_check(root: Path, runtime: Runtime | None = None, **flags) -> None:
    check_identity(root, {"config": {"a": 1}}, restart=flags.get("restart", False), resume=False,
                   has_progress=False, runtime=runtime or Runtime(torch.device("cpu")), state=[root / "checkpoints"])


def test_a_second_run_in_the_same_folder_is_refused_until_the_first_dies(tmp_path: Path) -> None:
    root = tmp_path / "run"
    holder = _hold_lock_in_another_process(root)
    try:
        with pytest.raises(RunLockedError) as caught:
            _identity_check(root, restart=True)
        message = str(caught.value)
        assert f"PID {holder.pid} on {socket.gethostname()}" in message and "--out x" in message
        assert "Wait for that run to finish or stop it" in message and "another --out folder" in message
        assert not (root / "config.json").exists()  # refused before touching anything, --restart included
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    _identity_check(root)  # SIGKILL released the lock; the lock file itself is left and harmless
    assert holds_run_lock(root) and (root / LOCK_FILE).exists() and (root / "config.json").exists()
    release_run_lock(root)
    assert not holds_run_lock(root)


def test_both_training_commands_refuse_a_locked_run_dir(tmp_path: Path, capsys) -> None:
    root = tmp_path / "run"
    data = tmp_path / "data"
    data.mkdir()
    for name in ("pt_1_ct.nii.gz", "pt_1_oar.nii.gz", "pt_203_ct.nii.gz", "pt_203_oar.nii.gz", "labels.json"):
        shutil.copy(REPO / "Resources" / "SampleData" / name, data / name)
    holder = _hold_lock_in_another_process(root)
    try:
        assert main(["pretrain", str(data), "--out", str(root), "--device", "cpu",
                     "--iterations", "2"]) == 1
        assert f"is in use by another run: PID {holder.pid}" in capsys.readouterr().err
        assert main(["finetune", str(data), "--out", str(root), "--device", "cpu",
                     "--epochs", "1"]) == 1
        assert f"is in use by another run: PID {holder.pid}" in capsys.readouterr().err
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()


def test_the_lock_is_counted_within_a_process_and_freed_by_refused_runs(tmp_path: Path) -> None:
    root = tmp_path / "run"
    acquire_run_lock(root)
    acquire_run_lock(root)  # e.g. a library caller running the same folder twice
    release_run_lock(root)
    assert holds_run_lock(root)
    release_run_lock(root)
    assert not holds_run_lock(root)
    write_json({"config": {"a": 2}}, root / "config.json")
    with pytest.raises(InputError, match="another configuration"):
        _identity_check(root)
    assert not holds_run_lock(root)  # a refused run does not keep the folder locked


def test_only_rank_0_takes_the_lock(tmp_path: Path) -> None:
    root = tmp_path / "run"
    root.mkdir()
    _identity_check(root, Runtime(torch.device("cpu"), rank=1))
    assert not holds_run_lock(root) and not (root / LOCK_FILE).exists()
