"""`separeg demo`: the pipeline on the bundled sample CTs with a small budget.

So far: archive scan, SIS with overlays and organ coverage, SepaReg pretraining (all stages), a report.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .archive import format_table, scan_archive
from .atomic import atomic_path, write_json
from .events import Events
from .figures import pick_slices, region_overlay, save_png
from .pretrain import run_pretrain
from .pretrain_config import PretrainConfig, PretrainJob
from .regions import SISConfig
from .regions_job import organ_coverage, read_reference, region_statistics, separate_volume

__all__ = ["SAMPLE_DATA", "DemoJob", "run_demo", "label_file_for"]

SAMPLE_DATA = Path(__file__).resolve().parent.parent / "Resources" / "SampleData"
# Label maps sit beside their CT: pt_1_ct.nii.gz -> pt_1_oar.nii.gz (OpenKBP), or *_seg / *_label.
LABEL_SUFFIXES = ("_oar", "_seg", "_label", "_labels")


def demo_pretrain_config(sis: SISConfig, iterations: int = 60) -> PretrainConfig:
    """A budget that finishes in a minute or two on 2 CPU cores: ResNet-18, 64 x 64 regions, batch 16."""
    return PretrainConfig(encoder="resnet18", sis=sis, crop_size=64, batch_size=16, iterations=iterations)


@dataclass(frozen=True)
class DemoJob:
    out_dir: Path
    data_dir: Path = SAMPLE_DATA
    sis: SISConfig = field(default_factory=SISConfig)
    iterations: int = 60
    device: str = "auto"
    workers: int | None = None


def label_file_for(ct_path: Path) -> Path | None:
    """The label map that belongs to ``ct_path`` by naming convention, if there is one."""
    name = ct_path.name
    for ext in (".nii.gz", ".nii", ".nrrd", ".mha"):
        if name.endswith(ext):
            stem = name[: -len(ext)]
            base = stem[:-3] if stem.endswith("_ct") else stem
            for suffix in LABEL_SUFFIXES:
                candidate = ct_path.with_name(base + suffix + ext)
                if candidate.exists():
                    return candidate
    return None


def _organ_names(data_dir: Path) -> dict[int, str]:
    path = data_dir / "labels.json"
    if not path.exists():
        return {}
    names = json.loads(path.read_text(encoding="utf-8"))
    return {int(k): v for k, v in names.get("index_to_tg263", names.get("index_to_name", {})).items()}


def run_demo(job: DemoJob, events: Events | None = None) -> dict:
    """Scan the sample data, separate every CT into regions, write overlays and ``report.md``. Returns the summary."""
    events = events or Events()
    out = Path(job.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    manifest = scan_archive(job.data_dir, events=events, workers=job.workers)
    manifest.save(out / "manifest.json")
    events.log("archive scan:\n" + format_table(manifest), stage="scan")
    cases = manifest.require_usable()
    names = _organ_names(Path(job.data_dir))
    summary: dict = {"manifest_hash": manifest.hash, "config": job.sis.key(), "cases": {}}
    for i, entry in enumerate(cases, 1):
        ct_path = Path(job.data_dir) / entry.path
        case = ct_path.name.split(".")[0].removesuffix("_ct")
        events.log(f"case {i}/{len(cases)}: {case}", stage="sis")
        image, hu, maps, cached = separate_volume(ct_path, job.sis, out / "sis_cache", events=events,
                                                  workers=job.workers)
        label_path = label_file_for(ct_path)
        reference = read_reference(label_path, image) if label_path else None
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
    write_json(summary, out / "summary.json")
    with atomic_path(out / "report.md") as tmp:
        tmp.write_text(_report(summary), encoding="utf-8")
    events.done(f"demo finished: {len(cases)} CTs separated; report in {out / 'report.md'}")
    return summary


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
    if "pretrain" in summary:
        lines += ["", "## Pretraining", "",
                  "All SepaReg stages with a demonstration budget (ResNet-18, 64 x 64 regions):",
                  "loss curves, organ groups and example regions per group in `pretrain/report.md`; the encoder is",
                  "`pretrain/encoder.separeg`."]
    return "\n".join(lines) + "\n"
