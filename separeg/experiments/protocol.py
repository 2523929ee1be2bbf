"""`separeg experiment CONFIG --out OUT`: the paper's comparison protocol (Tables 3-7) with the product's commands.

Protocol (paper, "Experimental Setup"): the pretraining set X_pre is the training pool's CTs (used without labels); a
labelled training set X_tr of ``train_sizes`` cases is drawn from that pool with fixed seeds (several draws for small
sizes); fixed validation cases pick the best checkpoint; the test cases are touched only at the end, by ``separeg
contour`` + ``separeg evaluate``. A method is a config entry: pretraining settings (or none: random init) and
fine-tuning settings; nothing else differs between methods. An ``atlas`` method (``{"atlas": {"fusion": "vote"}}``,
:mod:`separeg.atlas.contour`) trains nothing: its X_tr cases are the atlases, and the test cases are contoured by
``separeg atlas`` instead of ``separeg contour``, then evaluated the same way. A method with ``archive`` fine-tunes
with ``--archive`` on that many unlabelled training-pool CTs outside X_tr; an ``ensemble`` method contours with
another method's models of several fine-tuning seeds averaged (the cost of a seed ensemble is in its seconds). The
seconds each test case took to contour are recorded (``seconds.json`` per run) and reported next to DSC. One
``budget`` factor scales the paper's 100k pretraining iterations and 200 fine-tuning epochs, so the same config runs
small on a CPU and in full on a GPU.

Every run is resumable and skipped once its ``metrics.csv`` exists; the report (``results.md``, ``results.csv``,
``boxplots.png``, ``learning_curve.png``) is rebuilt from whatever has finished. ``hide_fraction`` removes organ
annotations from the training cases at random (the partial-label protocol of PL-Seg).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from separeg.experiments.plan import (
    ExperimentConfig,
    Method,
    RunSpec,
    load_experiment,
    plan_runs,
)
from separeg.registry import PAPER_FINETUNE_EPOCHS, PAPER_PRETRAIN_ITERATIONS
from separeg.runtime.atomic import atomic_path, write_json
from separeg.runtime.events import Events

__all__ = ["ExperimentConfig", "Method", "RunSpec", "load_experiment", "plan_runs", "run_experiment"]


def _link(source: Path, target: Path) -> None:
    """A symbolic link where the file system allows one, else a copy (the CTs are read, never written)."""
    if target.exists():
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        target.symlink_to(source.resolve())
    except OSError:
        shutil.copy(source, target)


def hidden_organs(cfg: ExperimentConfig, case: str, present: list[int]) -> list[int]:
    """The organs whose annotation the partial-label protocol removes from ``case`` (at least one is kept)."""
    if cfg.hide_fraction <= 0 or len(present) < 2:
        return []
    rng = np.random.default_rng([cfg.seed, *case.encode()])
    hide = [v for v in present if rng.random() < cfg.hide_fraction]
    return hide if len(hide) < len(present) else hide[1:]


def _prepare_case(cfg: ExperimentConfig, case: str, folder: Path) -> list[int]:
    """Link the case's CT into ``folder`` and write its (possibly partial) label map; returns the hidden organs."""
    import SimpleITK as sitk

    _link(cfg.data / f"{case}_ct.nii.gz", folder / f"{case}_ct.nii.gz")
    labels = sitk.ReadImage(str(cfg.data / f"{case}_oar.nii.gz"))
    array = sitk.GetArrayFromImage(labels)
    hide = hidden_organs(cfg, case, sorted(int(v) for v in np.unique(array) if v > 0))
    target = folder / f"{case}_oar.nii.gz"
    if not hide:
        _link(cfg.data / f"{case}_oar.nii.gz", target)
    elif not target.exists():
        array[np.isin(array, hide)] = 0
        partial = sitk.GetImageFromArray(array)
        partial.CopyInformation(labels)
        with atomic_path(target, suffix=".nii.gz") as tmp:
            sitk.WriteImage(partial, str(tmp), True)
    return hide


def _pretrain(cfg: ExperimentConfig, method: Method, out: Path, events: Events) -> Path:
    from separeg.pretrain.augment import AugmentConfig
    from separeg.pretrain.config import PretrainConfig, PretrainJob
    from separeg.pretrain.stages import run_pretrain
    from separeg.sis.regions import SISConfig

    settings = {**cfg.pretrain, **method.pretrain}
    separation = settings.pop("separation", "sis")
    sis = SISConfig(**{**settings.pop("sis", {}), "mode": separation})
    iterations = max(1, round(settings.pop("iterations", PAPER_PRETRAIN_ITERATIONS) * cfg.budget_pretrain))
    # A method may choose its own encoder ("encoder" in its pretrain and finetune settings) and view augmentation.
    augment = AugmentConfig.from_dict(settings.get("augment", {}))
    config = PretrainConfig(**{"encoder": cfg.encoder, "sis": sis, "iterations": iterations, "seed": cfg.seed,
                               **settings, "augment": augment})
    # Methods with the same pretraining settings share one run: its folder is named by the settings.
    name = json.dumps({"sis": separation, "iterations": iterations, **settings}, sort_keys=True)
    run_dir = out / "pretrain" / hashlib.sha256(name.encode()).hexdigest()[:10]
    encoder = run_dir / "encoder.separeg"
    if encoder.exists():
        return encoder
    events.log(f"pretraining for {method.name}: {iterations} iterations ({name})", stage="experiment")
    return run_pretrain(PretrainJob(archive=_archive(cfg, out), run_dir=run_dir, config=config, device=cfg.device),
                        events)


