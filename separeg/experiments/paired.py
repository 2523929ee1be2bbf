"""Paired comparison of two experiment arms on the same test patients, draws and seeds (``separeg experiment``).

For every run (draw of X_tr x fine-tuning seed) that both arms finished, each test patient's all-organ DSC (mean
over the organs its reference contours; a missed organ counts 0) is paired between the arms; a patient's
difference is averaged over the runs, so patients, not runs, are the unit. Reported: the mean difference B - A in
DSC points with a percentile-bootstrap 95 % confidence interval over patients (10,000 resamples, fixed seed), the
Wilcoxon signed-rank p, the same per organ; the difference per run with a bootstrap CI over runs (runs as the
unit: the run-to-run spread of one-case fine-tuning is larger than the patient-to-patient one); and the
epoch/step at which each arm's fine-tuning peaked on its validation cases (so a reader can see both arms
converged inside their budget).

    python -m separeg.experiments.paired OUT_A "Method A" OUT_B "Method B" --size 1 --out paired.md
"""

from __future__ import annotations

import argparse
import csv
import json
from collections import defaultdict
from pathlib import Path

import numpy as np

from separeg.runtime.atomic import atomic_path

__all__ = ["per_patient", "paired_difference", "per_run_difference", "bootstrap_ci", "peaks", "compare", "main"]

ALL = "All OARs"


def per_patient(out: Path, method: str, size: int) -> dict[str, dict[str, dict[str, float]]]:
    """``{run: {patient: {organ or "All OARs": DSC %}}}`` of one arm's finished runs; a run is named by its draw and,
    for the second and later fine-tuning seeds, its seed (``d0``, ``d0_s1``: the run folder less ``n<size>_``)."""
    runs: dict[str, dict[str, dict[str, float]]] = {}
    for metrics in sorted((Path(out) / "runs" / method).glob(f"n{size}_d*/metrics.csv")):
        run = metrics.parent.name.removeprefix(f"n{size}_")
        patients: dict[str, dict[str, float]] = defaultdict(dict)
        with open(metrics, newline="", encoding="utf-8") as f:
            for row in csv.DictReader(f):
                if row["status"] in ("ok", "missed"):
                    dsc = float(row["dsc"]) if row["status"] == "ok" and row["dsc"] else 0.0
                    patients[row["case"]][row["name"]] = 100.0 * dsc
        for organs in patients.values():
            organs[ALL] = float(np.mean(list(organs.values())))
        runs[run] = dict(patients)
    return runs


def paired_difference(a: dict, b: dict, key: str = ALL, *, resamples: int = 10_000, seed: int = 0) -> dict:
    """B - A over the patients both arms scored on ``key`` in shared runs (differences averaged over runs)."""
    from scipy.stats import wilcoxon

    differences: dict[str, list[float]] = defaultdict(list)
    shared = sorted(set(a) & set(b))
    for run in shared:
        for patient in sorted(set(a[run]) & set(b[run])):
            if key in a[run][patient] and key in b[run][patient]:
                differences[patient].append(b[run][patient][key] - a[run][patient][key])
    d = np.array([np.mean(v) for v in differences.values()])
    if len(d) == 0:
        return {"n": 0, "runs": 0, "draws": 0, "seeds": 0}
    p = float(wilcoxon(d).pvalue) if len(d) >= 2 and np.any(d != 0) else None
    return {"n": len(d), "runs": len(shared), "draws": len({r.split("_s")[0] for r in shared}),
            "seeds": len({r.partition("_s")[2] for r in shared}), "mean": float(d.mean()),
            "ci95": bootstrap_ci(d, resamples, seed), "wilcoxon_p": p,
            "a_mean": _arm_mean(a, shared, differences, key), "b_mean": _arm_mean(b, shared, differences, key)}


def bootstrap_ci(values: np.ndarray, resamples: int = 10_000, seed: int = 0) -> list[float]:
    """Percentile-bootstrap 95 % CI of the mean of ``values``."""
    boot = values[np.random.default_rng(seed).integers(0, len(values), (resamples, len(values)))].mean(1)
    return [float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))]


def _arm_mean(arm: dict, runs: list[str], patients: dict, key: str) -> float:
    """One arm's mean over the paired patients, each averaged over the shared runs (as the differences are)."""
    values = [np.mean([arm[r][p][key] for r in runs if p in arm[r] and key in arm[r][p]]) for p in patients]
    return float(np.mean(values))


def per_run_difference(a: dict, b: dict, key: str = ALL) -> dict[str, float]:
    """B - A per shared run, mean over the patients both arms scored in it: the spread over draws and seeds that
    the per-patient CI (patients averaged over runs) does not show."""
    found = {}
    for run in sorted(set(a) & set(b)):
        d = [b[run][p][key] - a[run][p][key] for p in sorted(set(a[run]) & set(b[run]))
             if key in a[run][p] and key in b[run][p]]
        if d:
            found[run] = float(np.mean(d))
    return found


