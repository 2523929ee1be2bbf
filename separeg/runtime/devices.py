"""The compute devices a user can choose, named for people: for the Slicer modules' device menus."""

from __future__ import annotations

import logging

__all__ = ["list_devices"]

logger = logging.getLogger(__name__)


def list_devices() -> list[tuple[str, str]]:
    """``[(device argument, label)]``: auto, each CUDA GPU with its name and memory, Apple MPS, CPU.

    Imports torch lazily; without torch, or when the GPU driver fails, only ``auto`` and ``cpu`` are listed (a
    broken CUDA install must not hide the Slicer modules).
    """
    devices = [("auto", "Automatic (GPU when available)")]
    try:
        import torch

        devices += _gpus(torch)
    except (ImportError, RuntimeError, OSError) as exc:
        logger.warning("could not list GPUs: %s", exc)
    return devices + [("cpu", "CPU")]


def _gpus(torch) -> list[tuple[str, str]]:
    devices = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            devices.append((f"cuda:{i}", f"GPU {i}: {props.name} ({props.total_memory / 2**30:.0f} GiB)"))
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        devices.append(("mps", "Apple GPU (MPS)"))
    return devices