def _archive(cfg: ExperimentConfig, out: Path) -> Path:
    """X_pre: the training pool's CTs, unlabelled (pretraining and Mean Teacher read it)."""
    for case in cfg.train_pool:
        _link(cfg.data / f"{case}_ct.nii.gz", out / "archive" / f"{case}_ct.nii.gz")
    return out / "archive"


def _archive_draw(cfg: ExperimentConfig, run: RunSpec, out: Path) -> Path:
    """``run.method.archive`` training-pool CTs outside the run's X_tr, drawn with the config seed per size and
    draw (so every method and seed of a draw sees the same archive), as a folder of links."""
    others = sorted(set(cfg.train_pool) - set(run.cases))
    drawn = np.random.default_rng([cfg.seed, run.size, run.draw, 1]).permutation(others)[:run.method.archive]
    folder = out / "archives" / f"n{run.size}_d{run.draw}_a{run.method.archive}"
    for case in sorted(drawn.tolist()):
        _link(cfg.data / f"{case}_ct.nii.gz", folder / f"{case}_ct.nii.gz")
    return folder


def _device_name(device: str) -> str:
    import os

    import torch

    if device != "cpu" and torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} x {torch.cuda.device_count()}"
    return f"CPU ({os.cpu_count()} cores)"


def _atlas_contourer(run: RunSpec, data: Path, run_dir: Path, hidden: dict,
                     events: Events) -> Callable[[Path, Path], Path]:
    """The atlas method's "training": its X_tr cases (as partial as the protocol makes them) become the atlases."""
    from separeg.atlas.contour import AtlasJob, run_atlas
    from separeg.atlas.registration import RegistrationConfig

    settings = dict(run.method.atlas or {})
    fusion, threads = settings.pop("fusion", "vote"), settings.pop("threads", None)
    registration = RegistrationConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in settings.items()})
    write_json({"method": run.method.name, "size": run.size, "draw": run.draw, "cases": list(run.cases),
                "hidden_organs": hidden, "atlas": run.method.atlas or {}, "device": _device_name("cpu")},
               run_dir / "run.json")
    return lambda ct, out_dir: run_atlas(AtlasJob(volume=ct, atlases=data, out_dir=out_dir, cases=run.cases,
                                                  fusion=fusion, registration=registration, threads=threads),
                                         events).segmentation


def _finetune_and_test(cfg: ExperimentConfig, run: RunSpec, encoder: Path | None, out: Path,
                       events: Events) -> Path:
    from separeg.evaluate.job import EvaluateJob, run_evaluate

    run_dir = out / "runs" / run.method.name / run.folder
    data = run_dir / "data"
    hidden = {case: _prepare_case(cfg, case, data) for case in run.cases}
    shutil.copy(cfg.data / "labels.json", data / "labels.json")
    if run.method.atlas is not None:
        contour = _atlas_contourer(run, data, run_dir, hidden, events)
    elif run.method.ensemble is not None:
        contour = _ensemble_contourer(cfg, run, out, run_dir, events)
    else:
        contour = _model_contourer(cfg, run, encoder, out, run_dir, hidden, events)
    predictions, references = run_dir / "predictions", out / "references"
    seconds_path = run_dir / "seconds.json"
    seconds = json.loads(seconds_path.read_text(encoding="utf-8")) if seconds_path.exists() else {}
    for case in cfg.test:
        _link(cfg.data / f"{case}_oar.nii.gz", references / f"{case}.nii.gz")
        target = predictions / f"{case}.nii.gz"
        if not target.exists():
            start = time.perf_counter()
            segmentation = contour(cfg.data / f"{case}_ct.nii.gz", run_dir / "contour" / case)
            seconds[case] = round(time.perf_counter() - start, 2)
            write_json(seconds, seconds_path)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(segmentation, target)
    evaluation = run_evaluate(EvaluateJob(pred=predictions, ref=references, out_dir=run_dir / "evaluation",
                                          labels=cfg.data / "labels.json"), events)
    metrics = run_dir / "metrics.csv"
    with atomic_path(metrics) as tmp:  # written last: its presence marks the run complete
        shutil.copy(evaluation.metrics_csv, tmp)
    return metrics


