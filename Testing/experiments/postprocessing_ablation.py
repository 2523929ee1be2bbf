"""Post-processing and test-time ablation of a segmentation model on test patients (issue 21): the model as shipped
(largest component and hole filling per organ, and test-time mirroring, as its fine-tuning chose them) against
each step switched off, paired per patient (``separeg.experiments.paired``).

    python Testing/experiments/postprocessing_ablation.py --model hn-oar-7 --out /tmp/pp \
        --config Testing/experiments/openkbp_random_cpu.json [--cases pt_41 pt_42 pt_43 pt_45]

The test patients are the config's ``test`` cases, or ``--cases`` (its ``data`` folder holds ``<case>_ct.nii.gz``
and ``<case>_oar.nii.gz``). Each variant's metrics go to ``OUT/runs/<variant>/n0_d0/metrics.csv`` (the experiment
layout the paired comparison reads); ``OUT/postprocessing.md`` and ``.json`` hold the comparisons.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from separeg.evaluate.job import EvaluateJob, run_evaluate
from separeg.experiments.paired import compare
from separeg.experiments.plan import load_experiment
from separeg.runtime.atomic import atomic_path
from separeg.segment.contour import ContourJob, run_contour

VARIANTS = {"as shipped": {}, "no largest component": {"largest_component": False},
            "no hole filling": {"fill_holes": False}, "no mirroring": {"mirror": False},
            "none": {"largest_component": False, "fill_holes": False, "mirror": False}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="segmentation bundle or shipped model name")
    parser.add_argument("--config", type=Path, required=True, help="experiment config naming the data and test cases")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--cases", nargs="+", help="patients to contour (default: the config's test cases)")
    args = parser.parse_args(argv)
    cfg = load_experiment(args.config)
    cases = args.cases or cfg.test
    references = copy_references(cfg.data, cases, args.out / "references")
    for variant, switches in VARIANTS.items():
        contour_and_score(args.model, cfg.data, cases, references, args.out / "runs" / variant / "n0_d0", **switches)
    seconds = {v: json.loads((args.out / "runs" / v / "n0_d0" / "seconds.json").read_text())["mean_per_case"]
               for v in VARIANTS if (args.out / "runs" / v / "n0_d0" / "seconds.json").exists()}
    results, texts = [], [f"# Post-processing ablation: {args.model} on {len(cases)} patients ({', '.join(cases)})", ""]
    for variant in list(VARIANTS)[1:]:
        result, text = compare(args.out, "as shipped", args.out, variant, 0)
        results.append(result)
        texts.append(text.replace("|X_tr| = 0", f"model {args.model}").split("\nValidation peak")[0])
    hd95 = {variant: _median_hd95(args.out / "runs" / variant / "n0_d0" / "metrics.csv") for variant in VARIANTS}
    organs = sorted({organ for table in hd95.values() for organ in table})
    texts += ["## HD95 mm, median over the patients that have the organ (missed organs left out)", "",
              "| organ | " + " | ".join(VARIANTS) + " |", "|---" * (len(VARIANTS) + 1) + "|"]
    texts += [f"| {organ} | " + " | ".join(f"{hd95[v].get(organ, float('nan')):.1f}" for v in VARIANTS) + " |"
              for organ in organs]
    with atomic_path(args.out / "postprocessing.md") as tmp:
        tmp.write_text("\n".join(texts), encoding="utf-8")
    with atomic_path(args.out / "postprocessing.json") as tmp:
        tmp.write_text(json.dumps({"model": args.model, "test": cases, "comparisons": results,
                                   "hd95_median": hd95, "seconds_per_case": seconds}, indent=1), encoding="utf-8")
    print("\n".join(texts))
    return 0


def copy_references(data: Path, cases: list[str], references: Path) -> Path:
    """``references/<case>.nii.gz``: the cases' reference label maps (``data/<case>_oar.nii.gz``)."""
    references.mkdir(parents=True, exist_ok=True)
    for case in cases:
        shutil.copy(data / f"{case}_oar.nii.gz", references / f"{case}.nii.gz")
    return references


def contour_and_score(model: str, data: Path, cases: list[str], references: Path, run: Path, **switches) -> None:
    """Contour ``data/<case>_ct.nii.gz`` with ``model`` (``switches``: :class:`ContourJob` settings) into
    ``run/predictions``, timed (``run/seconds.json``), and score them against ``references`` into
    ``run/metrics.csv``, the experiment layout the paired comparison reads. Skipped when that file exists, so a
    killed script resumes."""
    if (run / "metrics.csv").exists():
        return
    start = time.perf_counter()
    for case in cases:
        result = run_contour(ContourJob(volume=data / f"{case}_ct.nii.gz", model=model,
                                        out_dir=run / "contour" / case, device="cpu", **switches))
        (run / "predictions").mkdir(parents=True, exist_ok=True)
        shutil.move(result.segmentation, run / "predictions" / f"{case}.nii.gz")
    per_case = round((time.perf_counter() - start) / len(cases), 2)
    (run / "seconds.json").write_text(json.dumps({"mean_per_case": per_case}), encoding="utf-8")
    evaluation = run_evaluate(EvaluateJob(pred=run / "predictions", ref=references, out_dir=run / "evaluation",
                                          labels=data / "labels.json"))
    with atomic_path(run / "metrics.csv") as tmp:
        shutil.copy(evaluation.metrics_csv, tmp)


def _median_hd95(metrics: Path) -> dict[str, float]:
    values: dict[str, list[float]] = defaultdict(list)
    with open(metrics, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            if row["status"] == "ok" and row["hd95_mm"]:
                values[row["name"]].append(float(row["hd95_mm"]))
    return {organ: float(np.median(v)) for organ, v in sorted(values.items())}


if __name__ == "__main__":
    raise SystemExit(main())
