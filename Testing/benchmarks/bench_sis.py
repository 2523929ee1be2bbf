"""Benchmark of the SIS region pipeline against naive per-slice / per-region baselines.

Measures, in one run, on the LUNG1 DICOM series (512 x 512 slices) and a few OpenKBP volumes (128 x 128):

(a) First-pass superpixels, slices/s.
    - ``end_to_end``: :func:`separeg.sis.regions.compute_region_maps` (body mask, threaded SLIC, region table).
    - ``ours_threads``: the superpixel step alone, :func:`separeg.sis.regions.slic_slice` on each slice's body
      bounding box in a ``ThreadPoolExecutor`` with ``os.cpu_count()`` workers, as ``compute_region_maps`` does
      (one pool per chunk of ``8 * workers`` slices, see below).
    - ``ours_1thread``: the same in a plain loop (the algorithmic gain without the threads).
    - ``naive_box``: ``skimage.segmentation.slic`` on the 3-channel uint8 copy of the same body-box crops,
      one slice after the other.
    - ``ours_slice_threads`` / ``naive_slice``: the same two on whole slices (``extent="slice"``, as the
      paper's reference code does).
    Labels of ours and naive are compared slice by slice (fraction of identical label maps).
(b) Training-batch production from the cached maps, regions/s: :class:`separeg.sis.crops.RegionCropper`
    versus :func:`separeg.sis.crops.naive_crops` (per-region loop with ``F.interpolate``) and versus a
    reference-code style loop (numpy crop, mask, ``np.pad``, ``skimage.transform.resize``, ``torch.stack``),
    for random batches of 32 and 256 regions.
(c) When CUDA is available, (b) with the cropper on the GPU.

Slices/s of the superpixel variants count the slices that hold body (the others are skipped by
``compute_region_maps`` and get no SLIC call); ``end_to_end`` counts all slices of the volume. The variants
take turns chunk by chunk, so that other jobs on a shared machine slow them alike; the report records how
many cores other processes kept busy while timing (``other_load_cores``), since torch's multi-threaded
kernels in particular slow down by large factors when a core is taken. Before each timed phase the script
waits (``--max-wait``, default 60 s) for other processes to leave the CPUs.

Run from the repository root::

    .venv/bin/python Testing/benchmarks/bench_sis.py [--out DIR] [--quick] [--max-wait SECONDS]

The shared data is looked up at ``<repo>/../shared/data`` or ``$SEPAREG_SHARED_DATA``. The results go to
``<out>/bench_sis_<device>.json`` (``cpu-<n>cores`` or the GPU's name; ``..._quick.json`` with ``--quick``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import scipy
import skimage
import torch
from skimage.segmentation import slic
from skimage.transform import resize

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from separeg.io.volumes import read_volume  # noqa: E402
from separeg.runtime.atomic import atomic_path  # noqa: E402
from separeg.sis.crops import RegionCropper, naive_crops, region_square  # noqa: E402
from separeg.sis.regions import (  # noqa: E402
    RegionMaps,
    SISConfig,
    body_box,
    body_mask,
    compute_region_maps,
    slic_slice,
    to_uint8,
    window_hu,
)

DEFAULT_PATIENTS = ("pt_1", "pt_2", "pt_3")
BATCH_SIZES = (32, 256)


# --------------------------------------------------------------------------------------------- data


def shared_data_dir() -> Path:
    """The shared data folder (``$SEPAREG_SHARED_DATA`` or ``<repo>/../shared/data``); exits if it is missing."""
    root = Path(os.environ.get("SEPAREG_SHARED_DATA", REPO.parent / "shared" / "data"))
    if not (root / "openkbp").is_dir() or not (root / "lung1_dicom" / "ct").is_dir():
        raise SystemExit(f"bench_sis: shared data not found at {root} (need openkbp/ and lung1_dicom/ct/); "
                         "check out ../shared beside the repository or set SEPAREG_SHARED_DATA")
    return root


def load_hu(path: Path) -> np.ndarray:
    """``(Z, H, W)`` HU array of a volume file or DICOM folder, read with :func:`separeg.io.volumes.read_volume`."""
    import SimpleITK as sitk

    return sitk.GetArrayFromImage(read_volume(path))


def datasets(root: Path, patients: Sequence[str], quick: bool) -> list[tuple[str, str, Path]]:
    """``(name, group, path)`` of the volumes to benchmark; exits with a message if one is missing."""
    items = [("lung1", "lung1", root / "lung1_dicom" / "ct")]
    items += [(p, "openkbp", root / "openkbp" / f"{p}_ct.nii.gz") for p in (patients[:1] if quick else patients)]
    missing = [str(path) for _, _, path in items if not path.exists()]
    if missing:
        raise SystemExit(f"bench_sis: missing input(s): {', '.join(missing)}")
    return items


# ------------------------------------------------------------------------------------------ timing


def round_robin(fns: dict[str, Callable[[], object]], rounds: int) -> tuple[dict[str, float], dict[str, object]]:
    """Time every function once per round, taking turns, so that a slow spell of a shared machine hits them alike.

    Returns:
        ``(fastest time in s of each function, result of its last call)``.
    """
    best = dict.fromkeys(fns, float("inf"))
    last: dict[str, object] = {}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            last[name] = fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return best, last


def interleaved(fns: dict[str, Callable[[slice], list]], count: int, chunk: int,
                rounds: int) -> tuple[dict[str, float], dict[str, list]]:
    """Time functions over ``count`` items, chunk by chunk, every function on a chunk before the next chunk.

    On a shared machine a slow spell then hits all functions alike, so their ratios stay fair.

    Args:
        fns: each maps a ``slice`` of item positions to the list of its results.
        count, chunk: items in all and per chunk.
        rounds: passes over all items; the fastest pass of each function counts.

    Returns:
        ``(seconds of the fastest pass of each function, its results over all items from the last pass)``.
    """
    best = dict.fromkeys(fns, float("inf"))
    outputs: dict[str, list] = {}
    for _ in range(rounds):
        total = dict.fromkeys(fns, 0.0)
        outputs = {name: [] for name in fns}
        for first in range(0, count, chunk):
            for name, fn in fns.items():
                start = time.perf_counter()
                outputs[name].extend(fn(slice(first, first + chunk)))
                total[name] += time.perf_counter() - start
        best = {name: min(best[name], total[name]) for name in fns}
    return best, outputs


def cpu_snapshot() -> tuple[float, float, float]:
    """``(wall s, busy CPU s of the whole machine, CPU s of this process)``; busy is NaN where /proc/stat is absent."""
    own = os.times()
    busy = float("nan")
    try:
        with open("/proc/stat", encoding="ascii") as stat:
            ticks = [int(v) for v in stat.readline().split()[1:]]
        # user nice system idle iowait irq softirq steal ...: all but idle and iowait count as busy.
        busy = (sum(ticks[:8]) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        pass
    return time.perf_counter(), busy, own.user + own.system


def other_load(before: tuple[float, float, float], after: tuple[float, float, float]) -> float | None:
    """Average number of cores kept busy by other processes between two :func:`cpu_snapshot` calls.

    A shared machine makes multi-threaded timings unreliable (torch's OpenMP threads stall when a core is
    taken); the report records this so that a noisy run can be recognised. None where /proc/stat is absent.
    """
    wall, busy = after[0] - before[0], after[1] - before[1]
    if not wall > 0 or busy != busy:
        return None
    return round(max(busy - (after[2] - before[2]), 0.0) / wall, 2)


def wait_quiet(max_wait_s: float, *, threshold: float = 0.1, window_s: float = 1.0) -> float:
    """Wait until other processes keep fewer than ``threshold`` cores busy for ``window_s``, at most ``max_wait_s``.

    Returns:
        The seconds waited (``max_wait_s`` or more when the machine never became quiet).
    """
    start = time.perf_counter()
    while time.perf_counter() - start < max_wait_s:
        before = cpu_snapshot()
        time.sleep(window_s)
        load = other_load(before, cpu_snapshot())
        if load is None or load < threshold:
            break
    return round(time.perf_counter() - start, 1)


def ratio(fast: float, slow: float) -> float | None:
    """``fast / slow`` of two rates, rounded for the report (None when ``slow`` is 0)."""
    return round(fast / slow, 2) if slow > 0 else None


# ------------------------------------------------------------------------------------ superpixels


def naive_slic(slice_u8: np.ndarray, config: SISConfig) -> np.ndarray:
    """The reference code's call: ``slic`` on the grey slice repeated to three channels."""
    return slic(np.repeat(slice_u8[..., None], 3, -1), n_segments=config.n_segments,
                compactness=config.compactness, sigma=config.sigma, start_label=1)