def _ensemble_contourer(cfg: ExperimentConfig, run: RunSpec, out: Path, run_dir: Path,
                        events: Events) -> Callable[[Path, Path], Path]:
    """The ensemble method's "training": the finished models of its source method's seeds on this draw."""
    from separeg.runtime.errors import InputError
    from separeg.segment.contour import ContourJob, run_contour

    source, seeds = run.method.ensemble["of"], run.method.ensemble["seeds"]
    first = cfg.finetune_seeds[0]
    models = [out / "runs" / source / (f"n{run.size}_d{run.draw}" + ("" if s == first else f"_s{s}")) / "finetune"
              / "model.separeg" for s in seeds]
    missing = [str(m) for m in models if not m.exists()]
    if missing:
        raise InputError(f"method {run.method.name} needs {source}'s models first: {', '.join(missing)}")
    write_json({"method": run.method.name, "size": run.size, "draw": run.draw, "cases": list(run.cases),
                "ensemble_of": source, "seeds": seeds, "models": [str(m) for m in models],
                "device": _device_name(cfg.device)}, run_dir / "run.json")
    return lambda ct, out_dir: run_contour(ContourJob(volume=ct, model=str(models[0]), out_dir=out_dir,
                                                      ensemble=tuple(str(m) for m in models[1:]),
                                                      device=cfg.device), events).segmentation


def _model_contourer(cfg: ExperimentConfig, run: RunSpec, encoder: Path | None, out: Path, run_dir: Path,
                     hidden: dict, events: Events) -> Callable[[Path, Path], Path]:
    """Fine-tune on X_tr (best checkpoint on the validation cases); test cases are contoured by its model."""
    from separeg.segment.contour import ContourJob, run_contour
    from separeg.segment.finetune.train import FinetuneConfig, FinetuneJob, run_finetune

    data, validation = run_dir / "data", out / "validation"
    for case in cfg.validation:
        _link(cfg.data / f"{case}_ct.nii.gz", validation / f"{case}_ct.nii.gz")
        _link(cfg.data / f"{case}_oar.nii.gz", validation / f"{case}_oar.nii.gz")
    settings = {"encoder": cfg.encoder, **cfg.finetune, **run.method.finetune}
    epochs = max(1, round(settings.pop("epochs", PAPER_FINETUNE_EPOCHS) * cfg.budget_finetune))
    config = FinetuneConfig(epochs=epochs, seed=run.seed, **settings)
    write_json({"method": run.method.name, "size": run.size, "draw": run.draw, "seed": run.seed,
                "cases": list(run.cases),
                "hidden_organs": hidden, "encoder": str(encoder) if encoder else None, "epochs": epochs,
                "device": _device_name(cfg.device)},
               run_dir / "run.json")
    archive = _archive_draw(cfg, run, out) if run.method.archive else None
    model = run_finetune(FinetuneJob(data=data, out_dir=run_dir / "finetune", init=encoder, config=config,
                                     device=cfg.device, validation_data=validation,
                                     unlabelled=_archive(cfg, out) if config.mean_teacher else None,
                                     archive=archive), events)
    return lambda ct, out_dir: run_contour(ContourJob(volume=ct, model=str(model), out_dir=out_dir,
                                                      device=cfg.device), events).segmentation


def _same_as_first_seed(run: RunSpec, out: Path) -> bool:
    """An atlas or ensemble method has no seed (the registration's sampling seed is fixed; an ensemble spans seeds):
    its run for a later fine-tuning seed is the first seed's run of the same draw, linked once that one is done, so
    seed-paired comparisons keep every run without computing it again."""
    if not run.method.seedless or run.first_seed:
        return False
    folder = out / "runs" / run.method.name / run.folder
    first = folder.with_name(f"n{run.size}_d{run.draw}")
    if not (first / "metrics.csv").exists() or folder.exists() or folder.is_symlink():
        return False
    folder.symlink_to(first.name, target_is_directory=True)
    return True


def run_experiment(config_path: str | Path, out: str | Path, events: Events | None = None,
                   only: list[str] | None = None) -> Path:
    """Run every planned run not yet complete (or those of the methods in ``only``), then write the report.

    Returns:
        The path of ``results.md``.
    """
    from separeg.experiments.report import write_report

    events = events or Events()
    cfg = load_experiment(config_path)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    raw = json.loads(Path(config_path).read_text(encoding="utf-8"))
    write_json({**raw, "data": str(cfg.data)}, out / "config.json")  # data made absolute: the copy works from OUT
    runs = [r for r in plan_runs(cfg) if only is None or r.method.name in only]
    events.log(f"{cfg.name}: {len(runs)} run(s), {len(cfg.test)} test case(s), {cfg.budget_text}",
               stage="experiment")
    for i, run in enumerate(runs, 1):
        metrics = out / "runs" / run.method.name / run.folder / "metrics.csv"
        events.progress("experiment", i - 1, len(runs), msg=run.key)
        if metrics.exists() or _same_as_first_seed(run, out):
            continue
        encoder = _pretrain(cfg, run.method, out, events) if run.method.pretrain is not None else run.method.init
        _finetune_and_test(cfg, run, encoder, out, events)
        write_report(cfg, out)
    events.progress("experiment", len(runs), len(runs))
    return write_report(cfg, out)

