"""Auto-contour speed: seconds per 150-slice 512 x 512 CT, batched inference vs a naive per-slice loop.

The CT is the LUNG1 series (512 x 512 x 134, 0.98 mm) repeated to 150 slices; the model is a FlexibleUNet
with a ResNet-50 (and ResNet-18) encoder on a 0.98 mm grid, i.e. full-resolution 512 x 512 slices, random
weights (speed does not depend on them). Measured in one run:
- ``naive``: one slice at a time, fp32, logits copied back per slice;
- ``batched``: ``separeg.contour``'s path: batches of 16 slices, logits resampled and argmaxed per batch;
- ``batched_bf16``: the same under bf16 autocast (the CUDA default; optional on CPUs with bf16 units);
- ``per_slice_bf16``: one slice at a time under bf16 (on a CPU, large batches of 512 x 512 activations
  overflow the caches: ``separeg contour`` uses batches of 1 on a CPU and 16 on a GPU).
On a CPU only ``--slices`` slices (default 16) are timed and the figure is scaled to 150 slices.

Usage: ``python Testing/benchmarks/bench_contour.py [--out DIR] [--slices N] [--encoders resnet50,resnet18]``.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from contextlib import nullcontext
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from separeg.atomic import write_json  # noqa: E402
from separeg.segmodel import GridSpec, build_unet, from_model_grid, to_model_grid  # noqa: E402

CT_SLICES = 150
BATCH = 16


def _ct(slices: int) -> tuple[np.ndarray, tuple[float, float]]:
    data = Path(os.environ.get("SEPAREG_SHARED_DATA", REPO.parent / "shared" / "data")) / "lung1_dicom" / "ct"
    if data.is_dir():
        import SimpleITK as sitk

        from separeg.volumes import read_volume

        image = read_volume(data)
        hu = sitk.GetArrayFromImage(image)
        spacing = image.GetSpacing()[:2]
    else:  # e.g. on a GPU machine without the shared data: a synthetic body-sized ellipse
        yy, xx = np.mgrid[:512, :512]
        hu = np.where(((yy - 256) / 200) ** 2 + ((xx - 256) / 240) ** 2 < 1, 40, -1000).astype(np.int16)[None]
        spacing = (0.977, 0.977)
    hu = np.concatenate([hu] * (slices // len(hu) + 1))[:slices]
    return hu, spacing


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def time_path(model, hu, spacing, spec, device, *, batch: int, bf16: bool) -> float:
    start = time.perf_counter()
    x = to_model_grid(hu, spacing, spec, device=device)
    out = np.zeros(hu.shape, np.uint8)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()
    for i in range(0, len(x), batch):
        with autocast:
            logits = model(x[i:i + batch])
        logits = from_model_grid(logits.float(), hu.shape[1:], spacing, spec)
        out[i:i + len(logits)] = logits.argmax(1).to(torch.uint8).cpu().numpy()
    _sync(device)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "Testing" / "benchmarks" / "results")
    parser.add_argument("--slices", type=int, default=None, help="slices timed (default: 150 on GPU, 16 on CPU)")
    parser.add_argument("--encoders", default="resnet50,resnet18")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    slices = args.slices or (CT_SLICES if device.type == "cuda" else BATCH)
    hu, spacing = _ct(slices)
    spec = GridSpec(spacing_xy=spacing)
    torch.set_num_threads(os.cpu_count() or 1)
    results = {}
    for name in args.encoders.split(","):
        model = build_unet(name, 8).to(device).eval()
        time_path(model, hu[:2], spacing, spec, device, batch=2, bf16=False)  # warm-up
        row = {}
        for label, batch, bf16 in (("naive", 1, False), ("batched", BATCH, False), ("batched_bf16", BATCH, True),
                                   ("per_slice_bf16", 1, True)):
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            seconds = time_path(model, hu, spacing, spec, device, batch=batch, bf16=bf16)
            row[label] = {"seconds_timed": seconds, "seconds_per_150_slices": seconds * CT_SLICES / slices}
            if device.type == "cuda":
                row[label]["peak_gpu_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
            print(f"{name:9s} {label:13s} {row[label]['seconds_per_150_slices']:8.1f} s per 150-slice 512^2 CT",
                  flush=True)
        for label in ("batched", "batched_bf16", "per_slice_bf16"):
            row[label]["speedup_vs_naive"] = row["naive"]["seconds_timed"] / row[label]["seconds_timed"]
        results[name] = row
    device_name = (torch.cuda.get_device_name(device).replace(" ", "-") if device.type == "cuda"
                   else f"cpu-{os.cpu_count()}cores")
    report = {"benchmark": "contour", "created": datetime.now(UTC).isoformat(timespec="seconds"),
              "device": device_name, "platform": platform.platform(),
              "versions": {"python": platform.python_version(), "torch": torch.__version__},
              "setup": {"ct": f"LUNG1 512x512, {slices} slices timed, scaled to {CT_SLICES}", "batch": BATCH,
                        "grid_spacing_mm": list(spacing), "model": "FlexibleUNet 2D, 8 classes, random weights"},
              "encoders": results,
              "notes": "includes windowing/resampling to the model grid, inference, resampling of the logits to the "
                       "input grid and argmax; excludes reading the CT and post-processing."}
    path = write_json(report, args.out / f"bench_contour_{device_name}.json")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
