"""Time and disk of a pretraining run, said before it starts; on a CPU a warning at any budget."""

from __future__ import annotations

import io

import torch

from separeg.pretrain.config import PretrainConfig
from separeg.pretrain.estimate import estimate_pretraining, format_bytes, format_duration
from separeg.pretrain.ssl import SSLModel
from separeg.pretrain.stages import _announce_estimate
from separeg.runtime.events import Events, EventType, ListSink
from separeg.runtime.training import setup_runtime


def _checkpoint_bytes(cfg: PretrainConfig) -> int:
    """What a stage checkpoint of this model really takes: weights and SGD momentum after one step."""
    model = SSLModel(cfg.method, cfg.encoder, cfg.in_channels, temperature=cfg.temperature, momentum=cfg.ema)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(2, 1, cfg.crop_size, cfg.crop_size)
    model.loss(model(x, x.flip(-1))).backward()
    optimizer.step()
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
    return buffer.tell()


def test_the_disk_estimate_matches_a_real_checkpoint() -> None:
    cfg = PretrainConfig(encoder="resnet18-slim", crop_size=32, batch_size=8, iterations=20, clusters=3)
    estimate = estimate_pretraining(cfg, torch.device("cpu"))
    real = _checkpoint_bytes(cfg)
    assert abs(estimate.checkpoint_bytes - real) < 0.05 * real, (estimate.checkpoint_bytes, real)
    assert estimate.checkpoints == 1 + 3 + 1 and estimate.encoder_bytes < estimate.checkpoint_bytes
    assert estimate.seconds_per_iteration > 0 and estimate.seconds_per_region > 0
    assert estimate.training_seconds == estimate.seconds_per_iteration * 20


def test_a_cpu_run_is_warned_at_any_budget_with_time_disk_and_the_embed_step() -> None:
    sink = ListSink()
    cfg = PretrainConfig(encoder="resnet18", crop_size=32, batch_size=4, iterations=2)
    _announce_estimate(cfg, setup_runtime("cpu"), Events(sink))
    warnings = [e.msg for e in sink.of_type(EventType.LOG) if e.level == "warning"]
    assert len(warnings) == 1
    text = warnings[0]
    assert text.startswith("pretraining on a CPU: estimate on cpu:") and "s per iteration" in text
    assert "'embed' step" in text and "checkpoints of" in text and "--encoder resnet18-slim" in text


def test_formats() -> None:
    assert [format_duration(s) for s in (45, 720, 3.5 * 3600, 3 * 86400)] == ["45 s", "12 min", "3.5 h", "3.0 days"]
    assert [format_bytes(b) for b in (512, 281e6, 2.06e9)] == ["512 bytes", "281 MB", "2.06 GB"]