def slic_threaded(parts: Sequence[np.ndarray], config: SISConfig, workers: int) -> list[np.ndarray]:
    """:func:`slic_slice` over ``parts`` in a thread pool, as :func:`compute_region_maps` runs it."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda part: slic_slice(part, config), parts))


def identical_fraction(a: Sequence[np.ndarray], b: Sequence[np.ndarray]) -> float:
    """Fraction of positions where the two label maps are exactly equal."""
    return sum(bool(np.array_equal(x, y)) for x, y in zip(a, b, strict=True)) / max(len(a), 1)


def maps_match_superpixels(maps: RegionMaps, ks: Sequence[int], boxes: Sequence[tuple[slice, slice]],
                           superpixels: Sequence[np.ndarray]) -> float:
    """Fraction of slices whose kept regions in ``maps`` are superpixels of ``superpixels`` (one-to-one relabelled).

    Checks that the end-to-end run and the separately timed superpixel step produce the same separation.
    """
    same = 0
    for k, box, raw in zip(ks, boxes, superpixels, strict=True):
        kept = maps.labels[k][box]
        inside = kept > 0
        pairs = np.unique(np.stack([kept[inside], raw[inside]]), axis=1)
        # Nothing kept outside the box, one-to-one, and every kept region is a whole superpixel.
        within = int(inside.sum()) == int((maps.labels[k] > 0).sum())
        whole = all(np.array_equal(kept == a, raw == b) for a, b in pairs.T)
        same += bool(within and len(np.unique(pairs[0])) == len(np.unique(pairs[1])) == pairs.shape[1] and whole)
    return same / max(len(ks), 1)


def bench_superpixels(hu: np.ndarray, config: SISConfig, *, workers: int, rounds: int) -> tuple[dict, RegionMaps]:
    """Part (a) on one volume, the fastest of ``rounds`` passes. Returns the report and the region maps.

    ``compute_region_maps`` runs on the whole volume; the superpixel variants take turns on chunks of slices
    (:func:`interleaved`), the threaded ones with a thread pool per chunk.
    """
    depth = hu.shape[0]
    start = time.perf_counter()
    body = body_mask(hu, config.body_threshold_hu)
    t_body = time.perf_counter() - start
    grey = to_uint8(hu, config.hu_window)
    ks = [k for k in range(depth) if body[k].any()]
    boxes = [body_box(body[k], config.body_margin) for k in ks]
    box_parts = [np.ascontiguousarray(grey[k][box]) for k, box in zip(ks, boxes, strict=True)]
    slice_parts = [grey[k] for k in ks]
    n = len(ks)

    # Warm-up: imports, the Lab table, allocator, thread start-up.
    slic_threaded(box_parts[:workers], config, workers)
    naive_slic(box_parts[0], config)

    end_to_end, last = round_robin({"end_to_end": lambda: compute_region_maps(hu, config, workers=None)}, rounds)
    maps = last["end_to_end"]
    # Chunks of 8 slices per worker: the thread pool's idle tail at the end of a chunk stays small.
    step = 8 * workers
    seconds, results = interleaved({
        "ours_threads": lambda sl: slic_threaded(box_parts[sl], config, workers),
        "ours_1thread": lambda sl: [slic_slice(p, config) for p in box_parts[sl]],
        "naive_box": lambda sl: [naive_slic(p, config) for p in box_parts[sl]],
        "ours_slice_threads": lambda sl: slic_threaded(slice_parts[sl], config, workers),
        "naive_slice": lambda sl: [naive_slic(p, config) for p in slice_parts[sl]],
    }, n, step, rounds)
    seconds = end_to_end | seconds
    rates = {name: round((depth if name == "end_to_end" else n) / t, 2) for name, t in seconds.items()}
    report = {
        "shape": list(hu.shape),
        "slices": depth,
        "body_slices": n,
        "regions": len(maps),
        "mean_box_shape": [round(float(np.mean([p.shape[i] for p in box_parts])), 1) for i in (0, 1)],
        "workers": workers,
        "rounds": rounds,
        "chunk_slices": step,
        "seconds": {"body_mask": round(t_body, 4)} | {name: round(t, 4) for name, t in seconds.items()},
        "slices_per_s": rates,
        "speedup": speedups(rates),
        "identical_labels": {
            "box": identical_fraction(results["ours_threads"], results["naive_box"]),
            "box_1thread": identical_fraction(results["ours_1thread"], results["naive_box"]),
            "slice": identical_fraction(results["ours_slice_threads"], results["naive_slice"]),
            "end_to_end_uses_ours": maps_match_superpixels(maps, ks, boxes, results["ours_threads"]),
        },
    }
    return report, maps


def speedups(rates: dict[str, float]) -> dict[str, float | None]:
    """Ratios of the superpixel rates that the report compares."""
    return {
        "ours_threads_vs_naive_box": ratio(rates["ours_threads"], rates["naive_box"]),
        "ours_1thread_vs_naive_box": ratio(rates["ours_1thread"], rates["naive_box"]),
        "ours_threads_vs_naive_slice": ratio(rates["ours_threads"], rates["naive_slice"]),
        "ours_slice_threads_vs_naive_slice": ratio(rates["ours_slice_threads"], rates["naive_slice"]),
        "end_to_end_vs_naive_slice": ratio(rates["end_to_end"], rates["naive_slice"]),
    }


# ------------------------------------------------------------------------------------------ crops


def skimage_crops(image: np.ndarray, maps: RegionMaps, index: np.ndarray, crop_size: int = 128, *,
                  mode: str = "reflect") -> torch.Tensor:
    """Reference-code style crops: per region numpy crop, mask, pad to a centred square, skimage resize, stack.

    ``mode`` is ``resize``'s edge mode (its default, ``reflect``, in the timed baseline).
    """
    out = []
    for i in np.asarray(index):
        resized = resize(region_square(image, maps, i), (crop_size, crop_size), order=1, anti_aliasing=False,
                         preserve_range=True, mode=mode)
        out.append(torch.from_numpy(resized.astype(np.float32))[None])
    return torch.stack(out)


def single_threaded(fn: Callable[[np.ndarray], torch.Tensor], index: np.ndarray) -> torch.Tensor:
    """``fn(index)`` with torch limited to one intra-op thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return fn(index)
    finally:
        torch.set_num_threads(threads)