def peaks(out: Path, method: str, size: int) -> list[dict]:
    """Per finished run: the epoch and step where validation DSC peaked, and the epochs run."""
    found = []
    for history in sorted((Path(out) / "runs" / method).glob(f"n{size}_d*/finetune/history.json")):
        data = json.loads(history.read_text(encoding="utf-8"))
        best = next((e for e in data["epochs"] if e["epoch"] == data["best_epoch"]), {})
        found.append({"run": history.parent.parent.name, "best_epoch": data["best_epoch"],
                      "best_step": best.get("step"), "epochs_run": len(data["epochs"]),
                      "best_validation_dsc": None if data["best"] is None else 100.0 * data["best"]})
    return found


def compare(out_a: Path, method_a: str, out_b: Path, method_b: str, size: int,
            names: tuple[str, str] | None = None) -> tuple[dict, str]:
    """The paired comparison as a dict and as Markdown; ``names``: how the two arms are called in the text (default:
    their method names, which may be equal when the arms are two runs of one method with different settings)."""
    a, b = per_patient(out_a, method_a, size), per_patient(out_b, method_b, size)
    name_a, name_b = names or (method_a, method_b)
    organs = sorted({o for run in (*a.values(), *b.values()) for p in run.values() for o in p} - {ALL})
    rows = {key: paired_difference(a, b, key) for key in [ALL, *organs]}
    runs = per_run_difference(a, b)
    result = {"a": name_a, "b": name_b, "size": size, "differences": rows, "per_run": runs,
              "peaks": {name_a: peaks(out_a, method_a, size), name_b: peaks(out_b, method_b, size)}}
    lines = [f"## {name_b} − {name_a}, |X_tr| = {size}", "",
             f"Paired by run and test patient ({rows[ALL].get('draws', 0)} draw(s) x {rows[ALL].get('seeds', 0)} "
             "fine-tuning seed(s)); DSC points, mean over patients "
             "with a bootstrap 95 % CI; Wilcoxon signed-rank p.", "",
             f"| organ | patients | {name_a} | {name_b} | difference | 95 % CI | p |",
             "|---|---|---|---|---|---|---|"]
    for key, row in rows.items():
        if not row.get("n"):
            continue
        p = "–" if row["wilcoxon_p"] is None else f"{row['wilcoxon_p']:.3f}"
        lines.append(f"| {key} | {row['n']} | {row['a_mean']:.1f} | {row['b_mean']:.1f} | {row['mean']:+.1f} | "
                     f"{row['ci95'][0]:+.1f} to {row['ci95'][1]:+.1f} | {p} |")
    if runs:
        values = np.array(list(runs.values()))
        result["run_level"] = {"runs": len(values), "mean": float(values.mean()), "sd": float(values.std(ddof=1))
                               if len(values) > 1 else None, "ci95": bootstrap_ci(values)}
        lines += ["", f"{ALL} difference per run (mean over its patients; {name_b} ahead in "
                      f"{sum(v > 0 for v in runs.values())} of {len(runs)}): "
                      + ", ".join(f"{run} {value:+.1f}" for run, value in runs.items()),
                  "", f"Over runs instead of patients (runs as the unit, percentile bootstrap over the "
                      f"{len(values)} runs): {values.mean():+.1f} (95 % CI {result['run_level']['ci95'][0]:+.1f} to "
                      f"{result['run_level']['ci95'][1]:+.1f}). The per-patient CI above treats the runs as "
                      "fixed; this one treats them as a sample of draws and seeds."]
    lines += ["", "Validation peak per run (epoch / step of the best checkpoint, epochs run):", ""]
    for method, found in result["peaks"].items():
        cells = ", ".join(f"{r['run']}: {r['best_epoch']} / {r['best_step']} of {r['epochs_run']}" for r in found)
        lines.append(f"- {method}: {cells or 'none finished'}")
    return result, "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_a", type=Path)
    parser.add_argument("method_a")
    parser.add_argument("out_b", type=Path)
    parser.add_argument("method_b")
    parser.add_argument("--size", type=int, default=1)
    parser.add_argument("--names", nargs=2, metavar=("A", "B"), help="the arms' names in the table (default: methods)")
    parser.add_argument("--out", type=Path, required=True, help="Markdown file; a .json beside it holds the numbers")
    args = parser.parse_args(argv)
    result, text = compare(args.out_a, args.method_a, args.out_b, args.method_b, args.size,
                           tuple(args.names) if args.names else None)
    with atomic_path(args.out) as tmp:
        tmp.write_text(text, encoding="utf-8")
    with atomic_path(args.out.with_suffix(".json")) as tmp:
        tmp.write_text(json.dumps(result, indent=1), encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
