"""`separeg` command line: each subcommand maps flags to a job config and calls one ``run_*`` function.

Exit codes: 0 done, 1 error (a message, no traceback), 2 bad usage, 130 cancelled.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from separeg import registry
from separeg.runtime.errors import CancelledError, SepaRegError
from separeg.runtime.events import Events, JsonLinesSink, TerminalSink

__all__ = ["main", "build_parser"]

EXIT_ERROR, EXIT_USAGE, EXIT_CANCELLED = 1, 2, 130


def _existing_path(text: str) -> Path:
    path = Path(text).expanduser()
    if not path.exists():
        raise argparse.ArgumentTypeError(f"{text} does not exist")
    return path


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true",
                        help="print progress and log events as JSON lines on stdout (for the Slicer modules)")
    parser.add_argument("--workers", type=_positive_int, default=None,
                        help="CPU threads for reading and separation (default: all cores)")


def _add_sis(parser: argparse.ArgumentParser) -> None:
    from separeg.sis.regions import SISConfig

    d = SISConfig()
    group = parser.add_argument_group("structure-aware image separation")
    group.add_argument("--separation", choices=registry.SEPARATIONS, default=d.mode,
                       help="sis: SLIC superpixels (paper); regular: square grid; image: whole slices (image-level "
                       "baselines); dense: pixel pairs on feature maps (the 'no separation' ablation)")
    group.add_argument("--extent", choices=registry.SEPARATION_EXTENTS, default=d.extent,
                       help="separate the body's bounding box (default) or the whole slice (reference code)")
    group.add_argument("--n-segments", type=_positive_int, default=d.n_segments, help="superpixels per slice (32)")
    group.add_argument("--compactness", type=float, default=d.compactness, help="SLIC compactness (15)")
    group.add_argument("--sigma", type=float, default=d.sigma, help="SLIC Gaussian smoothing (0.8)")
    group.add_argument("--body-threshold", type=float, default=d.body_threshold_hu,
                       help="HU above which a voxel belongs to the body mask (-500)")


CHANNELS_HELP = ("input channels, comma-separated NAME[:window|percentile|zscore] in input order, e.g. T1,T2,STIR or "
                 "CT,PET:zscore (CT: HU window; others: percentile by default)")


def _add_pretrain(parser: argparse.ArgumentParser) -> None:
    from separeg.pretrain.config import PretrainConfig

    d = PretrainConfig()
    group = parser.add_argument_group("pretraining")
    group.add_argument("--method", choices=registry.SSL_METHODS, default=d.method, help="Φ_CLR (default simsiam)")
    group.add_argument("--encoder", choices=registry.ENCODERS, default=d.encoder,
                       help="resnet50 (paper) or resnet18 (CPU-only sites)")
    group.add_argument("--iterations", type=_positive_int, default=d.iterations,
                       help=f"iterations over all stages ({d.iterations}, the paper's budget)")
    group.add_argument("--batch-size", type=_positive_int, default=d.batch_size,
                       help=f"regions per step ({d.batch_size})")
    group.add_argument("--lr", type=float, default=None, help="peak learning rate (default 0.05 x batch / 256)")
    group.add_argument("--crop-size", type=_positive_int, default=d.crop_size, help="region crop side (128)")
    group.add_argument("--clusters", type=_positive_int, default=d.clusters, help="organ groups K (5)")
    group.add_argument("--distill-loss", choices=registry.DISTILL_LOSSES, default=d.distill_loss,
                       help="L_intra + L_inter (default) or L_intra only (ablation)")
    group.add_argument("--no-iid", action="store_true", help="stop after the inter stage (the 'SIS only' ablation)")
    group.add_argument("--seed", type=int, default=d.seed, help="random seed (runs are deterministic per seed)")
    group.add_argument("--modality", choices=("CT", "MR", "PT", "any"), default=d.modality)
    group.add_argument("--channels", default=None, help=CHANNELS_HELP + "; the archive then holds <case>_0000, "
                       "<case>_0001, ... files, one per channel")
    group.add_argument("--sis-channel", type=int, default=None,
                       help="the channel (0-based, --channels order) that structure-aware separation runs on (0)")
    run = _add_running(parser)
    run.add_argument("--stages", default=",".join(registry.STAGES),
                     help=f"comma-separated subset of {','.join(registry.STAGES)}")


def _add_running(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """Device, resume/restart, stop file and checkpoint interval: shared by the training commands."""
    run = parser.add_argument_group("running")
    run.add_argument("--device", default="auto", help="auto (CUDA, MPS, CPU), cpu, cuda, cuda:N or mps")
    mode = run.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true", help="insist on resuming an existing run")
    mode.add_argument("--restart", action="store_true", help="discard the run's progress and start over")
    run.add_argument("--stop-file", type=Path, default=None,
                     help="stop cleanly (checkpoint first) when this file appears; used by Slicer")
    run.add_argument("--checkpoint-minutes", type=float, default=10.0, help="save at least this often (10)")
    return run


def _run_pretrain(args: argparse.Namespace, events: Events) -> int:
    from separeg.pretrain.config import PretrainConfig, PretrainJob
    from separeg.pretrain.stages import run_pretrain

    config = PretrainConfig(method=args.method, encoder=args.encoder, sis=_sis_config(args), crop_size=args.crop_size,
                            iterations=args.iterations, batch_size=args.batch_size, lr=args.lr,
                            clusters=args.clusters, iid=not args.no_iid, distill_loss=args.distill_loss,
                            seed=args.seed, modality=args.modality, channels=args.channels,
                            sis_channel=args.sis_channel)
    job = PretrainJob(archive=args.archive, run_dir=args.out, config=config, device=args.device,
                      stages=tuple(s.strip() for s in args.stages.split(",") if s.strip()), restart=args.restart,
                      resume=args.resume, stop_file=args.stop_file, checkpoint_minutes=args.checkpoint_minutes,
                      workers=args.workers)
    run_pretrain(job, events)
    return 0


def _add_finetune(parser: argparse.ArgumentParser) -> None:
    from separeg.segment.finetune import FinetuneConfig

    d = FinetuneConfig()
    group = parser.add_argument_group("fine-tuning")
    group.add_argument("--encoder", choices=registry.ENCODERS, default=d.encoder,
                       help="used without --init (with it, the bundle's encoder)")
    group.add_argument("--epochs", type=_positive_int, default=d.epochs, help=f"epochs ({d.epochs}, the paper's)")
    group.add_argument("--steps-per-epoch", type=_positive_int, default=None,
                       help="default: foreground slices / batch size")
    group.add_argument("--batch-size", type=_positive_int, default=d.batch_size,
                       help=f"slices per step ({d.batch_size})")
    group.add_argument("--lr", type=float, default=d.lr, help=f"AdamW learning rate ({d.lr})")
    group.add_argument("--patience", type=_positive_int, default=d.patience, help="early stopping, in epochs (30)")
    group.add_argument("--validation-cases", type=int, default=None, help="cases held out (default 20 %%)")
    group.add_argument("--synonyms", type=_existing_path, default=None, metavar="TABLE",
                       help="your RTSTRUCT ROI names -> TG-263 names (JSON or two-column CSV), for DICOM cases")
    group.add_argument("--validation", type=_existing_path, default=None, metavar="DATA",
                       help="fixed validation cases (a folder or case list); then every case of DATA trains")
    group.add_argument("--channels", default=None, help=CHANNELS_HELP + "; default: those of --init, else CT")
    group.add_argument("--seed", type=int, default=d.seed)
    recipe = parser.add_argument_group("recipe (defaults: measured best with one labelled case; nnU-Net-grade parts "
                                       "are options, see README)")
    recipe.add_argument("--context-slices", type=int, default=d.context_slices,
                        help="2.5D: neighbouring slices on each side as extra input channels (0 = 2D; %(default)s)")
    recipe.add_argument("--augmentation", choices=registry.AUGMENTATIONS, default=d.augmentation,
                        help="nnunet (nnU-Net's set without mirroring), light (the earlier recipe) or none "
                             "(%(default)s)")
    recipe.add_argument("--deep-supervision", action=argparse.BooleanOptionalAction, default=d.deep_supervision,
                        help="also supervise the 3 coarser decoder scales (%(default)s)")
    recipe.add_argument("--schedule", choices=registry.SCHEDULES, default=d.schedule,
                        help="learning-rate decay after the warm-up (%(default)s)")
    recipe.add_argument("--warmup-steps", type=int, default=d.warmup_steps,
                        help="linear warm-up steps, at most a tenth of the run (%(default)s)")
    recipe.add_argument("--encoder-lr-scale", type=float, default=d.encoder_lr_scale,
                        help="encoder learning rate relative to the decoder's (%(default)s)")
    recipe.add_argument("--postprocessing", choices=registry.POSTPROCESSING_MODES, default=d.postprocessing,
                        help="per-organ largest component and hole filling: chosen on the validation cases, for "
                             "every organ (all), or none (%(default)s)")
    recipe.add_argument("--patch-mm", type=float, default=d.patch_mm,
                        help="side of the square training patches in mm (%(default)s)")
    partial = parser.add_argument_group("partial labels (PL-Seg) and Mean Teacher")
    partial.add_argument("--partial-labels", choices=registry.PARTIAL_LABEL_MODES,
                         default=d.partial_labels,
                         help="how to treat organs a case does not annotate: plseg (PL-Seg losses), marginal "
                              "(marginal Dice + CE), background (naive: unlabelled voxels are background); auto: "
                              "plseg when the training cases annotate different organs, else background")
    partial.add_argument("--no-hardness", action="store_true", help="PL-Seg without HADFL's hardness weights")
    partial.add_argument("--psd-weight", type=float, default=d.psd_weight,
                         help=f"PL-Seg self-distillation weight, ramped up to it (0 = off; {d.psd_weight})")
    partial.add_argument("--cocl-weight", type=float, default=d.cocl_weight,
                         help=f"PL-Seg orthogonal contrastive loss weight (0 = off; {d.cocl_weight})")
    partial.add_argument("--mean-teacher", action="store_true",
                         help="add Mean Teacher consistency on unlabelled scans (needs --unlabelled)")
    partial.add_argument("--unlabelled", type=_existing_path, default=None, metavar="ARCHIVE",
                         help="folder of unlabelled CTs (volumes or DICOM series) for --mean-teacher")
    partial.add_argument("--ema-decay", type=float, default=d.ema_decay, help=f"teacher EMA decay ({d.ema_decay})")
    partial.add_argument("--consistency", type=float, default=d.consistency,
                         help=f"consistency loss weight after ramp-up ({d.consistency})")
    _add_running(parser)


def _run_finetune(args: argparse.Namespace, events: Events) -> int:
    from separeg.segment.finetune import FinetuneConfig, FinetuneJob, run_finetune

    config = FinetuneConfig(encoder=args.encoder, epochs=args.epochs, steps_per_epoch=args.steps_per_epoch,
                            batch_size=args.batch_size, lr=args.lr, patience=args.patience,
                            validation_cases=args.validation_cases, seed=args.seed,
                            partial_labels=args.partial_labels, hardness=not args.no_hardness,
                            psd_weight=args.psd_weight, cocl_weight=args.cocl_weight,
                            mean_teacher=args.mean_teacher, ema_decay=args.ema_decay, consistency=args.consistency,
                            channels=args.channels, context_slices=args.context_slices,
                            augmentation=args.augmentation, deep_supervision=args.deep_supervision,
                            schedule=args.schedule, warmup_steps=args.warmup_steps,
                            encoder_lr_scale=args.encoder_lr_scale, postprocessing=args.postprocessing,
                            patch_mm=args.patch_mm)
    if args.unlabelled is not None and not args.mean_teacher:
        events.warning("--unlabelled is only used with --mean-teacher; ignored", stage="finetune")
    run_finetune(FinetuneJob(data=args.data, out_dir=args.out, labels=args.labels, init=args.init,
                             unlabelled=args.unlabelled, validation_data=args.validation, synonyms=args.synonyms,
                             config=config,
                             device=args.device, restart=args.restart, resume=args.resume, stop_file=args.stop_file,
                             checkpoint_minutes=args.checkpoint_minutes), events)
    return 0


def _run_experiment(args: argparse.Namespace, events: Events) -> int:
    from separeg.experiments.protocol import load_experiment, run_experiment
    from separeg.experiments.report import write_report

    if args.report_only:
        path = write_report(load_experiment(args.config), args.out)
    else:
        only = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else None
        path = run_experiment(args.config, args.out, events, only=only)
    events.done(f"report: {path}")
    return 0


def _run_contour(args: argparse.Namespace, events: Events) -> int:
    from separeg.runtime.outdir import output_folder
    from separeg.segment.contour import ContourJob, run_contour

    with output_folder(args.out):  # checked before inference, locked while written
        run_contour(ContourJob(volume=args.volume[0], channels=tuple(args.volume[1:]), model=args.model,
                               out_dir=args.out, device=args.device,
                               largest_component=not args.no_largest_component, fill_holes=not args.no_fill_holes,
                               series_uid=args.series_uid, rtstruct=args.rtstruct, seg=args.seg,
                               patient_name=args.patient_name, patient_id=args.patient_id,
                               batch_size=args.batch_size), events)
    return 0


def _run_atlas(args: argparse.Namespace, events: Events) -> int:
    from separeg.segment.atlas import AtlasJob, RegistrationConfig, run_atlas

    cases = tuple(c.strip() for c in args.cases.split(",") if c.strip()) if args.cases else ()
    registration = RegistrationConfig(bspline_mesh=0) if args.affine_only else RegistrationConfig()
    run_atlas(AtlasJob(volume=args.volume, atlases=args.atlases, out_dir=args.out, cases=cases, labels=args.labels,
                       fusion=args.fusion, registration=registration, threads=args.workers,
                       largest_component=not args.no_largest_component, fill_holes=not args.no_fill_holes,
                       series_uid=args.series_uid), events)
    return 0


def _add_patient(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("DICOM copy of a NIfTI/NRRD/MHA CT")
    group.add_argument("--patient-name", default=None, help="patient name of the new DICOM CT (default Anonymous)")
    group.add_argument("--patient-id", default=None,
                       help="patient ID of the new DICOM CT (default SEPAREG- and a hash of the CT's content)")


def _run_export(args: argparse.Namespace, events: Events) -> int:
    from separeg.rt.export import FORMATS, ExportJob, run_export

    formats = tuple(f for f in FORMATS if getattr(args, f)) or FORMATS
    run_export(ExportJob(labelmap=args.labelmap, ct=args.ct, out_dir=args.out, labels=args.labels, formats=formats,
                         patient_name=args.patient_name, patient_id=args.patient_id, series_uid=args.series_uid,
                         generation=args.generation, holes=args.holes),
               events)
    return 0


def _run_evaluate(args: argparse.Namespace, events: Events) -> int:
    from separeg.evaluate.job import EvaluateJob, run_evaluate

    run_evaluate(EvaluateJob(pred=args.pred, ref=args.ref, out_dir=args.out, labels=args.labels,
                             unknown=args.unknown_labels), events)
    events.done(f"metrics in {args.out / 'metrics.csv'}, summary in {args.out / 'summary.md'}")
    return 0


def _run_models(args: argparse.Namespace, events: Events) -> int:
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


def _run_pack(args: argparse.Namespace, events: Events) -> int:
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
    path = pack_bundle(args.bundle, args.out, half=args.fp16, metadata=metadata)
    events.done(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")
    return 0


def _sis_config(args: argparse.Namespace):
    from separeg.sis.regions import SISConfig

    return SISConfig(mode=args.separation, extent=args.extent, n_segments=args.n_segments,
                     compactness=args.compactness, sigma=args.sigma, body_threshold_hu=args.body_threshold)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="separeg", description="SepaReg: region-level contrastive pretraining and "
                                     "few-shot organ contouring for radiotherapy CT")
    parser.add_argument("--version", action="version", version=f"separeg {_version()}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    scan = sub.add_parser("scan", help="list the usable volumes of an archive folder (and why others are skipped)")
    scan.add_argument("archive", type=Path, help="folder with NIfTI/NRRD/MHA files and/or DICOM series")
    scan.add_argument("--modality", choices=("CT", "MR", "PT", "any"), default="CT",
                      help="which images count as usable (default CT)")
    scan.add_argument("--out", type=Path, default=None, help="write the manifest JSON here")
    _add_common(scan)
    scan.set_defaults(handler=_run_scan)

    regions = sub.add_parser("regions", help="separate one volume into regions; write the cache and an overlay PNG")
    regions.add_argument("volume", type=_existing_path, help="a volume file or a DICOM series folder")
    regions.add_argument("--out", type=Path, required=True, help="output folder (cache/, overlay.png, regions.json)")
    regions.add_argument("--reference", type=_existing_path, default=None,
                         help="organ label map on the same grid: report the fraction of each organ kept")
    regions.add_argument("--slices", type=_positive_int, default=4, help="slices in the overlay (4)")
    _add_sis(regions)
    _add_common(regions)
    regions.set_defaults(handler=_run_regions)

    pretrain = sub.add_parser("pretrain", help="SepaReg pretraining on an archive -> RUN_DIR/encoder.separeg")
    pretrain.add_argument("archive", type=_existing_path, help="folder with CT volumes and/or DICOM series")
    pretrain.add_argument("--out", type=Path, required=True, help="run directory (resumed when it exists)")
    _add_pretrain(pretrain)
    _add_sis(pretrain)
    _add_common(pretrain)
    pretrain.set_defaults(handler=_run_pretrain)

    finetune = sub.add_parser("finetune", help="train a segmentation model on a few annotated CTs -> model.separeg")
    finetune.add_argument("data", type=_existing_path,
                          help="folder of <case>_ct + <case>_oar volumes, or a JSON/CSV case list")
    finetune.add_argument("--out", type=Path, required=True, help="run directory (resumed when it exists)")
    finetune.add_argument("--labels", type=_existing_path, default=None,
                          help="label table (labels.json or CSV); default: labels.json beside the data")
    finetune.add_argument("--init", default=None,
                          help="encoder bundle from `separeg pretrain`, or the name of a shipped one "
                               "(separeg-encoder-hn-ct; see `separeg models`); random init without it")
    _add_finetune(finetune)
    _add_common(finetune)
    finetune.set_defaults(handler=_run_finetune)

    contour = sub.add_parser("contour", help="Auto-contour a CT -> OUT/segmentation.nii.gz + segmentation.json")
    contour.add_argument("volume", type=_existing_path, nargs="+",
                         help="CT volume file or DICOM series folder; for a model with several input channels, one "
                              "co-registered volume per channel, in the model's order (see `separeg models`)")
    contour.add_argument("--model", required=True, help="segmentation bundle path or installed model name")
    contour.add_argument("--out", type=Path, required=True, help="output folder")
    contour.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    contour.add_argument("--series-uid", default=None, help="which DICOM series, when the folder holds several")
    contour.add_argument("--batch-size", type=_positive_int, default=None,
                         help="slices per forward pass (default 16; halved when out of memory)")
    contour.add_argument("--no-largest-component", action="store_true", help="keep every connected component")
    contour.add_argument("--no-fill-holes", action="store_true", help="do not fill holes in the contours")
    contour.add_argument("--rtstruct", action="store_true",
                         help="also write rtstruct.dcm referencing the CT (a NIfTI/NRRD CT is first written as a new "
                         "DICOM series in OUT/ct_dicom)")
    contour.add_argument("--seg", action="store_true", help="also write seg.dcm (DICOM SEG), as --rtstruct")
    _add_patient(contour)
    _add_common(contour)
    contour.set_defaults(handler=_run_contour)

    atlas = sub.add_parser("atlas", help="multi-atlas contouring (register labelled CTs, fuse their organs): the "
                           "classical baseline -> OUT/segmentation.nii.gz + segmentation.json")
    atlas.add_argument("volume", type=_existing_path, help="the CT to contour (a volume file or a DICOM series folder)")
    atlas.add_argument("--atlases", type=_existing_path, required=True,
                       help="folder of labelled cases (<case>_ct + <case>_oar volumes, DICOM CT + RTSTRUCT, ...)")
    atlas.add_argument("--cases", default=None, help="comma-separated atlas case names (default: every case)")
    atlas.add_argument("--labels", type=_existing_path, default=None,
                       help="label table (labels.json or CSV); default: labels.json in the atlas folder")
    atlas.add_argument("--fusion", choices=registry.FUSIONS, default="vote",
                       help="per-organ majority vote or STAPLE over the atlases that annotate the organ (vote)")
    atlas.add_argument("--affine-only", action="store_true", help="skip the B-spline (deformable) stage")
    atlas.add_argument("--out", type=Path, required=True, help="output folder")
    atlas.add_argument("--series-uid", default=None, help="which DICOM series, when the folder holds several")
    atlas.add_argument("--no-largest-component", action="store_true", help="keep every connected component")
    atlas.add_argument("--no-fill-holes", action="store_true", help="do not fill holes in the contours")
    _add_common(atlas)
    atlas.set_defaults(handler=_run_atlas)

    export = sub.add_parser("export", help="label map -> RTSTRUCT, DICOM SEG, NIfTI referencing the CT (+ export.json)")
    export.add_argument("labelmap", type=Path, help="label map (NIfTI/NRRD/MHA) on the CT's grid")
    export.add_argument("--ct", type=Path, required=True,
                        help="the CT: a DICOM series folder, or a NIfTI/NRRD/MHA file (then written as DICOM in "
                        "OUT/ct_dicom)")
    export.add_argument("--out", type=Path, required=True, help="output folder")
    export.add_argument("--labels", type=Path, default=None,
                        help="label table: segmentation.json of `separeg contour` (default: the one beside the label "
                        "map), labels.json or a CSV")
    export.add_argument("--rtstruct", action="store_true", help="write rtstruct.dcm")
    export.add_argument("--seg", action="store_true", help="write seg.dcm (DICOM SEG)")
    export.add_argument("--nifti", action="store_true",
                        help="write segmentation.nii.gz (no format chosen: all three)")
    export.add_argument("--series-uid", default=None, help="which DICOM series, when the folder holds several")
    export.add_argument("--generation", choices=("automatic", "semiautomatic", "manual"), default=None,
                        help="how the contours were made (RTSTRUCT ROI Generation Algorithm, SEG algorithm type); "
                        "default: automatic when segmentation.json names the model, else manual")
    export.add_argument("--holes", choices=("separate", "keyhole"), default="separate",
                        help="RTSTRUCT holes: separate contours, even-odd rule (default), or joined to their outer "
                        "contour by keyhole cuts (for readers that OR contours)")
    _add_patient(export)
    _add_common(export)
    export.set_defaults(handler=_run_export)

    evaluate = sub.add_parser("evaluate", help="DSC, HD95 (mm), volume difference of predictions vs references")
    evaluate.add_argument("pred", type=_existing_path, help="predicted label map, or a folder of them")
    evaluate.add_argument("ref", type=_existing_path, help="reference label map, or a folder with the same names")
    evaluate.add_argument("--out", type=Path, required=True, help="output folder (metrics.csv, summary.md, ...)")
    evaluate.add_argument("--labels", type=_existing_path, default=None,
                          help="label table for organ names (any form finetune reads: segmentation.json, labels.json, "
                          "CSV); default: segmentation.json or labels.json beside the reference, then the prediction")
    evaluate.add_argument("--unknown-labels", choices=("error", "ignore"), default="error",
                          help="values the label table does not list (e.g. 255): refuse (default), or leave those "
                          "voxels out of every organ in both maps")
    _add_common(evaluate)
    evaluate.set_defaults(handler=_run_evaluate)

    models = sub.add_parser("models", help="list installed and shipped models")
    models.set_defaults(handler=_run_models, json=False)

    pack = sub.add_parser("pack", help="re-write a bundle for release: fp16 weights, extra metadata (model card)")
    pack.add_argument("bundle", type=_existing_path, help="the bundle from pretrain or finetune")
    pack.add_argument("--out", type=Path, required=True, help="the packed bundle (NAME.separeg)")
    pack.add_argument("--fp16", action="store_true", help="store floating-point weights in half precision")
    pack.add_argument("--metadata", type=_existing_path, default=None,
                      help="JSON object whose keys are added to bundle.json (training command, data, metrics)")
    pack.set_defaults(handler=_run_pack, json=False)

    experiment = sub.add_parser("experiment", help="the paper's comparison protocol: methods x |X_tr| -> tables, plots")
    experiment.add_argument("config", type=_existing_path, help="experiment config (JSON; see Testing/experiments/)")
    experiment.add_argument("--out", type=Path, required=True, help="experiment folder (finished runs are skipped)")
    experiment.add_argument("--methods", default=None, help="comma-separated method names to run (default: all)")
    experiment.add_argument("--report-only", action="store_true", help="rebuild the report from finished runs")
    _add_common(experiment)
    experiment.set_defaults(handler=_run_experiment)

    demo = sub.add_parser("demo", help="run the pipeline on the bundled sample CTs")
    demo.add_argument("--out", type=Path, default=Path("demo_output"), help="output folder (demo_output)")
    demo.add_argument("--data", type=_existing_path, default=None, help="sample data folder (Resources/SampleData)")
    demo.add_argument("--iterations", type=_positive_int, default=60, help="pretraining iterations (60)")
    demo.add_argument("--epochs", type=_positive_int, default=16, help="fine-tuning epochs of 25 steps (%(default)s)")
    demo.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    _add_sis(demo)
    _add_common(demo)
    demo.set_defaults(handler=_run_demo)
    return parser


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("separeg")
    except PackageNotFoundError:
        return "unknown"


def _run_scan(args: argparse.Namespace, events: Events) -> int:
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


def _run_regions(args: argparse.Namespace, events: Events) -> int:
    from separeg.sis.job import RegionsJob, run_regions

    job = RegionsJob(volume=args.volume, out_dir=args.out, sis=_sis_config(args), reference=args.reference,
                     overlay_slices=args.slices, workers=args.workers)
    result = run_regions(job, events)
    coverage = result.statistics.get("organ_coverage")
    if coverage:
        events.log("organ coverage: " + ", ".join(f"{k}: {100 * v:.1f} %" for k, v in coverage.items()), stage="sis")
    events.done(f"wrote {args.out / 'regions.json'}" + (f" and {result.overlay}" if result.overlay else ""))
    return 0


def _run_demo(args: argparse.Namespace, events: Events) -> int:
    from separeg.experiments.demo import SAMPLE_DATA, DemoJob, run_demo

    run_demo(DemoJob(out_dir=args.out, data_dir=args.data or SAMPLE_DATA, sis=_sis_config(args),
                     iterations=args.iterations, epochs=args.epochs, device=args.device, workers=args.workers),
             events)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    # Before torch starts OpenMP: waiting threads sleep rather than spin, or work on a busy CPU runs several times
    # slower (contour: Testing/benchmarks/results/contour_profile.md; a fine-tune beside other jobs on 2 cores ran
    # 0.15 steps/s spinning, 0.9 passive).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    events = Events(JsonLinesSink(sys.stdout) if args.json else TerminalSink(sys.stderr))
    handler: Callable[[argparse.Namespace, Events], int] = args.handler
    try:
        return handler(args, events)
    except CancelledError as exc:
        events.cancelled(str(exc))
        return EXIT_CANCELLED
    except SepaRegError as exc:
        events.error(str(exc))
        return EXIT_ERROR
    except KeyboardInterrupt:
        events.cancelled("interrupted; finished outputs are kept, re-run the same command to continue")
        return EXIT_CANCELLED
    except OSError as exc:  # disk full, permissions: say which file, no traceback
        events.error(f"{exc.strerror or exc}{f': {exc.filename}' if exc.filename else ''}")
        return EXIT_ERROR
    except Exception as exc:  # a bug: a one-line message, the traceback kept in a file for the report
        log = _write_crash_log()
        first = (str(exc).strip().splitlines() or [""])[0]
        events.error(f"internal error ({type(exc).__name__}: {first}). This is a bug in separeg; please report it "
                     f"with the traceback in {log}")
        return EXIT_ERROR


def _write_crash_log() -> Path:
    import tempfile
    import time
    import traceback

    path = Path(tempfile.gettempdir()) / f"separeg-crash-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    try:
        path.write_text(traceback.format_exc(), encoding="utf-8")
    except OSError:
        return Path("<not written>")
    return path


if __name__ == "__main__":
    sys.exit(main())
