"""The Auto-contour path before issue 24, kept for ``Testing/benchmarks/bench_contour.py`` and the agreement test in
``Testing/test_contour.py``: whole-volume windowing on the input grid, one slice at a time on a CPU, K float logits
resampled to every input slice, post-processing on whole volumes."""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage

from separeg.runtime.events import Events
from separeg.runtime.training import Runtime
from separeg.segment.contour import ContourJob, ContourResult, _contour
from separeg.segment.network import (
    GridSpec,
    from_model_grid,
    model_input,
    to_canonical,
)

__all__ = []


def _run_contour_legacy(job: ContourJob, events: Events | None = None) -> ContourResult:
    """The contour path before issue 24, for ``bench_contour.py`` and the agreement test: the whole volume
    windowed on the input grid, one slice at a time on a CPU (16 on a GPU) without channels-last, K float logits
    resampled to every input slice and argmaxed there, post-processing on whole volumes."""
    return _contour(job, events or Events(), _segment_legacy, cpu_batch=1, post=_postprocess_legacy)


def _segment_legacy(images: list, spec: GridSpec, model: torch.nn.Module, runtime: Runtime, batch: int,
                    events: Events) -> tuple[np.ndarray, object]:
    import SimpleITK as sitk

    canonical = to_canonical(images[0])
    hu = sitk.GetArrayFromImage(canonical)
    spacing = canonical.GetSpacing()[:2]
    arrays = [hu] + [sitk.GetArrayFromImage(to_canonical(other)) for other in images[1:]]
    slices = model_input(arrays, spacing, spec, device=runtime.device)
    labels = np.zeros((len(slices), *hu.shape[1:]), np.uint8)
    with torch.inference_mode():
        for start in range(0, len(slices), batch):
            with runtime.inference_autocast:
                logits = model(slices[start:start + batch])
            logits = from_model_grid(logits.float(), hu.shape[1:], spacing, spec)
            labels[start:start + len(logits)] = logits.argmax(1).to(torch.uint8).cpu().numpy()
            events.progress("contour", start + len(logits), len(slices))
    return labels, canonical


def _postprocess_legacy(labels: np.ndarray, values: list[int], *, largest_component: bool,
                        fill_holes: bool) -> np.ndarray:
    out = labels.copy()
    for value in values:
        mask = out == value
        if not mask.any():
            continue
        if largest_component:
            components, n = ndimage.label(mask)
            if n > 1:
                sizes = np.bincount(components.ravel())
                sizes[0] = 0
                out[mask & (components != int(np.argmax(sizes)))] = 0
                mask = out == value
        if fill_holes:
            for k in np.flatnonzero(mask.any(axis=(1, 2))):
                filled = ndimage.binary_fill_holes(mask[k])
                out[k][filled & (out[k] == 0)] = value
    return out
