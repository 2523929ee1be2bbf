"""Checkpoints with checksums, and the step loop's resume rules (separeg.runtime.training)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import torch

from separeg.runtime import training
from separeg.runtime.events import Events, EventType, ListSink
from separeg.runtime.training import (
    CorruptCheckpointError,
    Runtime,
    StopRequest,
    checksum_path,
    load_checkpoint,
    save_checkpoint,
    train_steps,
)


def test_checkpoint_sidecar_is_in_sha256sum_format(tmp_path: Path) -> None:
    path = tmp_path / "inter.pt"
    digest = save_checkpoint(path, {"step": 1, "w": torch.arange(10.0)})
    assert checksum_path(path).read_text() == f"{hashlib.sha256(path.read_bytes()).hexdigest()}  inter.pt\n"
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest()
    torch.testing.assert_close(load_checkpoint(path)["w"], torch.arange(10.0))


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_a_damaged_checkpoint_is_never_loaded(tmp_path: Path, monkeypatch, damage: str) -> None:
    path = tmp_path / "inter.pt"
    save_checkpoint(path, {"step": 1, "w": torch.ones(1000)})
    data = bytearray(path.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0xFF
    else:
        del data[len(data) // 2:]
    path.write_bytes(bytes(data))
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load ran on a damaged checkpoint"))
    with pytest.raises(CorruptCheckpointError, match=r"inter.pt is damaged: its SHA-256 is .* --restart"):
        load_checkpoint(path)


def test_a_checkpoint_from_before_checksums_still_loads(tmp_path: Path) -> None:
    path = tmp_path / "old.pt"
    torch.save({"step": 7}, path)
    assert load_checkpoint(path)["step"] == 7


def test_a_kill_at_either_step_of_a_save_leaves_a_checkpoint_that_verifies(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "inter.pt"
    save_checkpoint(path, {"step": 1})

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # stands for SIGKILL: nothing after this point runs

    real_replace = os.replace
    with monkeypatch.context() as patch:  # new digest recorded, rename not done yet
        patch.setattr(os, "replace", lambda src, dst: killed() if Path(dst) == path else real_replace(src, dst))
        with pytest.raises(KeyboardInterrupt):
            save_checkpoint(path, {"step": 2})
    assert len(checksum_path(path).read_text().splitlines()) == 2
    assert load_checkpoint(path)["step"] == 1
    real = training.write_checksums
    with monkeypatch.context() as patch:  # renamed, the sidecar still lists the old digest too
        patch.setattr(training, "write_checksums", lambda p, d: real(p, d) if len(d) > 1 else killed())
        with pytest.raises(KeyboardInterrupt):
            save_checkpoint(path, {"step": 3})
    assert load_checkpoint(path)["step"] == 3
    save_checkpoint(path, {"step": 4})
    assert len(checksum_path(path).read_text().splitlines()) == 1


def _train(checkpoint: Path, total: int, events: Events, on_step=None, seen: list | None = None):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(8, 3)
    with StopRequest() as stop:
        return train_steps(stage="toy", model=model, optimizer=optimizer, total=total, base_lr=0.1,
                           step_loss=lambda step: model(x).pow(2).mean(), after_step=None, checkpoint=checkpoint,
                           extra_state=lambda: {"seen": list(seen or [])}, runtime=Runtime(torch.device("cpu")),
                           events=events, stop=stop, checkpoint_seconds=0.0, on_step=on_step)


def test_a_damaged_checkpoint_restarts_its_stage_and_says_so(tmp_path: Path) -> None:
    checkpoint = tmp_path / "toy.pt"
    _train(checkpoint, 3, Events())
    data = bytearray(checkpoint.read_bytes())
    data[100] ^= 0xFF
    checkpoint.write_bytes(bytes(data))
    sink = ListSink()
    state = _train(checkpoint, 5, Events(sink))
    warnings = [e.msg for e in sink.of_type(EventType.LOG) if e.level == "warning"]
    assert len(warnings) == 1 and "toy.pt is damaged" in warnings[0]
    assert warnings[0].endswith("starting toy over from step 0")
    assert state.step == 5 and len(state.losses) == 5  # all five steps trained again, none taken from the file


def test_each_checkpoint_holds_what_on_step_did_at_its_step(tmp_path: Path, monkeypatch) -> None:
    checkpoint = tmp_path / "toy.pt"
    seen: list[int] = []
    saved_at: dict[int, list[int]] = {}

    def on_step(step: int) -> bool:
        seen.append(step)  # e.g. validation history
        return False

    real_save = training.save_checkpoint

    def spy(path, state):
        saved_at[state["step"]] = state["seen"]
        return real_save(path, state)

    monkeypatch.setattr(training, "save_checkpoint", spy)
    _train(checkpoint, 3, Events(), on_step=on_step, seen=seen)
    assert saved_at == {1: [1], 2: [1, 2], 3: [1, 2, 3]}
