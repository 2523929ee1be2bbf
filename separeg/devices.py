"""The compute devices a user can choose, named for people: for the Slicer modules' device menus."""

from __future__ import annotations

__all__ = ["list_devices"]


def list_devices() -> list[tuple[str, str]]:
    """``[(device argument, label)]``: auto, each CUDA GPU with its name and memory, Apple MPS, CPU.

    Imports torch lazily; without torch only ``auto`` and ``cpu`` are listed.
    """
    devices = [("auto", "Automatic (GPU when available)")]
    try:
        import torch
    except ImportError:
        return devices + [("cpu", "CPU")]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            devices.append((f"cuda:{i}", f"GPU {i}: {props.name} ({props.total_memory / 2**30:.0f} GiB)"))
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        devices.append(("mps", "Apple GPU (MPS)"))
    return devices + [("cpu", "CPU")]
