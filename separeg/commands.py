"""The handlers of ``separeg <command>``: parsed flags -> the job's config (generated from the config fields, see
:mod:`separeg.runtime.flags`) -> one ``run_<job>(job, events)``. :mod:`separeg.cli` builds the parser and calls them.

May import: every sub-package (each handler imports its job's package when it runs, so ``separeg --help`` stays
fast)."""

from __future__ import annotations

import argparse

from separeg.runtime.events import Events
from separeg.runtime.flags import config_from_args

__all__ = ["run_atlas", "run_contour", "run_demo", "run_evaluate", "run_experiment", "run_export", "run_finetune",
           "run_models", "run_pack", "run_pretrain", "run_regions", "run_scan"]


def run_pretrain(args: argparse.Namespace, events: Events) -> int:
    from separeg.pretrain.config import PretrainJob
    from separeg.pretrain.stages import run_pretrain

    run_pretrain(config_from_args(PretrainJob, args), events)  # the job and its config, each field from its flag
    return 0


def run_finetune(args: argparse.Namespace, events: Events) -> int:
    from separeg.segment.finetune.train import FinetuneJob, run_finetune

    job = config_from_args(FinetuneJob, args)  # the job and its config, each field from its flag
    if job.unlabelled is not None and not job.config.mean_teacher:
        events.warning("--unlabelled is only used with --mean-teacher; ignored", stage="finetune")
    run_finetune(job, events)
    return 0


def run_experiment(args: argparse.Namespace, events: Events) -> int:
    from separeg.experiments.protocol import load_experiment, run_experiment
    from separeg.experiments.report import write_report

    if args.report_only:
        path = write_report(load_experiment(args.config), args.out)
    else:
        only = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else None
        path = run_experiment(args.config, args.out, events, only=only)
    events.done(f"report: {path}")
    return 0


def run_contour(args: argparse.Namespace, events: Events) -> int:
    from separeg.runtime.outdir import output_folder
    from separeg.segment.contour import ContourJob, run_contour

    with output_folder(args.out):  # checked before inference, locked while written
        run_contour(ContourJob(volume=args.volume[0], channels=tuple(args.volume[1:]), model=args.model,
                               out_dir=args.out, device=args.device,
                               largest_component=not args.no_largest_component, fill_holes=not args.no_fill_holes,
                               mirror=args.mirror, series_uid=args.series_uid, rtstruct=args.rtstruct, seg=args.seg,
                               patient_name=args.patient_name, patient_id=args.patient_id,
                               batch_size=args.batch_size, include_unlearned=args.include_unlearned,
                               ensemble=tuple(args.ensemble)), events)
    return 0


def run_atlas(args: argparse.Namespace, events: Events) -> int:
    from separeg.atlas.contour import AtlasJob, run_atlas
    from separeg.atlas.registration import RegistrationConfig

    cases = tuple(c.strip() for c in args.cases.split(",") if c.strip()) if args.cases else ()
    registration = RegistrationConfig(bspline_mesh=0) if args.affine_only else RegistrationConfig()
    run_atlas(AtlasJob(volume=args.volume, atlases=args.atlases, out_dir=args.out, cases=cases, labels=args.labels,
                       fusion=args.fusion, registration=registration, threads=args.workers,
                       largest_component=not args.no_largest_component, fill_holes=not args.no_fill_holes,
                       series_uid=args.series_uid), events)
    return 0


def run_export(args: argparse.Namespace, events: Events) -> int:
    from separeg.rt.export import FORMATS, ExportJob, run_export

    formats = tuple(f for f in FORMATS if getattr(args, f)) or FORMATS
    run_export(ExportJob(labelmap=args.labelmap, ct=args.ct, out_dir=args.out, labels=args.labels, formats=formats,
                         patient_name=args.patient_name, patient_id=args.patient_id, series_uid=args.series_uid,
                         generation=args.generation, holes=args.holes),
               events)
    return 0


