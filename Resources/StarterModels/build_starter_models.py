"""Train, validate and pack the starter models shipped in ``separeg/models/`` (see MODELS.md).

Runs the product's own commands on the public OpenKBP data (MIT licence), each as a ``separeg`` subprocess
whose command line is recorded in the bundles:

1. ``separeg pretrain`` over all 50 OpenKBP CTs -> the encoder (or ``--init``: start from an existing encoder;
   the shipped encoder v2 came from the pretraining of ``Testing/experiments/openkbp_separeg_fixed_cpu.json``);
2. ``separeg finetune`` from it on the OpenKBP training patients (partial labels: an organ a patient lacks is
   unknown, not background) less the ``--holdout`` ones, which choose the best epoch and the post-processing;
3. ``separeg contour`` + ``separeg evaluate`` on the 10 OpenKBP validation patients, which no step of training
   has seen (DSC, HD95, seconds per CT);
4. ``separeg pack --fp16`` of what was trained, with the provenance and validation table as metadata.

Every step resumes (its run folder is kept in ``--work``), so a killed build continues where it stopped.

    python Resources/StarterModels/build_starter_models.py --work /tmp/starter          # CPU budget of MODELS.md
    python Resources/StarterModels/build_starter_models.py --work /tmp/v2 --init separeg-encoder-hn-ct  # hn-oar-7
    python Resources/StarterModels/build_starter_models.py --work /tmp/v3 --init separeg-encoder-hn-ct \\
        --data POOL --split Testing/experiments/openkbp_pool_split.json --epochs 120 --patience 15 \\
        --models-out /tmp/v3/models                  # hn-oar-7 v3 candidate on the OpenKBP pool (issue 31);
    # add --training-patients 80 for the learning curve's middle point; --drop-organs Larynx,Esophagus for the
    # source model of the transfer experiment (issue 32)
    # POOL: python ../shared/tools/openkbp_pool.py GIT_DIR POOL, GIT_DIR a bare copy of github:ababier/open-kbp
    python Resources/StarterModels/build_starter_models.py --work /tmp/starter --encoder resnet50 \\
        --iterations 100000 --epochs 200 --device cuda --models-out /tmp/paper-models       # the paper's budget
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "openkbp"
ENCODER_NAME = "separeg-encoder-hn-ct"
MODEL_NAME = "hn-oar-7"
LIMITS = ("Research use only; not for clinical use without local validation on the institution's own CTs and "
          "contouring protocol. Trained on 128 x 128 x 128 OpenKBP volumes (about 3.5-5.5 mm in plane, 2-3 mm "
          "slices): finer CTs are resampled to that grid, so small structures and boundaries are coarser than the "
          "input. Head-and-neck CT only (not MR, not other sites). The OpenKBP contours are a curated public set, "
          "not one institution's protocol.")


# hn-oar-7 v2's fine-tuning recipe (finetune_config.NNUNET_RECIPE): every nnU-Net-grade part on, the defaults
# (its bundle's training.config records every setting); spelled out so a later change of defaults keeps v2's recipe.
RECIPE = ["--context-slices", "1", "--augmentation", "nnunet", "--deep-supervision", "--schedule", "poly",
          "--warmup-steps", "200", "--postprocessing", "validation",
          # validation after every epoch on every slice, the cases' own grid (finetune's LEGACY_VALIDATION)
          "--finest-grid-mm", "0", "--validate-every", "1", "--validation-margin", "-1"]


def separeg(args: list[str], log: Path) -> list[str]:
    """Run ``separeg ARGS`` (appending to ``log``); returns the command as recorded (data paths made relative)."""
    command = [sys.executable, "-m", "separeg.cli", *args]
    print("$ separeg " + shlex.join(args), flush=True)
    with log.open("a", encoding="utf-8") as out:
        result = subprocess.run(command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, check=False)
    if result.returncode != 0:
        sys.exit(f"separeg {args[0]} failed (exit {result.returncode}); see {log}")
    return ["separeg", *args]


def read_split(path: Path, data: Path) -> set[str]:
    """The selection patients of a recorded pool split (``Testing/experiments/openkbp_pool_split.json``), after
    checking that its training and test patients are exactly the data folder's training and validation patients."""
    recorded = json.loads(path.read_text(encoding="utf-8"))
    with (data / "manifest.csv").open(encoding="utf-8") as f:
        split = {row["patient_id"]: row["split"] for row in csv.DictReader(f)}
    expected = {"train": set(recorded["training"]) | set(recorded["selection"]), "validation": set(recorded["test"])}
    for part, cases in expected.items():
        found = {c for c, p in split.items() if p == part}
        if found != cases:
            sys.exit(f"{path} does not match {data}: {part} differs by {', '.join(sorted(found ^ cases)[:10])}; "
                     "recreate the pool with ../shared/tools/openkbp_pool.py")
    return set(recorded["selection"])


