"""Slice-batched inference of a segmentation network: logits -> labels on the input grid by an upsampled argmax
(never K float volumes at full size), batches halved when the device runs out of memory."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from separeg.runtime.errors import SepaRegError
from separeg.runtime.events import Events
from separeg.runtime.training import Runtime

__all__ = ["predict_labels", "upsampled_argmax", "ContourMemoryError"]


class ContourMemoryError(SepaRegError):
    """The device ran out of memory even one slice at a time."""


def _out_of_memory_errors() -> tuple[type[BaseException], ...]:
    """torch's out-of-memory exception (``torch.OutOfMemoryError`` from torch 2.5, ``torch.cuda.`` before)."""
    return (getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError,)


def predict_labels(model: torch.nn.Module, slices: torch.Tensor, out_shape: tuple[int, int],
                   to_labels: Callable[[torch.Tensor], torch.Tensor], runtime: Runtime, batch: int,
                   events: Events) -> np.ndarray:
    """Labels of ``slices`` in batches; out of memory, the batch is halved (saying so) and the batch retried.

    Args:
        slices: ``(Z, C, h, w)`` on the model grid, on the model's device (fed channels-last on a CPU).
        out_shape: ``(H, W)`` of the input grid; ``to_labels`` maps ``(B, K, h, w)`` float logits to ``(B, H, W)``
            labels there (e.g. :func:`upsampled_argmax`).

    Returns:
        ``(Z, H, W)`` uint8 labels.

    Raises:
        ContourMemoryError: out of memory with a batch of one slice.
    """
    labels = np.zeros((len(slices), *out_shape), np.uint8)
    memory_format = torch.channels_last if runtime.device.type == "cpu" else torch.contiguous_format
    start = 0
    with torch.inference_mode():
        while start < len(slices):
            predicted = None
            try:
                with runtime.inference_autocast:
                    logits = model(slices[start:start + batch].contiguous(memory_format=memory_format))
                predicted = to_labels(logits.float())
            except _out_of_memory_errors() as exc:
                if batch == 1:
                    raise ContourMemoryError(
                        f"out of memory on {runtime.device} even one slice at a time ({exc}); close other programs "
                        "that use it, or contour on the CPU (--device cpu)") from exc
                logits = predicted = None
            if predicted is None:  # outside the except block, whose traceback still holds the failed batch's tensors
                batch = _smaller_batch(batch, runtime, events)
                continue
            labels[start:start + len(predicted)] = predicted.to(torch.uint8).cpu().numpy()
            start += len(predicted)
            events.progress("contour", start, len(slices))
    return labels


def _source_index(size_in: int, size_out: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """The two source indices and the weight of the second for each output index of ``F.interpolate``
    (bilinear, ``align_corners=False``): ATen's ``compute_source_index_and_lambda`` (in float64 on the CPU: MPS has
    no float64)."""
    source = ((torch.arange(size_out, dtype=torch.float64) + 0.5) * (size_in / size_out) - 0.5).clamp(min=0)
    first = source.floor().clamp(max=size_in - 1)
    weight = (source - first).clamp(0, 1).to(torch.float32)
    first = first.to(torch.int64)
    return first.to(device), (first + 1).clamp(max=size_in - 1).to(device), weight.to(device)


def upsampled_argmax(logits: torch.Tensor, shape_hw: tuple[int, int], chunk: int = 1 << 20) -> torch.Tensor:
    """The labels of ``(B, K, h, w)`` logits resampled bilinearly to ``shape_hw`` (``F.interpolate``,
    ``align_corners=False``, then argmax over K), without resampling the K channels: ``(B, H, W)`` uint8.

    A pixel's resampled logits are a convex combination of its 2 x 2 source pixels' logits, so where these four
    have the same argmax, so has the pixel. Only pixels between source pixels of different labels (organ borders)
    get their K logits interpolated, ``chunk`` pixels at a time.
    """
    height, width = logits.shape[-2:]
    coarse = logits.argmax(1).to(torch.uint8)
    if (height, width) == tuple(shape_hw):
        return coarse
    device = logits.device
    y0, y1, wy = _source_index(height, shape_hw[0], device)
    x0, x1, wx = _source_index(width, shape_hw[1], device)
    below = (torch.arange(height, device=device) + 1).clamp(max=height - 1)
    right = (torch.arange(width, device=device) + 1).clamp(max=width - 1)
    # cell (i, j): source pixels i, i+1 x j, j+1 (clamped at the edges), as y0/y1 and x0/x1 pair them
    mixed = (coarse != coarse[:, below]) | (coarse != coarse[:, :, right]) | (coarse != coarse[:, below][:, :, right])
    labels = coarse[:, y0][:, :, x0]
    b, y, x = mixed[:, y0][:, :, x0].nonzero(as_tuple=True)
    values = logits.permute(0, 2, 3, 1)  # (B, h, w, K)
    for s in range(0, len(b), chunk):
        bb, yy, xx = b[s:s + chunk], y[s:s + chunk], x[s:s + chunk]
        ly, lx = wy[yy, None], wx[xx, None]
        top = (1 - lx) * values[bb, y0[yy], x0[xx]] + lx * values[bb, y0[yy], x1[xx]]
        bottom = (1 - lx) * values[bb, y1[yy], x0[xx]] + lx * values[bb, y1[yy], x1[xx]]
        labels[bb, yy, xx] = ((1 - ly) * top + ly * bottom).argmax(1).to(torch.uint8)
    return labels


def _smaller_batch(batch: int, runtime: Runtime, events: Events) -> int:
    smaller = max(1, batch // 2)
    if runtime.device.type == "cuda":
        torch.cuda.empty_cache()  # give the failed batch's blocks back before trying the smaller one
    events.warning(f"out of memory on {runtime.device} with {batch} slices per batch; continuing with {smaller}",
                   stage="contour")
    return smaller
