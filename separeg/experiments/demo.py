"""`separeg demo`: the whole pipeline on the bundled sample CTs with a small budget (DESIGN §6).

Instant Auto-contour of the unseen cases with the shipped starter model (``hn-oar-7``, MODELS.md) -> archive
scan -> SIS (overlays, organ coverage) -> SepaReg pretraining (all stages, a demonstration budget) -> fine-tuning
on TWO labelled cases (validated on a third) with the default recipe, from the shipped pretrained encoder
(``separeg-encoder-hn-ct`` v2: 6,000 iterations on 37 OpenKBP training CTs, none of the demo's test cases) and,
for comparison, from random weights -> Auto-contour of unseen cases (the shipped-encoder model's contours also
exported as RTSTRUCT and DICOM SEG, which reference a DICOM copy of the NIfTI CT) -> evaluation against their
reference contours -> ``report.md``.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from separeg.evaluate.inputs import read_labels
from separeg.evaluate.job import EvaluateJob, run_evaluate
from separeg.io.archive import format_table, scan_archive
from separeg.pretrain.config import PretrainConfig, PretrainJob
from separeg.pretrain.stages import run_pretrain
from separeg.runtime.atomic import atomic_path, write_json
from separeg.runtime.events import Events
from separeg.segment.cases import find_cases
from separeg.segment.contour import SEGMENTATION_FILE, ContourJob, run_contour
from separeg.segment.finetune.train import FinetuneConfig, FinetuneJob, run_finetune
from separeg.sis.figures import pick_slices, region_overlay, save_png
from separeg.sis.job import organ_coverage, read_reference, region_statistics, separate_volume
from separeg.sis.regions import SISConfig

__all__ = ["SAMPLE_DATA", "DemoJob", "run_demo"]

SAMPLE_DATA = Path(__file__).resolve().parents[2] / "Resources" / "SampleData"
# Two labelled training cases, one validation case, two unseen test cases (OpenKBP's validation split). Together
# the training cases contour every organ of the test cases (pt_1 the mandible, pt_5 the larynx) over the same
# extent: their spinal cords run the whole scan, as the test cases' do (pt_22's and pt_36's stop at mid-neck, and
# a model trained on them labels the lower cord brainstem or nothing). pt_22 contours all 7 organs, so the
# checkpoint is chosen on every organ.
TRAIN_CASES, VALIDATION_CASE, TEST_CASES = ("pt_1", "pt_5"), "pt_22", ("pt_203", "pt_209")
STARTER_MODEL = "hn-oar-7"
STARTER_ENCODER = "separeg-encoder-hn-ct"
DEMO_ENCODER = "resnet18-slim"  # the shipped encoder's architecture: fast on a CPU
# Fine-tuning arms: where the encoder starts. "pretrained" (the demo's own 60-iteration encoder) is optional.
ARMS = ("shipped", "random")


def demo_pretrain_config(sis: SISConfig, iterations: int = 60) -> PretrainConfig:
    """A budget that finishes in a minute on 2 CPU cores: the slim ResNet-18, 64 x 64 regions, batch 16."""
    return PretrainConfig(encoder=DEMO_ENCODER, sis=sis, crop_size=64, batch_size=16, iterations=iterations)


@dataclass(frozen=True)
class DemoJob:
    out_dir: Path
    data_dir: Path = SAMPLE_DATA
    sis: SISConfig = field(default_factory=SISConfig)
    iterations: int = 60
    epochs: int = 32  # of 25 steps: at 16 (400 steps) neither arm found Larynx or Brainstem
    device: str = "auto"
    workers: int | None = None
    starter_model: str | None = STARTER_MODEL  # contoured with first, before any training; None skips it
    arms: tuple[str, ...] = ARMS


def run_demo(job: DemoJob, events: Events | None = None) -> dict:
    """Scan the sample data, separate every CT into regions, write overlays and ``report.md``. Returns the summary."""
    events = events or Events()
    out = Path(job.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    manifest = scan_archive(job.data_dir, events=events, workers=job.workers)
    manifest.save(out / "manifest.json")
    events.log("archive scan:\n" + format_table(manifest), stage="scan")
    cases = manifest.require_usable()
    labels_file = Path(job.data_dir) / "labels.json"
    names = read_labels(labels_file) if labels_file.exists() else {}
    labelled = {c.image.resolve(): c for c in find_cases(job.data_dir)[0]}
    summary: dict = {"manifest_hash": manifest.hash, "config": job.sis.key(), "cases": {}}
    split = _split({c.name: c for c in labelled.values()})
    if split is not None and job.starter_model:
        summary["starter"] = _starter_contour(job, split[2], out / "starter", events)
    for i, entry in enumerate(cases, 1):
        ct_path = Path(job.data_dir) / entry.path
        case = ct_path.name.split(".")[0].removesuffix("_ct")
        events.log(f"case {i}/{len(cases)}: {case}", stage="sis")
        image, hu, maps, cached = separate_volume(ct_path, job.sis, out / "sis_cache", events=events,
                                                  workers=job.workers)
        label_case = labelled.get(ct_path.resolve())
        reference = read_reference(label_case.labels, image) if label_case else None
        stats = region_statistics(maps)
        if reference is not None:
            stats["organ_coverage"] = {names.get(v, str(v)): c for v, c in organ_coverage(maps, reference).items()}
        slices = pick_slices(maps, 4)
        if slices:
            save_png(region_overlay(hu, maps, slices, reference=reference, window=job.sis.hu_window),
                     out / "overlays" / f"{case}.png")
        summary["cases"][case] = stats
    pretrain_job = PretrainJob(archive=Path(job.data_dir), run_dir=out / "pretrain", device=job.device,
                               config=demo_pretrain_config(job.sis, job.iterations), workers=job.workers)
    encoder = run_pretrain(pretrain_job, events)
    summary["pretrain"] = {"encoder": str(encoder), "report": str(out / "pretrain" / "report.md")}
    if split is None:
        events.warning("fewer than 3 labelled cases: fine-tuning, contouring and evaluation are skipped", stage="demo")
    else:
        summary["split"] = {"train": [c.name for c in split[0]], "validation": split[1].name,
                            "test": [c.name for c in split[2]]}
        starts = {"shipped": STARTER_ENCODER, "pretrained": encoder, "random": None}
        summary["segmentation"] = {
            arm: _finetune_contour_evaluate(job, split, out / arm, starts[arm], events, export=arm == job.arms[0])
            for arm in job.arms}
    write_json(summary, out / "summary.json")
    with atomic_path(out / "report.md") as tmp:
        tmp.write_text(_report(summary), encoding="utf-8")
    events.done(f"demo finished: {len(cases)} CTs separated; report in {out / 'report.md'}")
    return summary


def _split(cases: dict) -> tuple | None:
    """([train], validation, [tests]): the sample data's fixed split, or the first cases by name elsewhere."""
    if all(name in cases for name in (*TRAIN_CASES, VALIDATION_CASE, *TEST_CASES)):
        return [cases[n] for n in TRAIN_CASES], cases[VALIDATION_CASE], [cases[name] for name in TEST_CASES]
    ordered = [cases[name] for name in sorted(cases)]
    return ([ordered[0]], ordered[1], ordered[2:]) if len(ordered) >= 3 else None


