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

from separeg import commands, registry
from separeg.runtime.errors import CancelledError, SepaRegError
from separeg.runtime.events import Events, JsonLinesSink, TerminalSink
from separeg.runtime.flags import WORKERS_HELP, add_flags, existing_path, positive_int

__all__ = ["main", "build_parser"]

EXIT_ERROR, EXIT_USAGE, EXIT_CANCELLED = 1, 2, 130

# contour and export (separeg.runtime.outdir.begin_result)
OUT_HOLDS_ONE_RESULT = ("it holds this run's result only: what an earlier run wrote there (segmentation.nii.gz, "
                        "segmentation.json, rtstruct.dcm, seg.dcm, export.json, ct_dicom/) is removed when this run "
                        "starts writing, other files are kept")


_existing_path = existing_path


def _add_common(parser: argparse.ArgumentParser, workers: bool = True) -> None:
    """--json, and --workers for the commands whose job does not declare it (pretrain's does)."""
    parser.add_argument("--json", action="store_true",
                        help="print progress and log events as JSON lines on stdout (for the Slicer modules)")
    if workers:
        parser.add_argument("--workers", type=positive_int, default=None, help=WORKERS_HELP)


def _add_sis(parser: argparse.ArgumentParser) -> None:
    from separeg.sis.regions import SISConfig

    add_flags(parser.add_argument_group("structure-aware image separation"), SISConfig)


def _add_pretrain(parser: argparse.ArgumentParser) -> None:
    """The job's flags (archive, --out, running, --workers; PretrainJob's fields) and the config's."""
    from separeg.pretrain.config import PretrainJob

    add_flags(parser, PretrainJob, {"config": parser.add_argument_group("pretraining"),
                                    "running": parser.add_argument_group("running")})


def _add_finetune(parser: argparse.ArgumentParser) -> None:
    """The job's flags (data, --out, --labels, --init, ..., running; FinetuneJob's fields) and the config's."""
    from separeg.segment.finetune.config import FinetuneJob

    groups = {"finetune": parser.add_argument_group("fine-tuning"),
              "recipe": parser.add_argument_group("recipe (defaults: measured best with one labelled case; "
                                                  "nnU-Net-grade parts are options, see docs/method.md)"),
              "partial": parser.add_argument_group("partial labels (PL-Seg) and Mean Teacher"),
              "running": parser.add_argument_group("running")}
    add_flags(parser, FinetuneJob, {"config": groups["finetune"], **groups})