def max_abs_diff(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> float:
    """Largest absolute difference between corresponding tensors of two lists."""
    return max(float((x - y).abs().max()) for x, y in zip(a, b, strict=True))


def time_batches(fn: Callable[[np.ndarray], torch.Tensor], batches: Sequence[np.ndarray], *, min_batches: int,
                 budget_s: float, warmup: int = 2, sync: Callable[[], None] = lambda: None) -> tuple[float, int]:
    """Regions/s of ``fn`` over ``batches`` (cycled) after ``warmup`` untimed calls. Returns ``(rate, batches timed)``.

    ``sync`` is called before the clock starts and before it stops (``torch.cuda.synchronize`` for a GPU).
    """
    for index in batches[:warmup]:
        fn(index)
    sync()
    count = regions = 0
    start = time.perf_counter()
    while count < min_batches or time.perf_counter() - start < budget_s:
        index = batches[count % len(batches)]
        fn(index)
        regions += len(index)
        count += 1
    sync()
    return regions / (time.perf_counter() - start), count


def batch_window(maps: RegionMaps, index: np.ndarray) -> int:
    """Side of the window :class:`RegionCropper` cuts for a batch: the largest region square, within the slice."""
    boxes = maps.boxes[index].astype(np.int64)
    side = np.maximum(boxes[:, 1] - boxes[:, 0], boxes[:, 3] - boxes[:, 2]) + 1
    return int(min(side.max(), *maps.labels.shape[1:]))


def bench_crops(hu: np.ndarray, maps: RegionMaps, config: SISConfig, *, budget_s: float, rounds: int,
                max_wait_s: float = 0.0, seed: int = 0) -> dict:
    """Part (b), and (c) when CUDA is available, on one volume: one entry per batch size.

    Each method is timed for ``budget_s / rounds`` seconds per round, methods taking turns; the best round counts.
    Before each batch size, waits up to ``max_wait_s`` for other processes to leave the CPUs (:func:`wait_quiet`).
    """
    image = window_hu(hu, config.hu_window)
    cropper = RegionCropper(image, maps, crop_size=config.crop_size)
    gpu_cropper = RegionCropper(image, maps, crop_size=config.crop_size, device="cuda") \
        if torch.cuda.is_available() else None
    rng = np.random.default_rng(seed)
    results = []
    for size in BATCH_SIZES:
        batches = [rng.choice(len(maps), size=size, replace=len(maps) < size) for _ in range(16)]
        check = batches[:4]
        reference = [naive_crops(image, maps, idx, config.crop_size) for idx in check]
        batched = [cropper.crops(idx) for idx in check]
        via_skimage = [skimage_crops(image, maps, idx, config.crop_size) for idx in check]
        methods = {"batched": cropper.crops,
                   "batched_1thread": lambda idx: single_threaded(cropper.crops, idx),
                   "naive_crops": lambda idx: naive_crops(image, maps, idx, config.crop_size),
                   "naive_skimage": lambda idx: skimage_crops(image, maps, idx, config.crop_size)}
        rates, counts = dict.fromkeys(methods, 0.0), dict.fromkeys(methods, 0)
        waited = wait_quiet(max_wait_s)
        before = cpu_snapshot()
        for turn in range(rounds):
            for name, fn in methods.items():
                rate, count = time_batches(fn, batches, min_batches=3, budget_s=budget_s / rounds,
                                           warmup=2 if turn == 0 else 0)
                rates[name], counts[name] = max(rates[name], round(rate, 1)), counts[name] + count
        entry = {
            "batch_size": size,
            "waited_for_quiet_s": waited,
            "other_load_cores": other_load(before, cpu_snapshot()),
            "mean_window": round(float(np.mean([batch_window(maps, idx) for idx in batches])), 1),
            "regions_per_s": rates,
            "batches_timed": counts,
            "speedup": {
                "batched_vs_naive_crops": ratio(rates["batched"], rates["naive_crops"]),
                "batched_vs_naive_skimage": ratio(rates["batched"], rates["naive_skimage"]),
                "batched_1thread_vs_naive_crops": ratio(rates["batched_1thread"], rates["naive_crops"]),
            },
            "max_abs_diff": {
                "batched_vs_naive_crops": max_abs_diff(batched, reference),
                "batched_vs_naive_skimage": max_abs_diff(batched, via_skimage),
                # resize's default edge mode (reflect) interpolates towards the second-to-last pixel where an
                # upsampled crop's outer output pixels fall beyond the last input pixel centre; F.interpolate
                # clamps. With mode="edge" the two agree to float rounding.
                "batched_vs_skimage_edge_mode": max_abs_diff(batched, [
                    skimage_crops(image, maps, idx, config.crop_size, mode="edge") for idx in check]),
            },
        }
        if gpu_cropper is not None:
            rate, count = time_batches(gpu_cropper.crops, batches, min_batches=20, budget_s=budget_s,
                                       sync=torch.cuda.synchronize)
            diff = max_abs_diff([gpu_cropper.crops(idx).cpu() for idx in check], reference)
            entry["gpu"] = {"regions_per_s": round(rate, 1), "batches_timed": count,
                            "speedup_vs_cpu_batched": ratio(rate, rates["batched"]),
                            "speedup_vs_naive_crops": ratio(rate, rates["naive_crops"]),
                            "max_abs_diff_vs_naive_crops": diff}
        results.append(entry)
    return {"regions": len(maps), "batches": results}


# ----------------------------------------------------------------------------------------- report


def device_label() -> str:
    """``cpu-<n>cores``, or the CUDA device's name as a file-name slug."""
    if torch.cuda.is_available():
        return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(0).lower()).strip("-")
    return f"cpu-{os.cpu_count()}cores"


