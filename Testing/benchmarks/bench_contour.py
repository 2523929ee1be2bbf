"""Auto-contour speed and memory on a CPU (issue 24): the path before issue 24 vs today's, in the same run.

Every measurement is a fresh ``separeg contour --device cpu`` process with the shipped model ``hn-oar-7``: the wall
time includes the start-up (Python, torch, MONAI, reading the CT), and the peak RSS is the child's own
(``wait4``). ``old`` is ``separeg.segment.contour_legacy._run_contour_legacy`` (whole-volume windowing, one slice
at a time, 8-channel float logits resampled to every input slice, whole-volume post-processing, OpenMP's default wait
policy); ``new`` is ``separeg contour`` as shipped. The two alternate, ``--repeats`` times each, on:
- ``lung1``: the LUNG1 DICOM series (134 x 512 x 512, 0.98 mm pixels; the model works at 3.9 mm);
- ``openkbp``: OpenKBP pt_209 (128^3 NIfTI at 3.9 mm, the model's own grid).
Each run's seconds per stage come from the child's ``-v`` log; start-up = wall - their sum. The per-organ DSC
between the two paths' label maps is recorded, and the load average before every run (the figures are only
comparable within one run on a busy machine). ``--agreement`` also contours the 10 validation patients of
``hn-oar-7`` and a copy of each resampled to 1 mm pixels with both paths (in-process) and records the per-organ
DSC between them.

``--candidate MODEL`` compares a candidate model (a bundle path or name; ``A+B``: an ensemble) with the shipped one
instead, both on today's path, alternating the same way (issue 31: a retrained ``hn-oar-7`` before and after); the
result goes to ``bench_contour_candidate_cpu-<cores>cores.json`` with the arms ``shipped`` and ``candidate``.

Usage: ``python Testing/benchmarks/bench_contour.py [--out DIR] [--repeats N] [--cases lung1,openkbp]
[--agreement] [--candidate MODEL]``.
"""

from __future__ import annotations

import argparse
import ast
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from separeg.runtime.atomic import write_json  # noqa: E402

DATA = Path(os.environ.get("SEPAREG_SHARED_DATA", REPO.parent / "shared" / "data"))
CASES = {"lung1": DATA / "lung1_dicom" / "ct", "openkbp": DATA / "openkbp" / "pt_209_ct.nii.gz"}
MODEL = "hn-oar-7"
OLD = ("import sys; import separeg.segment.contour as c, separeg.segment.contour_legacy as legacy; "
       "c.run_contour = legacy._run_contour_legacy; "
       "from separeg.cli import main; sys.exit(main(sys.argv[1:]))")
STAGES_LOG = "contour seconds per stage: "