def draw_training(path: Path, count: int, work: Path) -> set[str]:
    """The split's training patients left out of fine-tuning when only ``count`` of them train (a learning-curve
    point): the kept ones are drawn once with a fixed seed and recorded in ``work/training_draw.json``."""
    import numpy as np

    training = sorted(json.loads(path.read_text(encoding="utf-8"))["training"])
    if not 0 < count <= len(training):
        sys.exit(f"--training-patients must be 1..{len(training)} (the split's training patients)")
    kept = sorted(np.random.default_rng(20261208).choice(training, size=count, replace=False).tolist())
    record = work / "training_draw.json"
    if record.exists() and json.loads(record.read_text(encoding="utf-8"))["kept"] != kept:
        sys.exit(f"{record} records another draw; use a new --work folder")
    work.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps({"seed": 20261208, "count": count, "kept": kept}, indent=1), encoding="utf-8")
    return set(training) - set(kept)


def link_cases(data: Path, work: Path, holdout: set[str], unused: frozenset[str] = frozenset()
               ) -> dict[str, list[str]]:
    """Folders of symlinks: ``archive`` (all CTs), ``train``, ``holdout`` (training patients kept for model
    selection) and ``validation`` (the OpenKBP validation patients, for the report only), CT + labels. ``unused``
    training patients stay in the archive only."""
    with (data / "manifest.csv").open(encoding="utf-8") as f:
        split = {row["patient_id"]: row["split"] for row in csv.DictReader(f)}
    if any(p not in ("train", "validation") for p in split.values()):
        sys.exit(f"{data} holds patients outside OpenKBP's training and validation splits: refused")
    unknown = holdout - {c for c, p in split.items() if p == "train"}
    if unknown:
        sys.exit(f"--holdout names cases that are not OpenKBP training patients: {', '.join(sorted(unknown))}")
    split.update({case: "holdout" for case in holdout})
    split.update({case: "unused" for case in unused})
    for folder in ("archive", "train", "holdout", "validation"):
        (work / folder).mkdir(parents=True, exist_ok=True)
    for case, part in split.items():
        pairs = [("archive", f"{case}_ct.nii.gz")]
        if part != "unused":
            pairs += [(part, f"{case}_ct.nii.gz"), (part, f"{case}_oar.nii.gz")]
        for folder, name in pairs:
            target = work / folder / name
            if not target.exists():
                target.symlink_to(data / name)
    for folder in ("train", "holdout"):
        (work / folder / "labels.json").write_bytes((data / "labels.json").read_bytes())
    parts = ("train", "holdout", "validation", "unused")
    return {part: sorted(c for c, p in split.items() if p == part) for part in parts}


def drop_organs(work: Path, data: Path, names: list[str]) -> None:
    """Leave ``names`` out of the train, holdout and validation label maps and tables (a source model for the
    transfer experiment of issue 32 must never have seen the organs it is tested on): their voxels become background
    and the table loses them; written once, as files replacing the links."""
    import numpy as np
    import SimpleITK as sitk

    table = json.loads((data / "labels.json").read_text(encoding="utf-8"))
    tg263 = table.get("index_to_tg263", {})
    values = {int(v) for v, name in table["index_to_name"].items() if name in names or tg263.get(v) in names}
    if len(values) != len(names):
        sys.exit(f"--drop-organs {','.join(names)}: not all are organs of {data / 'labels.json'}")
    kept = {key: {v: n for v, n in part.items() if int(v) not in values} if isinstance(part, dict) else part
            for key, part in table.items()}
    for folder in ("train", "holdout", "validation"):
        (work / folder / "labels.json").unlink(missing_ok=True)
        (work / folder / "labels.json").write_text(json.dumps(kept, indent=1), encoding="utf-8")
        for path in sorted((work / folder).glob("*_oar.nii.gz")):
            if not path.is_symlink():
                continue  # already written
            image = sitk.ReadImage(str(path))
            array = sitk.GetArrayFromImage(image)
            array[np.isin(array, sorted(values))] = 0
            out = sitk.GetImageFromArray(array)
            out.CopyInformation(image)
            path.unlink()
            sitk.WriteImage(out, str(path), useCompression=True)