def environment() -> dict:
    """Versions and machine of this run."""
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "skimage": skimage.__version__,
        "scipy": scipy.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def aggregate(volumes: dict[str, dict]) -> dict:
    """OpenKBP totals: slices (regions) over summed seconds, so every volume counts by its size."""
    names = list(volumes)
    sp = {name: volumes[name]["superpixels"] for name in names}
    per_s = {}
    for key in sp[names[0]]["slices_per_s"]:
        count_key = "slices" if key == "end_to_end" else "body_slices"
        per_s[key] = round(sum(sp[n][count_key] for n in names) / sum(sp[n]["seconds"][key] for n in names), 2)
    identical = {kind: sum(sp[n]["identical_labels"][kind] * sp[n]["body_slices"] for n in names)
                 / sum(sp[n]["body_slices"] for n in names) for kind in sp[names[0]]["identical_labels"]}
    crops = []
    for i, size in enumerate(BATCH_SIZES):
        # Harmonic mean of the per-volume rates = regions/s over equal numbers of regions from each volume.
        rates = {key: round(len(names) / sum(1.0 / volumes[n]["crops"]["batches"][i]["regions_per_s"][key]
                                             for n in names), 1)
                 for key in ("batched", "batched_1thread", "naive_crops", "naive_skimage")}
        crops.append({"batch_size": size, "regions_per_s": rates,
                      "speedup": {"batched_vs_naive_crops": ratio(rates["batched"], rates["naive_crops"]),
                                  "batched_vs_naive_skimage": ratio(rates["batched"], rates["naive_skimage"]),
                                  "batched_1thread_vs_naive_crops": ratio(rates["batched_1thread"],
                                                                          rates["naive_crops"])},
                      "max_abs_diff_vs_naive_crops": max(volumes[n]["crops"]["batches"][i]["max_abs_diff"]
                                                         ["batched_vs_naive_crops"] for n in names)})
    return {
        "volumes": names,
        "slices": sum(sp[n]["slices"] for n in names),
        "body_slices": sum(sp[n]["body_slices"] for n in names),
        "regions": sum(sp[n]["regions"] for n in names),
        "slices_per_s": per_s,
        "speedup": speedups(per_s),
        "identical_labels": identical,
        "crops": crops,
    }


