"""Pretraining step throughput: regions/s of one SimSiam step at 128 x 128, batch 32, and the projected wall
time of the paper's full budget (100k iterations over all stages).

Measured side by side in one run on real OpenKBP regions:
- ``naive``: fp32, crops cut one region at a time on the CPU (``naive_crops``) and copied to the device;
- ``batched fp32``: crops and augmentation batched on the device (``RegionSet`` + ``TwoViews``);
- ``batched bf16 + channels_last``: the same under bf16 autocast with channels_last memory (DESIGN §4).

Usage: ``python Testing/benchmarks/bench_pretrain.py [--out DIR] [--encoders resnet50,resnet18] [--steps N]``.
Writes ``bench_pretrain_<device>.json``.
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

from separeg.pretrain.augment import TwoViews  # noqa: E402
from separeg.pretrain.ssl import SSLModel  # noqa: E402
from separeg.runtime.atomic import write_json  # noqa: E402
from separeg.sis.crops import naive_crops  # noqa: E402
from separeg.sis.regions import SISConfig, compute_region_maps, window_hu  # noqa: E402
from separeg.sis.regionset import RegionSet, VolumeRegions  # noqa: E402

PAPER_ITERATIONS = 100_000
BATCH = 32
CROP = 128


def _load_volumes(data: Path, names: list[str]) -> list[VolumeRegions]:
    import SimpleITK as sitk

    volumes = []
    for name in names:
        hu = sitk.GetArrayFromImage(sitk.ReadImage(str(data / f"{name}_ct.nii.gz")))
        volumes.append(VolumeRegions(name, hu, compute_region_maps(hu, SISConfig())))
    return volumes


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device).replace(" ", "-")
    return f"cpu-{os.cpu_count()}cores"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(model: SSLModel, batch_fn, steps: int, device: torch.device, *, bf16: bool) -> float:
    """Seconds per optimizer step (after two warm-up steps)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()
    views = TwoViews()
    for i in range(steps + 2):
        if i == 2:
            _sync(device)
            start = time.perf_counter()
        x = batch_fn(i)
        if bf16:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast:
            v1, v2 = views(x)
            loss = model.loss(model(v1, v2))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    _sync(device)
    return (time.perf_counter() - start) / steps


def bench_encoder(name: str, regions: RegionSet, volumes: list[VolumeRegions], device: torch.device,
                  steps: int) -> dict:
    rng = np.random.default_rng(0)
    index_of = [rng.integers(0, len(regions), BATCH) for _ in range(steps + 2)]
    # naive_crops works per volume: use the first volume's regions for the naive path.
    first = volumes[0]
    image = window_hu(first.hu, SISConfig().hu_window)
    naive_index = [rng.integers(0, len(first.maps), BATCH) for _ in range(steps + 2)]

    def naive_batch(i: int) -> torch.Tensor:
        return naive_crops(image, first.maps, naive_index[i], crop_size=CROP).to(device)

    def batched(i: int) -> torch.Tensor:
        return regions.crops(index_of[i])

    results = {}
    for label, fn, bf16 in (("naive_fp32", naive_batch, False), ("batched_fp32", batched, False),
                            ("batched_bf16_channels_last", batched, True)):
        torch.manual_seed(0)
        model = SSLModel("simsiam", name).to(device)
        if bf16:
            model = model.to(memory_format=torch.channels_last)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        seconds = time_steps(model, fn, steps, device, bf16=bf16)
        results[label] = {
            "seconds_per_step": seconds,
            "regions_per_s": BATCH / seconds,
            # All stages run steps of about this cost (distillation: one student pass and teacher passes),
            # so the full budget is projected as iterations x step time.
            "projected_full_budget_hours": PAPER_ITERATIONS * seconds / 3600,
        }
        if device.type == "cuda":
            results[label]["peak_gpu_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        print(f"  {name:9s} {label:28s} {BATCH / seconds:8.1f} regions/s  "
              f"full budget ~{results[label]['projected_full_budget_hours']:.1f} h", flush=True)
    base = results["naive_fp32"]["regions_per_s"]
    for label in ("batched_fp32", "batched_bf16_channels_last"):
        results[label]["speedup_vs_naive"] = results[label]["regions_per_s"] / base
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "Testing" / "benchmarks" / "results")
    parser.add_argument("--encoders", default="resnet50,resnet18")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per configuration")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    data = Path(os.environ.get("SEPAREG_SHARED_DATA", REPO.parent / "shared" / "data")) / "openkbp"
    if not data.is_dir():
        data = REPO / "Resources" / "SampleData"  # travels with the repository (e.g. to a GPU machine)
    device = torch.device(args.device)
    torch.set_num_threads(os.cpu_count() or 1)
    volumes = _load_volumes(data, ["pt_1", "pt_5"])
    regions = RegionSet(volumes, SISConfig().hu_window, CROP, device)
    print(f"{len(regions)} regions from {len(volumes)} OpenKBP volumes on {device}", flush=True)
    results = {name: bench_encoder(name, regions, volumes, device, args.steps) for name in args.encoders.split(",")}
    report = {
        "benchmark": "pretrain_step",
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "device": _device_name(device),
        "platform": platform.platform(),
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__},
        "setup": {"method": "simsiam", "batch": BATCH, "crop": CROP, "timed_steps": args.steps,
                  "paper_iterations": PAPER_ITERATIONS, "regions": len(regions)},
        "encoders": results,
        "notes": "regions/s = batch / seconds per optimizer step (two views, forward + backward). naive = per-region "
                 "crop/pad/resize loop on the CPU then copy; the projection multiplies the step time by the paper's "
                 "100k iterations (all stages).",
    }
    path = write_json(report, args.out / f"bench_pretrain_{_device_name(device)}.json")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