def _run(path: str, volume: Path, out: Path, model: str = MODEL) -> dict:
    """One contour in a fresh process: wall seconds, peak RSS (MB), seconds per stage, load before."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
    first, *members = model.split("+")  # "A+B": the ensemble of A and B
    args = ["-v", "contour", str(volume), "--model", first, *(a for m in members for a in ("--ensemble", m)),
            "--out", str(out), "--device", "cpu"]
    command = [sys.executable, "-c", OLD, *args] if path == "old" else [sys.executable, "-m", "separeg.cli", *args]
    load = os.getloadavg()[0]
    start = time.perf_counter()
    proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    stderr = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{path} contour of {volume} failed:\n{stderr[-2000:]}")
    stages = next(ast.literal_eval(line.split(STAGES_LOG, 1)[1]) for line in stderr.splitlines() if STAGES_LOG in line)
    stages["start-up (imports, parsing)"] = round(wall - sum(stages.values()), 2)
    return {"wall_s": round(wall, 2), "peak_rss_mb": round(usage.ru_maxrss / 1024, 1), "load_before": round(load, 2),
            "stages_s": {k: round(v, 2) for k, v in stages.items()}}


def _labels(path: Path) -> np.ndarray:
    import SimpleITK as sitk

    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def _dsc(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    from separeg.evaluate.metrics import dice

    return {str(v): round(float(dice(a == v, b == v)), 5) for v in range(1, 256) if (a == v).any() or (b == v).any()}


def speed(cases: list[str], repeats: int, work: Path, arms: dict[str, tuple[str, str]] | None = None) -> dict:
    """Per case, the arms alternating ``repeats`` times; ``arms``: name -> (path, model), the baseline first
    (default: the old and new path with the shipped model)."""
    arms = arms or {"old": ("old", MODEL), "new": ("new", MODEL)}
    (base, _), (other, _) = arms.items()
    results = {}
    for case in cases:
        runs: dict[str, list[dict]] = {name: [] for name in arms}
        for i in range(repeats):
            for name, (path, model) in arms.items():
                runs[name].append(_run(path, CASES[case], work / case / f"{name}{i}", model))
                print(f"{case:8s} {name}: {runs[name][-1]}", flush=True)
        row = {path: {"wall_s_median": statistics.median(r["wall_s"] for r in rs),
                      "peak_rss_mb_median": statistics.median(r["peak_rss_mb"] for r in rs),
                      "stages_s_median": {k: statistics.median(r["stages_s"][k] for r in rs)
                                          for k in rs[0]["stages_s"]},
                      "runs": rs} for path, rs in runs.items()}
        row["speedup_wall"] = round(row[base]["wall_s_median"] / row[other]["wall_s_median"], 2)
        row["peak_rss_ratio"] = round(row[other]["peak_rss_mb_median"] / row[base]["peak_rss_mb_median"], 2)
        row[f"dsc_{base}_vs_{other}"] = _dsc(_labels(work / case / f"{base}0" / "segmentation.nii.gz"),
                                             _labels(work / case / f"{other}0" / "segmentation.nii.gz"))
        results[case] = row
    return results


def _one_mm(volume: Path, out: Path) -> Path:
    """``volume`` resampled to 1 mm pixels in plane (slices kept), like a clinical CT."""
    import SimpleITK as sitk

    image = sitk.ReadImage(str(volume))
    size = [round(n * s) for n, s in zip(image.GetSize()[:2], image.GetSpacing()[:2], strict=True)]
    image = sitk.Resample(image, [*size, image.GetSize()[2]], sitk.Transform(), sitk.sitkLinear, image.GetOrigin(),
                          (1.0, 1.0, image.GetSpacing()[2]), image.GetDirection(), -1000)
    sitk.WriteImage(image, str(out))
    return out


def agreement(work: Path) -> dict:
    """Per-organ DSC between the two paths on the validation patients of the model, native and at 1 mm."""
    from separeg.runtime.bundle import load_bundle
    from separeg.runtime.events import Events
    from separeg.runtime.model_store import resolve_model
    from separeg.segment.contour import ContourJob, run_contour
    from separeg.segment.contour_legacy import _run_contour_legacy

    patients = load_bundle(resolve_model(MODEL)).metadata["release"]["validation"]["patients"]
    rows = {}
    for patient in patients:
        native = DATA / "openkbp" / f"{patient}_ct.nii.gz"
        for name, volume in ((patient, native), (f"{patient}_1mm", None)):
            volume = volume or _one_mm(native, work / f"{patient}_1mm.nii.gz")
            labels = {}
            for path, run in (("old", _run_contour_legacy), ("new", run_contour)):
                result = run(ContourJob(volume=volume, model=MODEL, out_dir=work / "agreement" / name / path,
                                        device="cpu"), Events())
                labels[path] = _labels(result.segmentation)
            rows[name] = _dsc(labels["old"], labels["new"])
            print(f"{name:12s} DSC old vs new: {rows[name]}", flush=True)
    scores = [v for row in rows.values() for v in row.values()]
    return {"cases": rows, "min_dsc": min(scores), "mean_dsc": round(float(np.mean(scores)), 5)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "Testing" / "benchmarks" / "results")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cases", default="lung1,openkbp")
    parser.add_argument("--agreement", action="store_true", help="also the 10 validation patients, native and 1 mm")
    parser.add_argument("--candidate", default=None, metavar="MODEL",
                        help="compare this model with the shipped one (both on today's path) instead of the paths")
    args = parser.parse_args(argv)
    arms = {"shipped": ("new", MODEL), "candidate": ("new", args.candidate)} if args.candidate else None
    cores = len(os.sched_getaffinity(0))
    load_start = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        results = speed(args.cases.split(","), args.repeats, Path(tmp), arms)
        names = list(arms or ("old", "new"))
        loads = [r["load_before"] for row in results.values() for p in names for r in row[p]["runs"]]
        report = {"benchmark": "contour", "created": datetime.now(UTC).isoformat(timespec="seconds"),
                  "device": f"cpu-{cores}cores", "platform": platform.platform(),
                  "versions": {"python": platform.python_version(), **_versions()},
                  "setup": {"model": MODEL, "candidate": args.candidate, "repeats": args.repeats,
                            "cases": {k: str(CASES[k]) for k in results},
                            "command": "separeg -v contour CASE --model hn-oar-7 --out DIR --device cpu"},
                  "machine": {"cores": cores, "load_average_at_start": [round(x, 2) for x in load_start],
                              "load_before_runs_max": max(loads), "load_before_runs_min": min(loads),
                              "busy": max(loads) >= 0.5 * cores,
                              "note": "busy = the 1-minute load average before some run was at least half the "
                                      "cores: other jobs shared the CPU, so compare the arms of this run only"},
                  "cases": results}
        if args.agreement:
            report["agreement"] = agreement(Path(tmp))
    name = "bench_contour_candidate" if args.candidate else "bench_contour"
    path = write_json(report, args.out / f"{name}_cpu-{cores}cores.json")
    print(f"wrote {path}")
    return 0


def _versions() -> dict:
    import torch

    return {"torch": torch.__version__}


if __name__ == "__main__":
    sys.exit(main())