def summary(report: dict) -> str:
    """Short human-readable digest of the report."""
    lines = [f"bench_sis on {report['device']} ({report['environment']['cpu_count']} CPUs, "
             f"torch {report['environment']['torch']}), {report['runtime_s']:.0f} s, "
             f"waited {report['waited_for_quiet_s']} s for a quiet machine; other processes kept at most "
             f"{report['other_load_cores']} cores busy on average during a timed phase"]
    rows = [("lung1", report["datasets"]["lung1"]["superpixels"], report["datasets"]["lung1"]["crops"]["batches"])]
    if "openkbp" in report["aggregate"]:
        agg = report["aggregate"]["openkbp"]
        rows.append(("openkbp (" + ",".join(agg["volumes"]) + ")", agg, agg["crops"]))
    for name, sp, crops in rows:
        r, s, same = sp["slices_per_s"], sp["speedup"], sp["identical_labels"]
        lines.append(f"{name}: {sp['body_slices']} body slices, {sp['regions']} regions")
        lines.append(f"  superpixels slices/s: ours {r['ours_threads']} (1 thread {r['ours_1thread']}) vs naive box "
                     f"{r['naive_box']} -> x{s['ours_threads_vs_naive_box']}; whole slice: ours "
                     f"{r['ours_slice_threads']} vs naive {r['naive_slice']} "
                     f"-> x{s['ours_slice_threads_vs_naive_slice']}")
        lines.append(f"  end-to-end compute_region_maps {r['end_to_end']} slices/s (x{s['end_to_end_vs_naive_slice']} "
                     f"vs naive whole slice); identical labels box {same['box']:.3f}, slice {same['slice']:.3f}, "
                     f"end-to-end maps from the same superpixels {same['end_to_end_uses_ours']:.3f}")
        for c in crops:
            rr, cs = c["regions_per_s"], c["speedup"]
            diff = c.get("max_abs_diff_vs_naive_crops", c.get("max_abs_diff", {}).get("batched_vs_naive_crops"))
            lines.append(f"  crops B={c['batch_size']}: batched {rr['batched']} regions/s "
                         f"(1 thread {rr['batched_1thread']}) vs naive_crops {rr['naive_crops']} "
                         f"(x{cs['batched_vs_naive_crops']}) vs skimage "
                         f"{rr['naive_skimage']} (x{cs['batched_vs_naive_skimage']}); max |diff| {diff:.2e}")
    if report["gpu"]:
        for name, entries in report["gpu"]["crops"].items():
            lines.append(f"gpu {report['gpu']['name']} {name}: " + ", ".join(
                f"B={e['batch_size']} {e['regions_per_s']} regions/s (x{e['speedup_vs_naive_crops']} vs naive_crops)"
                for e in entries))
    else:
        lines.append(f"gpu: {report['gpu_note']}")
    return "\n".join(lines)