def device_name(device: str) -> str:
    import torch

    if device != "cpu" and torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} x {torch.cuda.device_count()} (torch {torch.__version__})"
    return f"CPU, {os.cpu_count()} cores ({platform.processor() or platform.machine()}, torch {torch.__version__})"


def validate(model: Path, work: Path, cases: list[str], log: Path) -> tuple[dict, list[float], list[str]]:
    """Contour every validation CT (timed) and evaluate against its reference contours."""
    predictions, references = work / "validation_pred", work / "validation_ref"
    predictions.mkdir(exist_ok=True)
    references.mkdir(exist_ok=True)
    seconds, command = [], []
    for case in cases:
        out = work / "contour" / case
        start = time.perf_counter()
        command = separeg(["contour", str(work / "validation" / f"{case}_ct.nii.gz"), "--model", str(model),
                           "--out", str(out), "--device", "cpu"], log)
        seconds.append(time.perf_counter() - start)
        (out / "segmentation.nii.gz").replace(predictions / f"{case}.nii.gz")
        ref = references / f"{case}.nii.gz"
        if not ref.exists():
            ref.symlink_to(work / "validation" / f"{case}_oar.nii.gz")
    separeg(["evaluate", str(predictions), str(references), "--out", str(work / "evaluation"),
             "--labels", str(work / "train" / "labels.json")], log)  # dropped organs: not in the table or maps
    summary = json.loads((work / "evaluation" / "summary.json").read_text(encoding="utf-8"))
    return summary, seconds, command


def table(summary: dict) -> dict:
    """Per organ: cases, DSC % and HD95 mm as mean and standard error over the validation patients."""
    rows = {}
    for organ in [*summary["organs"], summary["all_organs"]]:
        rows[organ["name"]] = {key: organ[key] for key in ("n", "dsc_mean_percent", "dsc_se_percent", "n_hd95",
                                                           "hd95_mean_mm", "hd95_se_mm", "n_missed")}
    return rows


def markdown(rows: dict) -> str:
    def pm(mean, se, digits):
        if mean is None:
            return "–"
        return f"{mean:.{digits}f}" + ("" if se is None else f" ± {se:.{digits}f}")

    lines = ["| Organ (TG-263) | Patients | DSC % | HD95 mm | Missed |", "|---|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['n']} | {pm(r['dsc_mean_percent'], r['dsc_se_percent'], 1)} | "
                     f"{pm(r['hd95_mean_mm'], r['hd95_se_mm'], 1)} | {r['n_missed']} |")
    return "\n".join(lines) + "\n"