def _starter_contour(job: DemoJob, tests: list, out: Path, events: Events) -> dict:
    """Auto-contour the test cases with the shipped model, timed, and score them: what a planner gets at once."""
    import time

    from separeg.runtime.errors import InputError
    from separeg.runtime.model_store import resolve_model

    try:
        model = resolve_model(job.starter_model)
    except InputError as exc:
        events.warning(f"no starter model, instant contour skipped: {exc}", stage="demo")
        return {}
    events.log(f"instant Auto-contour with the shipped model {model.stem} (no training)", stage="demo")
    seconds, left_out = [], set()
    for case in tests:
        start = time.perf_counter()
        contour = run_contour(ContourJob(volume=case.image, model=str(model), out_dir=out / "contours" / case.name,
                                         device=job.device), events)
        seconds.append(time.perf_counter() - start)
        left_out |= {o["tg263"] or o["name"] for o in contour.not_contoured}
        for folder, source in (("predictions", contour.segmentation), ("references", case.labels)):
            (out / folder).mkdir(parents=True, exist_ok=True)
            shutil.copy(source, out / folder / f"{case.name}.nii.gz")
    result = run_evaluate(EvaluateJob(pred=out / "predictions", ref=out / "references", out_dir=out / "evaluation",
                                      labels=Path(job.data_dir) / "labels.json"), events)
    return {"model": model.stem, "seconds": seconds, "not_contoured": sorted(left_out), **_organ_rows(result)}