def phases(results: dict[str, dict]) -> list[dict]:
    """The timed phases of the per-dataset results: superpixels and each crop batch size."""
    return [phase for r in results.values() for phase in (r["superpixels"], *r["crops"]["batches"])]


def timed_phase_load(results: dict[str, dict]) -> float | None:
    """The largest ``other_load_cores`` of the timed phases (None where it could not be measured)."""
    loads = [phase["other_load_cores"] for phase in phases(results)]
    return None if None in loads else max(loads)


def write_report(report: dict, path: Path) -> Path:
    """Write the JSON atomically (temporary file beside it, then ``os.replace``)."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(report, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    return path


def run(out_dir: Path, *, quick: bool, patients: Sequence[str], max_wait_s: float = 0.0) -> tuple[dict, Path]:
    """Run the whole benchmark and write its report. Returns ``(report, path)``.

    ``max_wait_s``: before each timed phase, wait up to this long for other processes to leave the CPUs.
    """
    start = time.perf_counter()
    run_start = cpu_snapshot()
    root = shared_data_dir()
    workers = os.cpu_count() or 1
    torch.set_num_threads(workers)
    config = SISConfig()
    crop_budget = 0.3 if quick else 0.8
    results: dict[str, dict] = {}
    for name, group, path in datasets(root, patients, quick):
        hu = load_hu(path)
        if quick:
            middle = hu.shape[0] // 2
            hu = hu[max(middle - 16, 0):middle + 16]
        # Fastest of two passes where a pass is short (OpenKBP); LUNG1's single pass takes about a minute.
        rounds = 1 if quick or hu.size > 4_000_000 else 2
        waited = wait_quiet(max_wait_s)
        before = cpu_snapshot()
        superpixels, maps = bench_superpixels(hu, config, workers=workers, rounds=rounds)
        superpixels["other_load_cores"] = other_load(before, cpu_snapshot())
        superpixels["waited_for_quiet_s"] = waited
        crops = bench_crops(hu, maps, config, budget_s=crop_budget, rounds=1 if quick else 2, max_wait_s=max_wait_s)
        results[name] = {"group": group, "path": str(path.relative_to(root)), "superpixels": superpixels,
                         "crops": crops}
    openkbp = {n: r for n, r in results.items() if r["group"] == "openkbp"}
    report = {
        "benchmark": "bench_sis",
        "timestamp": datetime.now(UTC).isoformat(timespec="seconds"),
        "device": device_label(),
        "quick": quick,
        "environment": environment(),
        "config": asdict(config),
        "notes": " ".join([
            "superpixels: slices/s count the slices holding body (end_to_end: all slices of the volume);",
            "seconds are the fastest of 'rounds' passes, the variants taking turns chunk by chunk (chunk_slices).",
            "crops: regions/s over 16 random batches (seed 0), best of 2 turns of the methods;",
            "batched_1thread is the batched cropper under torch.set_num_threads(1).",
            "openkbp aggregate: summed slices over summed seconds, harmonic mean of the per-volume regions/s.",
            "other_load_cores: average cores kept busy by other processes while timing (0 = quiet machine;",
            "top level: the largest over the timed phases);",
            "waited_for_quiet_s: seconds waited for a quiet machine before the phase (--max-wait).",
        ]),
        "other_load_cores": timed_phase_load(results),
        "other_load_cores_whole_run": other_load(run_start, cpu_snapshot()),
        "max_wait_s": max_wait_s,
        "waited_for_quiet_s": round(sum(phase["waited_for_quiet_s"] for phase in phases(results)), 1),
        "datasets": results,
        "aggregate": {"openkbp": aggregate(openkbp)} if openkbp else {},
        "gpu": None,
        "gpu_note": "no GPU available in this run",
    }
    if torch.cuda.is_available():
        report["gpu"] = {"name": torch.cuda.get_device_name(0),
                         "crops": {name: [{"batch_size": b["batch_size"]} | b["gpu"] for b in r["crops"]["batches"]]
                                   for name, r in results.items()}}
        report["gpu_note"] = "RegionCropper on CUDA, timed with torch.cuda.synchronize around the batches"
    report["runtime_s"] = round(time.perf_counter() - start, 1)
    name = f"bench_sis_{report['device']}{'_quick' if quick else ''}.json"
    return report, write_report(report, out_dir / name)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "Testing" / "benchmarks" / "results",
                        help="folder for the JSON report (default: Testing/benchmarks/results)")
    parser.add_argument("--quick", action="store_true",
                        help="32 central slices, one OpenKBP volume, short timing budgets (smoke test)")
    parser.add_argument("--patients", default=",".join(DEFAULT_PATIENTS),
                        help="OpenKBP patients, comma-separated (default: %(default)s)")
    parser.add_argument("--max-wait", type=float, default=60.0,
                        help="seconds to wait at most, before each timed phase, for other processes to leave the "
                             "CPUs (default: %(default)s; 0: do not wait)")
    args = parser.parse_args(argv)
    report, path = run(args.out, quick=args.quick, patients=[p for p in args.patients.split(",") if p],
                       max_wait_s=args.max_wait)
    print(summary(report))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