def relative(command: list[str], work: Path) -> str:
    return shlex.join(command).replace(str(work), "$WORK").replace(str(REPO), "$REPO")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the OpenKBP folder (../shared/data/openkbp)")
    parser.add_argument("--work", type=Path, required=True, help="run folders (resumed when they exist)")
    parser.add_argument("--models-out", type=Path, default=REPO / "separeg" / "models", help="where the bundles go")
    parser.add_argument("--encoder", default="resnet18-slim")
    parser.add_argument("--iterations", type=int, default=10_000, help="pretraining iterations (paper: 100000)")
    parser.add_argument("--crop-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=40, help="fine-tuning epochs (paper: 200)")
    parser.add_argument("--steps-per-epoch", type=int, default=50)
    parser.add_argument("--patience", type=int, default=8, help="early stopping, in epochs")
    parser.add_argument("--init", default=None, help="start from this encoder (name or path) instead of pretraining")
    parser.add_argument("--holdout", default="pt_41,pt_42,pt_43,pt_45",
                        help="training patients that choose the best epoch and post-processing instead of training")
    parser.add_argument("--split", type=Path, default=None,
                        help="a recorded pool split (Testing/experiments/openkbp_pool_split.json): its selection "
                             "patients replace --holdout")
    parser.add_argument("--training-patients", type=int, default=None,
                        help="with --split: fine-tune on this many of its training patients (a fixed-seed draw, "
                             "recorded in WORK/training_draw.json), for a learning curve")
    parser.add_argument("--drop-organs", default=None, metavar="NAMES",
                        help="leave these organs (comma-separated) out of training and validation: a source model "
                             "for the transfer experiment (it must never see the organs it is tested on)")
    parser.add_argument("--min-body-area", default=None, help="separeg finetune --min-body-area (mm^2)")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    work, data = args.work.resolve(), args.data.resolve()
    log = work / "build.log"
    holdout = read_split(args.split, data) if args.split else {c for c in args.holdout.split(",") if c}
    if args.training_patients is not None and not args.split:
        sys.exit("--training-patients needs --split")
    unused = draw_training(args.split, args.training_patients, work) if args.training_patients else frozenset()
    splits = link_cases(data, work, holdout, frozenset(unused))
    if args.drop_organs:
        drop_organs(work, data, [n.strip() for n in args.drop_organs.split(",") if n.strip()])
    started = time.perf_counter()
    pretrain = None
    if args.init is None:
        pretrain = separeg(["pretrain", str(work / "archive"), "--out", str(work / "pretrain"), "--encoder",
                            args.encoder, "--iterations", str(args.iterations), "--batch-size", "32", "--crop-size",
                            str(args.crop_size), "--seed", "0", "--device", args.device], log)
    pretrain_minutes = (time.perf_counter() - started) / 60
    started = time.perf_counter()
    finetune = separeg(["finetune", str(work / "train"), "--validation", str(work / "holdout"), "--init",
                        args.init or str(work / "pretrain" / "encoder.separeg"), "--out", str(work / "finetune"),
                        "--epochs", str(args.epochs), "--steps-per-epoch", str(args.steps_per_epoch),
                        "--patience", str(args.patience), *RECIPE,
                        *(["--min-body-area", args.min_body_area] if args.min_body_area is not None else []),
                        "--batch-size", "16", "--partial-labels", "auto", "--seed", "0", "--device", args.device], log)
    finetune_minutes = (time.perf_counter() - started) / 60
    summary, seconds, contour = validate(work / "finetune" / "model.separeg", work, splits["validation"], log)
    rows = table(summary)
    device = device_name(args.device)
    data_text = (f"OpenKBP (Babier et al. 2021, MIT licence; TCIA head-and-neck CTs at 128 x 128 x 128): "
                 f"{sum(len(v) for v in splits.values())} CTs unlabelled for pretraining, "
                 f"{len(splits['train'])} training patients for fine-tuning (an organ missing in a patient is "
                 f"unknown, not background), {len(splits['holdout'])} held-out training patients for model "
                 f"selection, {len(splits['validation'])} validation patients for this report only")
    common = {"data": data_text, "device": device, "limits": LIMITS, "model_card": "MODELS.md"}
    encoder_meta = {"release": {**common, "name": ENCODER_NAME, "intended_use":
                                "initialise `separeg finetune --init " + ENCODER_NAME + "` on head-and-neck CT",
                                "commands": [relative(pretrain, work)] if pretrain else [],
                                "budget": f"{args.iterations} iterations of 32 regions ({args.iterations / 1000:g} % "
                                          f"of the paper's 100k)"}}
    model_meta = {"release": {**common, "name": MODEL_NAME, "intended_use":
                              "automatic first-pass contours of 7 head-and-neck organs at risk on CT, for review",
                              "commands": [relative(c, work) for c in (pretrain, finetune, contour) if c],
                              "budget": f"pretraining as {args.init or ENCODER_NAME}; fine-tuning at most "
                                        f"{args.epochs} epochs of {args.steps_per_epoch} steps of 16 slices, early "
                                        f"stopping after {args.patience} epochs without improvement on the held-out "
                                        "patients (paper: 200 epochs)",
                              "holdout_patients": splits["holdout"],
                              "validation": {"patients": splits["validation"], "per_organ": rows,
                                             "contour_seconds_per_ct": [round(s, 2) for s in seconds]}}}
    packed = {}
    bundles = [(MODEL_NAME, work / "finetune" / "model.separeg", model_meta)]
    if pretrain is not None:
        bundles.insert(0, (ENCODER_NAME, work / "pretrain" / "encoder.separeg", encoder_meta))
    for name, source, meta in bundles:
        (work / f"{name}.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")
        target = args.models_out / f"{name}.separeg"
        separeg(["pack", str(source), "--out", str(target), "--fp16", "--metadata", str(work / f"{name}.json")], log)
        packed[name] = target.stat().st_size / 1e6
    (work / "validation_table.md").write_text(markdown(rows), encoding="utf-8")
    print(markdown(rows))
    print(f"contour: {min(seconds):.1f}-{max(seconds):.1f} s per CT; sizes: "
          + ", ".join(f"{k} {v:.2f} MB" for k, v in packed.items())
          + f"; pretraining {pretrain_minutes:.0f} min, fine-tuning {finetune_minutes:.0f} min on {device}")


if __name__ == "__main__":
    main()