def _organ_rows(result) -> dict:
    """Per organ: DSC (a miss counts 0) over the ``n`` cases whose reference holds it, HD95 over the ``n_hd95``
    where it was found, and ``n_missed`` (found nowhere in the prediction); the all-organs row counts misses over
    its ``n_organ_cases`` (organ, case) pairs."""
    rows = {row.name: {"dsc_percent": row.dsc_mean_percent, "dsc_se_percent": row.dsc_se_percent,
                       "hd95_mm": row.hd95_mean_mm, "n": row.n, "n_hd95": row.n_hd95, "n_missed": row.n_missed}
            for row in [*result.organs, result.overall]}
    rows[result.overall.name]["n_organ_cases"] = sum(row.n for row in result.organs)
    return {"organs": rows}


def _missed(row: dict) -> str:
    """``"1/2"``: cases where the organ was missed, of those whose reference holds it (all organs: of the
    (organ, case) pairs)."""
    total = row.get("n_organ_cases", row.get("n", 0))
    return f"{row.get('n_missed', 0)}/{total}" if total else "-"


def _hd95(row: dict) -> str:
    """HD95 over the cases where the organ was found, saying over how many when a case missed it."""
    hd, n, found = row.get("hd95_mm"), row.get("n", 0), row.get("n_hd95", row.get("n", 0))
    if hd is None:
        return "-"
    return f"{hd:.1f}" + (f" ({found} of {n} cases)" if found < n else "")


def _finetune_contour_evaluate(job: DemoJob, split: tuple, out: Path, encoder: Path | str | None, events: Events, *,
                               export: bool = False) -> dict:
    """Fine-tune on the training cases (validated on another), contour the test cases (``export``: also as
    RTSTRUCT and DICOM SEG, via a DICOM copy of each CT), evaluate them."""
    train, validation, tests = split
    for folder, cases in (("data", train), ("validation", [validation])):
        (out / folder).mkdir(parents=True, exist_ok=True)
        for case in cases:
            for path in (case.image, case.labels):
                if not (out / folder / path.name).exists():
                    shutil.copy(path, out / folder / path.name)
        shutil.copy(Path(job.data_dir) / "labels.json", out / folder / "labels.json")
    config = FinetuneConfig(encoder=DEMO_ENCODER, epochs=job.epochs, steps_per_epoch=25, batch_size=16,
                            patience=job.epochs)
    events.log(f"fine-tuning from {encoder or 'random weights'}", stage="demo")
    model = run_finetune(FinetuneJob(data=out / "data", out_dir=out / "finetune", init=encoder, config=config,
                                     device=job.device, validation_data=out / "validation"), events)
    exports: dict[str, dict[str, str]] = {}
    left_out: set[str] = set()
    for case in tests:
        contour = run_contour(ContourJob(volume=case.image, model=str(model), out_dir=out / "contours" / case.name,
                                         device=job.device, rtstruct=export, seg=export,
                                         patient_id=f"SEPAREG-DEMO-{case.name}"), events)
        left_out |= {o["tg263"] or o["name"] for o in contour.not_contoured}
        if contour.exports:
            exports[case.name] = {name: str(path) for name, path in contour.exports.items()}
        for folder, source in (("predictions", out / "contours" / case.name / SEGMENTATION_FILE),
                               ("references", case.labels)):
            (out / folder).mkdir(exist_ok=True)
            shutil.copy(source, out / folder / f"{case.name}.nii.gz")
    result = run_evaluate(EvaluateJob(pred=out / "predictions", ref=out / "references", out_dir=out / "evaluation",
                                      labels=Path(job.data_dir) / "labels.json"), events)
    return {"model": str(model), "summary": str(result.summary_md), "exports": exports,
            "not_contoured": sorted(left_out), **_organ_rows(result)}