def _add_patient(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("DICOM copy of a NIfTI/NRRD/MHA CT")
    group.add_argument("--patient-name", default=None, help="patient name of the new DICOM CT (default Anonymous)")
    group.add_argument("--patient-id", default=None,
                       help="patient ID of the new DICOM CT (default SEPAREG- and a hash of the CT's content)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="separeg", description="SepaReg: region-level contrastive pretraining and "
                                     "few-shot organ contouring for radiotherapy CT")
    parser.add_argument("--version", action="version", version=f"separeg {_version()}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_scan_command, _regions_command, _pretrain_command, _finetune_command, _contour_command,
                _atlas_command, _export_command, _evaluate_command, _models_command, _pack_command,
                _experiment_command, _demo_command):  # in the order `separeg --help` lists them
        add(sub)
    return parser


def _scan_command(sub: argparse._SubParsersAction) -> None:
    scan = sub.add_parser("scan", help="list the usable volumes of an archive folder (and why others are skipped)")
    scan.add_argument("archive", type=Path, help="folder with NIfTI/NRRD/MHA files and/or DICOM series")
    scan.add_argument("--modality", choices=registry.MODALITIES, default="CT",
                      help="which images count as usable (default CT)")
    scan.add_argument("--out", type=Path, default=None, help="write the manifest JSON here")
    _add_common(scan)
    scan.set_defaults(handler=commands.run_scan)


def _regions_command(sub: argparse._SubParsersAction) -> None:
    regions = sub.add_parser("regions", help="separate one volume into regions; write the cache and an overlay PNG")
    regions.add_argument("volume", type=_existing_path, help="a volume file or a DICOM series folder")
    regions.add_argument("--out", type=Path, required=True, help="output folder (cache/, overlay.png, regions.json)")
    regions.add_argument("--reference", type=_existing_path, default=None,
                         help="organ label map on the same grid: report the fraction of each organ kept")
    regions.add_argument("--slices", type=positive_int, default=4, help="slices in the overlay (4)")
    _add_sis(regions)
    _add_common(regions)
    regions.set_defaults(handler=commands.run_regions)


def _pretrain_command(sub: argparse._SubParsersAction) -> None:
    pretrain = sub.add_parser("pretrain", help="SepaReg pretraining on an archive -> RUN_DIR/encoder.separeg")
    _add_pretrain(pretrain)
    _add_sis(pretrain)
    _add_common(pretrain, workers=False)
    pretrain.set_defaults(handler=commands.run_pretrain)


def _finetune_command(sub: argparse._SubParsersAction) -> None:
    finetune = sub.add_parser("finetune", help="train a segmentation model on a few annotated CTs -> model.separeg")
    _add_finetune(finetune)
    _add_common(finetune)
    finetune.set_defaults(handler=commands.run_finetune)


def _contour_command(sub: argparse._SubParsersAction) -> None:
    contour = sub.add_parser("contour", help="Auto-contour a CT -> OUT/segmentation.nii.gz + segmentation.json")
    contour.add_argument("volume", type=_existing_path, nargs="+",
                         help="CT volume file or DICOM series folder; for a model with several input channels, one "
                              "co-registered volume per channel, in the model's order (see `separeg models`)")
    contour.add_argument("--model", required=True, help="segmentation bundle path or installed model name")
    contour.add_argument("--ensemble", action="append", default=[], metavar="MODEL",
                         help="also average the probabilities of this model (repeatable): seeds or folds of the "
                              "model's recipe, for the same organs and input grid; each member adds its inference time")
    contour.add_argument("--out", type=Path, required=True, help=f"output folder; {OUT_HOLDS_ONE_RESULT}")
    contour.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    contour.add_argument("--series-uid", default=None, help="which DICOM series, when the folder holds several")
    contour.add_argument("--batch-size", type=positive_int, default=None,
                         help="slices per forward pass (default 16; halved when out of memory)")
    contour.add_argument("--no-largest-component", action="store_true", help="keep every connected component")
    contour.add_argument("--no-fill-holes", action="store_true", help="do not fill holes in the contours")
    contour.add_argument("--mirror", action=argparse.BooleanOptionalAction, default=None,
                         help="average in the left-right mirrored prediction, laterality swapped (default: as the "
                              "model's fine-tuning chose on its validation cases)")
    contour.add_argument("--rtstruct", action="store_true",
                         help="also write rtstruct.dcm referencing the CT (a NIfTI/NRRD CT is first written as a new "
                         "DICOM series in OUT/ct_dicom)")
    contour.add_argument("--seg", action="store_true", help="also write seg.dcm (DICOM SEG), as --rtstruct")
    contour.add_argument("--include-unlearned", action="store_true",
                         help="also write the organs the model did not learn (no training case annotates them, or "
                         "validation DSC under 1 %%); left out by default, saying so")
    _add_patient(contour)
    _add_common(contour)
    contour.set_defaults(handler=commands.run_contour)


def _atlas_command(sub: argparse._SubParsersAction) -> None:
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
    atlas.set_defaults(handler=commands.run_atlas)


def _export_command(sub: argparse._SubParsersAction) -> None:
    export = sub.add_parser("export", help="label map -> RTSTRUCT, DICOM SEG, NIfTI referencing the CT (+ export.json)")
    export.add_argument("labelmap", type=Path, help="label map (NIfTI/NRRD/MHA) on the CT's grid")
    export.add_argument("--ct", type=Path, required=True,
                        help="the CT: a DICOM series folder, or a NIfTI/NRRD/MHA file (then written as DICOM in "
                        "OUT/ct_dicom)")
    export.add_argument("--out", type=Path, required=True, help=f"output folder; {OUT_HOLDS_ONE_RESULT}")
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
    export.add_argument("--holes", choices=registry.HOLE_CONVENTIONS, default="separate",
                        help="RTSTRUCT holes: separate contours, even-odd rule (default), or joined to their outer "
                        "contour by keyhole cuts (for readers that OR contours)")
    _add_patient(export)
    _add_common(export)
    export.set_defaults(handler=commands.run_export)


def _evaluate_command(sub: argparse._SubParsersAction) -> None:
    evaluate = sub.add_parser("evaluate", help="DSC, HD95 (mm), volume difference of predictions vs references")
    evaluate.add_argument("pred", type=_existing_path, help="predicted label map, or a folder of them")
    evaluate.add_argument("ref", type=_existing_path, help="reference label map, or a folder with the same names")
    evaluate.add_argument("--out", type=Path, required=True, help="output folder (metrics.csv, summary.md, ...)")
    evaluate.add_argument("--labels", type=_existing_path, default=None,
                          help="label table for organ names (any form finetune reads: segmentation.json, labels.json, "
                          "CSV); default: segmentation.json or labels.json beside the reference, then the prediction")
    evaluate.add_argument("--unknown-labels", choices=registry.UNKNOWN_LABEL_POLICIES, default="error",
                          help="values the label table does not list (e.g. 255): refuse (default), or leave those "
                          "voxels out of every organ in both maps")
    _add_common(evaluate)
    evaluate.set_defaults(handler=commands.run_evaluate)


def _models_command(sub: argparse._SubParsersAction) -> None:
    models = sub.add_parser("models", help="list installed and shipped models")
    models.set_defaults(handler=commands.run_models, json=False)


def _pack_command(sub: argparse._SubParsersAction) -> None:
    pack = sub.add_parser("pack", help="re-write a bundle for release: fp16 weights, extra metadata (model card)")
    pack.add_argument("bundle", type=_existing_path, help="the bundle from pretrain or finetune")
    pack.add_argument("--out", type=Path, required=True, help="the packed bundle (NAME.separeg)")
    pack.add_argument("--fp16", action="store_true", help="store floating-point weights in half precision")
    pack.add_argument("--ensemble", action="append", default=[], metavar="MODEL",
                      help="also hold this segmentation model (repeatable): one bundle whose contours average the "
                           "members' probabilities (seeds or folds of one recipe, same organs and inputs)")
    pack.add_argument("--metadata", type=_existing_path, default=None,
                      help="JSON object whose keys are added to bundle.json (training command, data, metrics)")
    pack.set_defaults(handler=commands.run_pack, json=False)


def _experiment_command(sub: argparse._SubParsersAction) -> None:
    experiment = sub.add_parser("experiment", help="the paper's comparison protocol: methods x |X_tr| -> tables, plots")
    experiment.add_argument("config", type=_existing_path, help="experiment config (JSON; see Testing/experiments/)")
    experiment.add_argument("--out", type=Path, required=True, help="experiment folder (finished runs are skipped)")
    experiment.add_argument("--methods", default=None, help="comma-separated method names to run (default: all)")
    experiment.add_argument("--report-only", action="store_true", help="rebuild the report from finished runs")
    _add_common(experiment)
    experiment.set_defaults(handler=commands.run_experiment)


def _demo_command(sub: argparse._SubParsersAction) -> None:
    demo = sub.add_parser("demo", help="run the pipeline on the bundled sample CTs")
    demo.add_argument("--out", type=Path, default=Path("demo_output"), help="output folder (demo_output)")
    demo.add_argument("--data", type=_existing_path, default=None, help="sample data folder (Resources/SampleData)")
    demo.add_argument("--iterations", type=positive_int, default=60, help="pretraining iterations (60)")
    demo.add_argument("--epochs", type=positive_int, default=32, help="fine-tuning epochs of 25 steps (%(default)s)")
    demo.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    _add_sis(demo)
    _add_common(demo)
    demo.set_defaults(handler=commands.run_demo)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("separeg")
    except PackageNotFoundError:
        return "unknown"


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
