"""Shipped-model candidates on the OpenKBP pool's test patients (issue 31): each model contours the recorded split's
``test`` patients (OpenKBP's validation split; never its test split), is scored per organ, and is paired per patient
against the first model (``separeg.experiments.paired``). The spinal cord is also scored on full slices only:
OpenKBP stores CT only inside the contours outside the treated region, where the reference cord simply stops.

    python Testing/experiments/pool_models.py --pool POOL --out /tmp/pool_models \
        --model v2=hn-oar-7 --model v3=/work/v3/finetune/model.separeg

``OUT/runs/<name>/n0_d0/metrics.csv`` is the experiment layout the paired comparison reads; a finished model is
skipped, so a killed script resumes. ``OUT/pool_models.md`` and ``.json`` hold the tables.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from postprocessing_ablation import contour_and_score, copy_references  # this folder: run as a script

from separeg.experiments.paired import compare
from separeg.runtime.atomic import atomic_path

SPLIT = Path(__file__).resolve().parent / "openkbp_pool_split.json"
CORD = 2  # SpinalCord's label value in OpenKBP's labels.json
FULL_SLICE_MM2 = 4000.0  # finetune's --min-body-area default: smaller CT slices hold only contoured tissue


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pool", type=Path, required=True, help="the OpenKBP pool (../shared/tools/openkbp_pool.py)")
    parser.add_argument("--model", action="append", required=True, metavar="NAME=MODEL",
                        help="a model to score (bundle path or installed name; A+B: the ensemble of A and B); the "
                             "first is the reference arm")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--split", type=Path, default=SPLIT)
    args = parser.parse_args(argv)
    models = dict(item.split("=", 1) for item in args.model)
    cases = json.loads(args.split.read_text(encoding="utf-8"))["test"]
    references = copy_references(args.pool, cases, args.out / "references")
    for name, model in models.items():  # "A+B+C": an ensemble (separeg contour --model A --ensemble B --ensemble C)
        first, *members = model.split("+")
        contour_and_score(first, args.pool, cases, references, args.out / "runs" / name / "n0_d0",
                          **({"ensemble": tuple(members)} if members else {}))
    cord = {name: cord_on_full_slices(args.pool, cases, args.out / "runs" / name / "n0_d0" / "predictions")
            for name in models}
    names = list(models)
    texts = [f"# Shipped-model candidates on {len(cases)} OpenKBP pool test patients", "",
             "Models: " + ", ".join(f"{n} = `{m}`" for n, m in models.items()), ""]
    results = []
    for name in names[1:]:
        result, text = compare(args.out, names[0], args.out, name, 0)
        results.append(result)
        texts.append(text.replace("|X_tr| = 0", "shipped-model candidates").split("\nValidation peak")[0])
    texts += ["## SpinalCord DSC %, mean over patients: all slices vs full slices only", "",
              "| model | all slices | full slices |", "|---|---|---|"]
    texts += [f"| {n} | {c['all']:.1f} | {c['full']:.1f} |" for n, c in cord.items()]
    with atomic_path(args.out / "pool_models.md") as tmp:
        tmp.write_text("\n".join(texts) + "\n", encoding="utf-8")
    with atomic_path(args.out / "pool_models.json") as tmp:
        tmp.write_text(json.dumps({"models": models, "test": cases, "comparisons": results, "spinal_cord": cord},
                                  indent=1), encoding="utf-8")
    print("\n".join(texts))
    return 0


def cord_on_full_slices(pool: Path, cases: list[str], predictions: Path) -> dict[str, float]:
    """Mean SpinalCord DSC (%) over the cases that contour it: on all slices, and on full slices only."""
    import SimpleITK as sitk

    scores: dict[str, list[float]] = {"all": [], "full": []}
    for case in cases:
        ct = sitk.ReadImage(str(pool / f"{case}_ct.nii.gz"))
        ref = sitk.GetArrayFromImage(sitk.ReadImage(str(pool / f"{case}_oar.nii.gz"))) == CORD
        if not ref.any():
            continue
        pred = sitk.GetArrayFromImage(sitk.ReadImage(str(predictions / f"{case}.nii.gz"))) == CORD
        area = (sitk.GetArrayViewFromImage(ct) > -500).sum(axis=(1, 2)) * ct.GetSpacing()[0] * ct.GetSpacing()[1]
        full = area >= FULL_SLICE_MM2
        scores["all"].append(_dsc(pred, ref))
        if ref[full].any():
            scores["full"].append(_dsc(pred[full], ref[full]))
    return {key: 100.0 * float(np.mean(v)) for key, v in scores.items()}


def _dsc(pred: np.ndarray, ref: np.ndarray) -> float:
    total = int(pred.sum() + ref.sum())
    return 2.0 * float((pred & ref).sum()) / total if total else 1.0


if __name__ == "__main__":
    raise SystemExit(main())