def _report(summary: dict) -> str:
    organs = sorted({o for c in summary["cases"].values() for o in c.get("organ_coverage", {})})
    lines = ["# SepaReg demo report", "",
             "Structure-aware image separation of the sample CTs. Coverage = fraction of each organ's voxels that",
             "lie in regions kept for training (regions outside the body are dropped).", "",
             "| case | regions | regions/slice | " + " | ".join(organs) + " |",
             "|---|---|---|" + "---|" * len(organs)]
    for case, stats in summary["cases"].items():
        cov = stats.get("organ_coverage", {})
        cells = [f"{100 * cov[o]:.1f} %" if o in cov else "-" for o in organs]
        per_slice = stats["regions_per_slice"]["mean"]
        lines.append(f"| {case} | {stats['regions']} | {per_slice:.1f} | " + " | ".join(cells) + " |")
    all_cov = [v for c in summary["cases"].values() for v in c.get("organ_coverage", {}).values()]
    if all_cov:
        lines += ["", f"Mean organ coverage over cases and organs: {100 * float(np.mean(all_cov)):.1f} %."]
    lines += ["", "Overlays (yellow: region borders, dark: dropped, colours: reference organs) are in `overlays/`."]
    if summary.get("starter"):
        starter = summary["starter"]
        lines += ["", "## Instant Auto-contour with the shipped model", "",
                  f"`{starter['model']}` (MODELS.md), before any training here: "
                  + ", ".join(f"{s:.1f} s" for s in starter["seconds"]) + " per CT on this machine. DSC % over the "
                  "cases whose reference holds the organ, a miss (no voxel predicted) counting 0; HD95 mm over the "
                  "cases where it was found:", "", "| organ | DSC % | HD95 mm | missed |", "|---|---|---|---|"]
        for organ, row in starter["organs"].items():
            dsc = row["dsc_percent"]
            lines.append(f"| {organ} | {'-' if dsc is None else f'{dsc:.1f}'} | {_hd95(row)} | {_missed(row)} |")
        if starter.get("not_contoured"):
            lines += ["", f"Not contoured, as the model cannot contour them: {', '.join(starter['not_contoured'])}."]
    if "segmentation" in summary:
        split = summary["split"]
        lines += ["", f"## Fine-tuning on {len(split['train'])} labelled case(s), Auto-contour and evaluation",
                  "", f"Trained on {', '.join(split['train'])} (validated on {split['validation']}) with the default "
                  f"recipe, from the shipped encoder `{STARTER_ENCODER}` and from random weights; contoured and "
                  f"scored on the unseen {', '.join(split['test'])}. DSC % (HD95 mm), mean over the test cases "
                  "(a missed organ counts DSC 0; HD95 over the cases where it was found), and cases missed:", ""]
        organs = list(next(iter(summary["segmentation"].values()))["organs"])
        lines += ["| init | " + " | ".join(organs) + " |", "|---|" + "---|" * len(organs)]
        for init, result in summary["segmentation"].items():
            cells = []
            for organ in organs:
                row = result["organs"].get(organ, {})
                dsc = row.get("dsc_percent")
                hd = row.get("hd95_mm")
                cells.append("-" if dsc is None else f"{dsc:.1f}" + ("" if hd is None else f" ({hd:.1f})")
                             + f", missed {_missed(row)}")
            lines.append(f"| {init} | " + " | ".join(cells) + " |")
        left_out = {init: result.get("not_contoured") for init, result in summary["segmentation"].items()}
        if any(left_out.values()):
            lines += ["", "Not contoured, as the model cannot contour them (no training case annotates them, or their "
                      "validation DSC is under 1 %; `separeg contour --include-unlearned` writes them); a reference "
                      "holding one counts a miss: " + "; ".join(f"{init}: {', '.join(names)}"
                                                                 for init, names in left_out.items() if names) + "."]
        lines += ["", "A demonstration budget on 2 CPU cores: the numbers show the pipeline works end to end, not "
                  "what the method reaches with the paper's budget. Full tables: `*/evaluation/summary.md`."]
        exported = {init: result.get("exports", {}) for init, result in summary["segmentation"].items()}
        for init, cases in exported.items():
            for case, paths in cases.items():
                files = ", ".join(f"`{Path(p).name}`" for name, p in paths.items() if name != "ct_dicom")
                lines += ["", f"DICOM export of {case} ({init} model, in `{init}/contours/{case}/`): {files} "
                          "referencing `ct_dicom/`, a DICOM copy of the NIfTI CT written for them (patient ID "
                          f"SEPAREG-DEMO-{case}); `export.json` lists them. Load the folder in 3D Slicer's DICOM "
                          "browser or a planning system."]
    if "pretrain" in summary:
        lines += ["", "## Pretraining", "",
                  "All SepaReg stages with a demonstration budget (the slim ResNet-18, 64 x 64 regions):",
                  "loss curves, organ groups and example regions per group in `pretrain/report.md`; the encoder is",
                  "`pretrain/encoder.separeg`."]
    return "\n".join(lines) + "\n"
