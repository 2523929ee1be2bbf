"""Fine-tuning recipe ablation with all training patients (issue 21): the recipe `hn-oar-7` v2 was trained with
(2.5D + nnU-Net augmentation + warm-up/poly + per-organ post-processing, PL-Seg) against the earlier recipe and
against it with one part switched off, each retrained exactly as v2 was (same 36 patients, held-out patients,
encoder, seed and budget), then contoured and scored on the OpenKBP validation patients and paired per patient
(``separeg.experiments.paired``).

    python Testing/experiments/recipe_ablation_full.py --data ../shared/data/openkbp --init ENCODER_V1 \
        --work /tmp/full36 [--arms old no25d lightaug long mirroraug full
        mirroraug_full openended]

``--init`` must be the encoder v2 started from (`separeg-encoder-hn-ct` v1, whose weights' SHA-256 the shipped
bundle records as ``training.init_encoder_sha256``; ``git show dc56a14^:separeg/models/separeg-encoder-hn-ct.separeg``).
The shipped model is the "new" arm: contoured, not retrained. Each arm's metrics go to
``WORK/runs/<arm>/n0_d0/metrics.csv`` (the experiment layout the paired comparison reads); an arm whose metrics
exist is skipped, so a killed run resumes. ``WORK/recipe_ablation_full.md`` and ``.json`` hold the comparisons of
every finished arm against the shipped model.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "Resources" / "StarterModels"))

from build_starter_models import link_cases  # noqa: E402
from postprocessing_ablation import contour_and_score, copy_references  # noqa: E402

from separeg.experiments.paired import compare  # noqa: E402
from separeg.runtime.atomic import atomic_path  # noqa: E402
from separeg.runtime.bundle import read_bundle_info  # noqa: E402
from separeg.runtime.model_store import resolve_model  # noqa: E402

SHIPPED = "hn-oar-7"
NEW = "new (hn-oar-7 v2)"
# Every arm: hn-oar-7 v2's command line (its bundle's release.commands) with these recipe flags.
COMMON = ["--epochs", "40", "--steps-per-epoch", "50", "--patience", "6", "--batch-size", "16",
          "--partial-labels", "auto", "--seed", "0", "--device", "cpu"]
NNUNET = ["--context-slices", "1", "--augmentation", "nnunet", "--deep-supervision", "--schedule", "poly",
          "--warmup-steps", "200", "--postprocessing", "validation"]
ARMS = {
    "old": ["--context-slices", "0", "--augmentation", "light", "--no-deep-supervision", "--schedule", "cosine",
            "--warmup-steps", "0", "--postprocessing", "all"],
    "no25d": [*NNUNET, "--context-slices", "0"],  # argparse: the later flag wins
    "lightaug": [*NNUNET, "--augmentation", "light"],
    # Does the budget limit it? Twice the cap, more patience.
    "long": [*NNUNET, "--epochs", "80", "--patience", "10"],
    "mirroraug": [*NNUNET, "--mirror-augmentation"],
    # The two above stopped early (patience 6 on 4 held-out patients) while the learning rate was still high: the
    # whole schedule, best epoch kept, for mirroring and for v2's own recipe.
    "full": [*NNUNET, "--patience", "40"],
    "mirroraug_full": [*NNUNET, "--mirror-augmentation", "--patience", "40"],
    # A third of the training patients contour the cord only to mid-neck while the cord goes on in the image.
    "openended": [*NNUNET, "--open-ended", "SpinalCord,Esophagus"],
}
NAMES = {"old": "old recipe", "no25d": "new without 2.5D", "lightaug": "new with light augmentation",
         "long": "new, at most 4,000 steps", "mirroraug": "new with mirroring augmentation",
         "full": "new, whole schedule", "mirroraug_full": "new with mirroring augmentation, whole schedule",
         "openended": "new, cord and oesophagus unknown beyond their contours"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="OpenKBP folder (manifest.csv, pt_N_{ct,oar})")
    parser.add_argument("--init", type=Path, required=True, help="the encoder hn-oar-7 v2 was fine-tuned from")
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--arms", nargs="*", default=list(ARMS), choices=list(ARMS))
    args = parser.parse_args(argv)
    holdout = set(read_bundle_info(resolve_model(SHIPPED))["release"]["holdout_patients"])
    splits = link_cases(args.data.resolve(), args.work, holdout)
    references = copy_references(args.data, splits["validation"], args.work / "references")

    def score(model: str, arm: str) -> None:
        # Without test-time mirroring: this ablates the training recipe (postprocessing_ablation.py ablates that).
        contour_and_score(model, args.data, splits["validation"], references, args.work / "runs" / arm / "n0_d0",
                          mirror=False)

    score(str(resolve_model(SHIPPED)), NEW)
    for arm in args.arms:
        run = args.work / "runs" / arm / "n0_d0"
        if (run / "metrics.csv").exists():
            continue
        model = args.work / "finetune" / arm / "model.separeg"
        if not model.exists():
            command = [sys.executable, "-m", "separeg.cli", "finetune", str(args.work / "train"), "--validation",
                       str(args.work / "holdout"), "--init", str(args.init), "--out", str(model.parent),
                       *COMMON, *ARMS[arm]]
            print("$ " + " ".join(command[2:]), flush=True)
            start = time.perf_counter()
            subprocess.run(command, check=True)
            (model.parent / "seconds.json").write_text(json.dumps({"finetune": time.perf_counter() - start}))
        score(str(model), arm)
    write_report(args.work)
    return 0


def write_report(work: Path) -> None:
    done = [arm for arm in ARMS if (work / "runs" / arm / "n0_d0" / "metrics.csv").exists()]
    texts = ["# Fine-tuning recipe with 36 training patients: hn-oar-7 v2's recipe against the earlier recipe and "
             "against one part switched off", ""]
    results = []
    for arm in done:
        result, text = compare(work, arm, work, NEW, 0, names=(NAMES[arm], NEW))
        results.append({"arm": arm, **result})
        texts.append(text.replace("|X_tr| = 0", "36 training patients").split("\nValidation peak")[0])
    with atomic_path(work / "recipe_ablation_full.md") as tmp:
        tmp.write_text("\n".join(texts), encoding="utf-8")
    with atomic_path(work / "recipe_ablation_full.json") as tmp:
        tmp.write_text(json.dumps({"arms": {a: ARMS[a] for a in done}, "common": COMMON, "comparisons": results},
                                  indent=1), encoding="utf-8")
    print("\n".join(texts))


if __name__ == "__main__":
    raise SystemExit(main())