def run_evaluate(args: argparse.Namespace, events: Events) -> int:
    from separeg.evaluate.job import EvaluateJob, run_evaluate

    run_evaluate(EvaluateJob(pred=args.pred, ref=args.ref, out_dir=args.out, labels=args.labels,
                             unknown=args.unknown_labels), events)
    events.done(f"metrics in {args.out / 'metrics.csv'}, summary in {args.out / 'summary.md'}")
    return 0


def run_models(args: argparse.Namespace, events: Events) -> int:
    from separeg.runtime.bundle import read_bundle_info
    from separeg.runtime.model_store import list_models, model_dirs, shipped_model_dir

    found = list_models()
    for path in found:
        info = read_bundle_info(path)
        labels = info.get("labels", {}).get("labels", [])
        arch = info["architecture"]
        source = "shipped" if path.parent == shipped_model_dir() else "installed"
        print(f"{path.stem:24s} {info['kind']:13s} {source:9s} {arch.get('backbone') or arch.get('encoder'):14s} "
              f"{len(labels)} labels  {path}")
    if not found:
        print("no models installed; folders searched: " + ", ".join(str(d) for d in model_dirs()))
    return 0


def run_pack(args: argparse.Namespace, events: Events) -> int:
    import json

    from separeg.runtime.bundle import pack_bundle
    from separeg.runtime.errors import InputError, read_text_table

    metadata = None
    if args.metadata is not None:
        try:
            metadata = json.loads(read_text_table(args.metadata, "--metadata"))
        except json.JSONDecodeError as e:
            raise InputError(f"--metadata {args.metadata} is not valid JSON ({e})") from e
        if not isinstance(metadata, dict):
            raise InputError(f"--metadata {args.metadata} must hold a JSON object (keys for bundle.json)")
    if args.ensemble:
        from separeg.segment.ensemble import pack_ensemble

        path = pack_ensemble([args.bundle, *args.ensemble], args.out, half=args.fp16, metadata=metadata)
    else:
        path = pack_bundle(args.bundle, args.out, half=args.fp16, metadata=metadata)
    events.done(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")
    return 0


def _sis_config(args: argparse.Namespace):
    from separeg.sis.regions import SISConfig

    return config_from_args(SISConfig, args)


def run_scan(args: argparse.Namespace, events: Events) -> int:
    from separeg.io.archive import format_table, scan_archive

    manifest = scan_archive(args.archive, modality=args.modality, events=events, workers=args.workers)
    if args.out:
        manifest.save(args.out)
    if not args.json:
        print(format_table(manifest))
    manifest.require_usable()
    events.done(f"{len(manifest.usable())} usable volume(s); manifest hash {manifest.hash[:12]}"
                + (f"; written to {args.out}" if args.out else ""))
    return 0


def run_regions(args: argparse.Namespace, events: Events) -> int:
    from separeg.sis.job import RegionsJob, run_regions

    job = RegionsJob(volume=args.volume, out_dir=args.out, sis=_sis_config(args), reference=args.reference,
                     overlay_slices=args.slices, workers=args.workers)
    result = run_regions(job, events)
    coverage = result.statistics.get("organ_coverage")
    if coverage:
        events.log("organ coverage: " + ", ".join(f"{k}: {100 * v:.1f} %" for k, v in coverage.items()), stage="sis")
    events.done(f"wrote {args.out / 'regions.json'}" + (f" and {result.overlay}" if result.overlay else ""))
    return 0


def run_demo(args: argparse.Namespace, events: Events) -> int:
    from separeg.experiments.demo import SAMPLE_DATA, DemoJob, run_demo

    run_demo(DemoJob(out_dir=args.out, data_dir=args.data or SAMPLE_DATA, sis=_sis_config(args),
                     iterations=args.iterations, epochs=args.epochs, device=args.device, workers=args.workers),
             events)
    return 0
