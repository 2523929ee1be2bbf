"""What every training stage shares: device choice, torch.distributed setup, checkpoints, stop requests
(:class:`StopRequest`, from :mod:`separeg.runtime.stop`), the learning-rate schedule and the step loop. Written once
for pretraining and fine-tuning.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import pickle
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from separeg.runtime.atomic import (
    HashingWriter,
    atomic_path,
    checksum_path,
    file_sha256,
    recorded_digests,
    write_checksums,
)
from separeg.runtime.errors import CancelledError, InputError
from separeg.runtime.events import Events
from separeg.runtime.stop import StopRequest

__all__ = ["Runtime", "pick_device", "setup_runtime", "cosine_lr", "warmup_lr", "step_seed", "save_checkpoint",
           "load_checkpoint", "verify_checkpoint", "checksum_path", "CorruptCheckpointError", "StopRequest",
           "train_steps", "TrainState"]

logger = logging.getLogger(__name__)


def pick_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA, then MPS, then CPU; ``cuda:N`` is checked against the GPUs present.

    Raises:
        InputError: a device that is not available, with what is.
    """
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise InputError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps") from exc
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise InputError(f"{name} requested but no CUDA GPU is available (torch {torch.__version__}, "
                             f"CUDA build: {torch.version.cuda or 'no'}); use --device cpu")
        if device.index is not None and device.index >= count:
            raise InputError(f"{name} requested but only {count} GPU(s) are present")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise InputError("mps requested but not available; use --device cpu")
    return device


@dataclass
class Runtime:
    """Where this process runs and its place among the ranks of a torchrun job."""

    device: torch.device
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def any(self, flag: bool) -> bool:
        """True on every rank if ``flag`` is true on any rank."""
        if not self.distributed:
            return flag
        value = torch.tensor([1.0 if flag else 0.0], device=self.device if self.device.type == "cuda" else "cpu")
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item() > 0)

    @property
    def autocast(self):
        """bf16 autocast on CUDA (DESIGN §4), a no-op elsewhere."""
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return _nullcontext()


    @property
    def inference_autocast(self):
        """bf16 autocast for inference on CUDA, and on CPUs with native bf16 units (1.6-1.8x faster contours in
        ``bench_contour``); fp32 elsewhere."""
        if self.device.type == "cpu" and cpu_has_bf16():
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return self.autocast


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX); emulated bf16 is slower than fp32."""
    try:
        flags = Path("/proc/cpuinfo").read_text(errors="ignore")
    except OSError:  # not Linux: be conservative
        return False
    return any(flag in flags for flag in (" avx512_bf16", " amx_bf16"))


@contextmanager
def _nullcontext() -> Iterator[None]:
    yield


def setup_runtime(device: str = "auto") -> Runtime:
    """Single process, or one rank of a ``torchrun`` job (NCCL on CUDA, gloo on CPU) when WORLD_SIZE > 1."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Runtime(pick_device(device))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    chosen = pick_device(device)
    if chosen.type == "cuda":
        chosen = torch.device("cuda", local_rank)
        torch.cuda.set_device(chosen)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if chosen.type == "cuda" else "gloo")
    return Runtime(chosen, rank, world_size, local_rank)


def cosine_lr(base_lr: float, step: int, total: int) -> float:
    """Cosine decay from ``base_lr`` to 0 over ``total`` steps (SimSiam's schedule)."""
    return float(base_lr * 0.5 * (1.0 + math.cos(math.pi * min(step, total) / max(total, 1))))


def warmup_lr(base_lr: float, step: int, total: int, *, warmup: int = 0, schedule: str = "cosine") -> float:
    """Linear warm-up over ``warmup`` steps, then ``cosine`` decay or nnU-Net's ``poly`` ((1 - t)^0.9) to 0."""
    if step < warmup:
        return float(base_lr * (step + 1) / warmup)
    t = min(step - warmup, total - warmup) / max(total - warmup, 1)
    if schedule == "poly":
        return float(base_lr * (1.0 - t) ** 0.9)
    return float(base_lr * 0.5 * (1.0 + math.cos(math.pi * t)))


def step_seed(seed: int, *parts: object) -> int:
    """A 63-bit seed for one step of one stage: batches and augmentations depend only on (seed, stage, step),
    so a resumed run draws exactly what the uninterrupted run would have drawn."""
    digest = hashlib.sha256(repr((seed, *parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


class CorruptCheckpointError(InputError):
    """A checkpoint whose bytes differ from those written (SHA-256 mismatch), or that torch cannot read."""

    def __init__(self, problem: str) -> None:
        super().__init__(f"{problem}. It was not loaded; re-run with --restart to start this run over")
        self.problem = problem


def save_checkpoint(path: str | Path, state: dict) -> str:
    """Atomic ``torch.save`` with its SHA-256 in ``<path>.sha256``; returns the digest.

    The bytes are hashed as they are written and flushed to disk before the rename. The sidecar accepts the new
    and the current digest while the rename is pending, then the new one only: a kill at any point leaves a
    checkpoint that its sidecar accepts.

    Raises:
        DiskFullError: the disk filled up; the previous checkpoint and its sidecar are intact.
    """
    path = Path(path)
    with atomic_path(path, suffix=".tmp") as tmp:
        digest = _save_hashed(state, tmp)
        write_checksums(path, [digest, *(recorded_digests(path) if path.exists() else [])])
    write_checksums(path, [digest])
    return digest


def load_checkpoint(path: str | Path, map_location: torch.device | str = "cpu") -> dict:
    """Verify the checksum, then load with ``weights_only=True`` (tensors and plain containers, never pickled code).

    Raises:
        InputError: the checkpoint is missing.
        CorruptCheckpointError: its checksum does not match, or torch cannot read it.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"checkpoint {path} is missing; run the stage that writes it first, or use --restart")
    verify_checkpoint(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises RuntimeError, UnpicklingError, EOFError, zipfile errors...
        # torch's message suggests weights_only=False, i.e. running the file's code: keep only the line naming why.
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        unsafe = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        if isinstance(exc, pickle.UnpicklingError) and unsafe:
            raise CorruptCheckpointError(f"checkpoint {path} is unreadable (it holds objects other than tensors: "
                                         f"Unsupported global {unsafe.group(1)}); separeg never runs code from a "
                                         "file") from exc
        raise CorruptCheckpointError(f"checkpoint {path} is unreadable ({type(exc).__name__}: {first})") from exc


def verify_checkpoint(path: str | Path) -> None:
    """Check ``path`` against its ``.sha256`` sidecar; a checkpoint from before checksums (no sidecar) passes.

    Raises:
        CorruptCheckpointError: the digest is not one the sidecar records.
    """
    path = Path(path)
    sidecar = checksum_path(path)
    if not sidecar.exists():
        logger.warning("%s has no %s file (written before checksums); loading it unchecked", path, sidecar.name)
        return
    recorded = recorded_digests(path)
    actual = file_sha256(path)
    if actual not in recorded:
        expected = recorded[0][:16] + "..." if recorded else "nothing readable"
        raise CorruptCheckpointError(f"checkpoint {path} is damaged: its SHA-256 is {actual[:16]}..., {sidecar.name} "
                                     f"records {expected} (a disk error, an incomplete copy or an edit)")


def _save_hashed(state: dict, tmp: Path) -> str:
    with open(tmp, "wb") as file:
        writer = HashingWriter(file)
        try:
            torch.save(state, writer)
        except RuntimeError:
            if writer.error is not None:
                raise writer.error from None
            raise
        file.flush()
        os.fsync(file.fileno())  # the data is on disk before the rename makes it the checkpoint
    return writer.sha256.hexdigest()


@dataclass
class TrainState:
    step: int = 0
    losses: list[float] = field(default_factory=list)


def train_steps(*, stage: str, model: nn.Module, optimizer: torch.optim.Optimizer, total: int, base_lr: float,
                step_loss: Callable[[int], torch.Tensor], after_step: Callable[[int], None] | None,
                checkpoint: Path, extra_state: Callable[[], dict], runtime: Runtime, events: Events,
                stop: StopRequest, checkpoint_seconds: float, log_every: int = 10,
                on_step: Callable[[int], bool] | None = None,
                restore: Callable[[dict], None] | None = None,
                lr_at: Callable[[int], float] | None = None) -> TrainState:
    """The step loop of one stage, resumable from ``checkpoint``.

    Args:
        stage: name in events and checkpoints.
        model, optimizer: trained in place; restored from ``checkpoint`` when it exists.
        total: number of steps of the stage.
        base_lr: peak learning rate of the cosine schedule (per parameter group, scaled by its ``lr_scale``).
        step_loss: computes the loss of step ``i`` (batch drawn from :func:`step_seed`).
        after_step: called after each optimizer step (e.g. BYOL's EMA update).
        extra_state: more to store in the checkpoint (e.g. config hash, validation history).
        checkpoint_seconds: save at least this often; also at the end and when stopped.
        on_step: called after step ``i`` is counted (e.g. validation at epoch ends); returning True ends the
            stage early (early stopping), with a checkpoint.
        restore: called with the loaded checkpoint when resuming, to restore what ``extra_state`` saved.
        lr_at: the learning rate of step ``i`` before ``lr_scale`` (default: cosine decay from ``base_lr``).

    Raises:
        CancelledError: a stop was requested; the checkpoint was saved first.
    """
    state = TrainState()
    saved = _resume_state(checkpoint, stage, runtime, events)
    if saved is not None:
        _unwrap(model).load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        state = TrainState(int(saved["step"]), [float(x) for x in saved["losses"]])
        if restore is not None:
            restore(saved)
        if saved.get("finished_early"):
            return state
        events.log(f"resumed at step {state.step}/{total}", stage=stage)

    def save(finished_early: bool = False) -> None:
        if runtime.is_main:
            save_checkpoint(checkpoint, {"model": _unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
                                         "step": state.step, "losses": state.losses,
                                         "finished_early": finished_early, **extra_state()})

    last_save = time.monotonic()
    pending: list[torch.Tensor] = []
    model.train()
    events.progress(stage, state.step, total)
    while state.step < total:
        reason = stop.requested
        if runtime.any(reason is not None):
            state.losses += [float(x) for x in torch.stack(pending).tolist()] if pending else []
            save()
            raise CancelledError(f"{stage} stopped at step {state.step}/{total} ({reason or 'another rank'}); "
                                 "checkpoint saved, re-run the same command to resume")
        for group in optimizer.param_groups:
            lr = lr_at(state.step) if lr_at is not None else cosine_lr(base_lr, state.step, total)
            group["lr"] = lr * group.get("lr_scale", 1.0)
        with runtime.autocast:
            loss = step_loss(state.step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        state.step += 1
        if after_step is not None:
            after_step(state.step)
        pending.append(loss.detach().float())
        # Host syncs only every log_every steps: .item() on a GPU tensor waits for the device.
        if len(pending) >= log_every or state.step == total:
            values = torch.stack(pending).tolist()
            pending.clear()
            if not all(np.isfinite(values)):
                save()
                raise InputError(f"{stage}: the loss became {values[-1]} at step {state.step}; lower the learning "
                                 "rate (--lr) and re-run with --restart")
            state.losses += values
        # on_step (validation, best model) runs before the save, so a checkpoint always holds its results.
        stop_early = on_step is not None and on_step(state.step) and state.step < total
        if stop_early or state.step == total or time.monotonic() - last_save > checkpoint_seconds:
            state.losses += [float(x) for x in torch.stack(pending).tolist()] if pending else []
            pending.clear()
            save(finished_early=stop_early)
            last_save = time.monotonic()
        events.progress(stage, state.step, total, loss=state.losses[-1] if state.losses else None)
        if stop_early:
            break
    if runtime.distributed and isinstance(model, nn.parallel.DistributedDataParallel):
        _check_replicas(model, runtime, stage, events)
    return state


def _resume_state(checkpoint: Path, stage: str, runtime: Runtime, events: Events) -> dict | None:
    """The stage's checkpoint, or None to start at step 0: none yet, or a damaged one (never loaded)."""
    if not checkpoint.exists():
        return None
    try:
        return load_checkpoint(checkpoint, map_location=runtime.device)
    except CorruptCheckpointError as exc:
        events.warning(f"{exc.problem}; starting {stage} over from step 0", stage=stage)
        return None


def _check_replicas(model: nn.Module, runtime: Runtime, stage: str, events: Events) -> None:
    """All ranks must end a data-parallel stage with bit-identical weights; anything else is a bug to stop for."""
    params = [p.detach().double().flatten() for p in _unwrap(model).parameters()]
    flat = torch.cat(params)
    fingerprint = torch.stack([flat.sum(), flat.abs().sum(), (flat * torch.arange(len(flat), device=flat.device,
                                                                                   dtype=flat.dtype)).sum()])
    gathered = [torch.empty_like(fingerprint) for _ in range(runtime.world_size)]
    dist.all_gather(gathered, fingerprint)
    if any(not torch.equal(g, gathered[0]) for g in gathered):
        raise RuntimeError(f"{stage}: weights differ between ranks after data-parallel training")
    events.log(f"weights identical on all {runtime.world_size} ranks (fingerprint {gathered[0][0].item():.6g})",
               stage=stage)


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
