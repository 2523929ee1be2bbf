"""`separeg finetune`: a U-Net from a pretrained encoder, trained on a few annotated CTs (DESIGN §2.9).

2D (or 2.5D: neighbouring slices as channels) on axial slices as in the paper; Dice + CE with deep supervision, or
PL-Seg's losses when cases annotate different organs (an organ a case does not annotate is unknown there;
:mod:`separeg.segment.finetune.objective`); optionally Mean Teacher on unlabelled scans (``--mean-teacher --unlabelled
ARCHIVE``) and the training cases' organs carried onto unlabelled CTs by registration (``--archive FOLDER``,
:mod:`separeg.segment.finetune.propagated`); class-balanced foreground sampling of square patches
(:mod:`separeg.segment.finetune.data`); nnU-Net's augmentation without mirroring
(:mod:`separeg.segment.finetune.augment`); validation by patient after every epoch, the best checkpoint by mean DSC
kept, early stopping (:mod:`separeg.segment.finetune.validation`; which cases train and which validate:
:mod:`separeg.segment.finetune.cases`); per-organ post-processing chosen on the validation cases.
Settings: :mod:`separeg.segment.finetune.config`. Resumable like pretraining; writes ``OUT/model.separeg``.
"""

from __future__ import annotations

import json
import math
from contextlib import ExitStack
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from separeg.io.channels import parse_channels
from separeg.runtime.atomic import write_json
from separeg.runtime.errors import InputError
from separeg.runtime.events import Events, FileSink
from separeg.runtime.training import (
    Runtime,
    StopRequest,
    load_checkpoint,
    setup_runtime,
    step_seed,
    train_steps,
    warmup_lr,
)
from separeg.segment.finetune.augment import augment_batch
from separeg.segment.finetune.cases import load_cases
from separeg.segment.finetune.config import LEGACY_VALIDATION, OLD_RECIPE, FinetuneConfig, FinetuneJob
from separeg.segment.finetune.data import SliceSet, sample_patches
from separeg.segment.finetune.propagated import archive_term, check_archive, with_archive
from separeg.segment.finetune.validation import (
    EpochValidator,
    choose_postprocessing,
    predict_slices,
    validate,
    validation_cadence,
    validation_rows,
)
from separeg.segment.mirror import MirrorEnsemble, lateral_swap, mirror_batch
from separeg.segment.model_quality import useless_model_reason
from separeg.segment.network import (
    GridSpec,
    build_unet,
    load_encoder_weights,
    load_segmentation_model,
    transfer_segmentation_weights,
    unet_architecture,
    unet_encoder,
)

__all__ = ["FinetuneConfig", "FinetuneJob", "OLD_RECIPE", "run_finetune", "SliceSet"]


def run_finetune(job: FinetuneJob, events: Events | None = None) -> Path:
    """Train a segmentation model; returns the path of ``model.separeg``. The run directory is locked while it runs
    (released at the end, so that one process may run many fine-tunes, as ``separeg experiment`` does).

    Raises:
        InputError: bad data (geometry mismatch, unknown labels), an encoder bundle of the wrong kind,
            or a configuration clash with an existing run.
        CancelledError: stopped; a checkpoint was saved.
    """
    with ExitStack() as cleanup:
        return _run_finetune(job, events or Events(), cleanup)


@dataclass(frozen=True)
class _Start:
    """Where the network starts: a random ``encoder``, a pretrained encoder bundle or a segmentation model (continued
    with its own organs, or transferred to another label table: ``organ_map``)."""

    encoder: str
    bundle: object | None = None  # separeg.runtime.bundle.Bundle
    # Transfer only: per output channel of the new network, the model's channel of the same organ, or None (new).
    organ_map: tuple[int | None, ...] | None = None

    @property
    def model(self):
        return self.bundle if self.bundle is not None and self.bundle.kind == "segmentation" else None


def _run_finetune(job: FinetuneJob, events: Events, cleanup: ExitStack) -> Path:
    if job.config.mean_teacher and job.unlabelled is None:
        raise InputError("--mean-teacher needs unlabelled scans: give --unlabelled ARCHIVE (a folder of CTs)")
    runtime = setup_runtime(job.device)
    out = Path(job.out_dir)
    start = _resolve_init(job, events)
    table, cfg, start = _resolve_label_table(job, start, events)
    open_ended = _organ_values(cfg.open_ended, table)  # before the run folder is written: a typo leaves none
    channels = _input_channels(cfg, start.bundle, job.init)
    if len(channels) > 1 and cfg.mean_teacher:
        raise InputError("--mean-teacher reads single-volume CT archives; it is not available with several input "
                         "channels yet. Leave out --mean-teacher or train on one channel")
    cases, train_cases, val_cases, synonyms = load_cases(job, cfg, table, events)
    archive = check_archive(job, channels, [*cases, *val_cases], events)  # --archive: refused before the run folder
    spacing = cfg.spacing_xy or tuple(max(cfg.finest_grid_mm, float(np.median([c.image.GetSpacing()[a]
                                                                              for c in train_cases])))
                                      for a in (0, 1))
    spec = GridSpec(cfg.hu_window, spacing, channels=channels, context_slices=cfg.context_slices)
    identity = {"data": str(Path(job.data).resolve()),
                "init": start.bundle.weights_sha256 if start.bundle is not None else None,
                "config": json.loads(json.dumps(asdict(cfg))),
                "cases": sorted(c.name for c in cases), "validation": sorted(c.name for c in val_cases),
                "synonyms": synonyms,
                "unlabelled": str(Path(job.unlabelled).resolve()) if cfg.mean_teacher else None}
    identity = with_archive(_without_legacy_validation(identity), archive)
    _check_run(out, identity, job, runtime)
    if runtime.is_main:
        from separeg.runtime.runlock import release_run_lock

        cleanup.callback(release_run_lock, out)
        events.add_sink(FileSink(out / "events.jsonl"))
    events.log(f"{len(train_cases)} training case(s), {len(val_cases)} validation case(s); encoder {start.encoder}"
               f"{' from ' + str(job.init) if job.init else ' (random init)'}; grid {spacing[0]:.3g} x "
               f"{spacing[1]:.3g} mm; {2 * cfg.context_slices + 1} slice(s) per input", stage="finetune")
    if not val_cases:
        events.warning("no validation case: the best epoch is chosen on the training cases' DSC, which overstates "
                       "accuracy; add cases or give --validation", stage="finetune")
    n_classes = max(table.values) + 1
    train = SliceSet(train_cases, n_classes, spec, runtime.device, open_ended=open_ended,
                     min_body_area=cfg.min_body_area)
    val = SliceSet(val_cases, n_classes, spec, runtime.device, min_body_area=cfg.min_body_area) if val_cases else None
    unet = _build_network(start, spec, n_classes, cfg, runtime)
    objective = _objective(unet, cfg, job, table, train_cases, spec, runtime, events)
    objective.archive = archive_term(job, cfg, archive, train_cases, n_classes, spec, runtime.device, open_ended,
                                     lateral_swap(table), events)  # None without --archive
    swap = lateral_swap(table)
    validator = _train(objective, train, val, spec, cfg, job, runtime, events, swap)
    if not runtime.is_main:
        return out / "model.separeg"
    best = load_checkpoint(out / "checkpoints" / "best.pt")
    objective.deployable.load_state_dict(best["model"])
    postprocessing = _postprocessing(objective.deployable, val or train, val is None, table, cfg, runtime, events)
    mirror = _mirroring(objective.deployable, val or train, val is None, validator.history["best"] or 0.0, swap,
                        runtime, events)
    return _write_bundle(out, best, start, spec, n_classes, table, cfg, identity, objective, validator,
                         postprocessing, mirror, train_cases, val_cases, events)


def _without_legacy_validation(identity: dict) -> dict:
    """The identity as before the validation, grid and BatchNorm settings existed when they hold their old behaviour,
    so runs started then still resume (given ``LEGACY_VALIDATION``'s values; PyTorch's BatchNorm momentum 0.1)."""
    config = identity["config"]
    if config.get("bn_momentum") == 0.1:
        config = {k: v for k, v in config.items() if k != "bn_momentum"}
    if all(config.get(k) == v for k, v in LEGACY_VALIDATION.items()):
        config = {k: v for k, v in config.items() if k not in LEGACY_VALIDATION}
    return {**identity, "config": config}


def _resolve_init(job: FinetuneJob, events: Events) -> _Start:
    """The bundle ``--init`` names, if any: an encoder to start from, or a segmentation model to continue."""
    if job.init is None:
        return _Start(job.config.encoder)
    from separeg.runtime.bundle import load_bundle
    from separeg.runtime.model_store import resolve_model

    bundle = load_bundle(resolve_model(job.init))
    if "members" in bundle.architecture:  # an average of networks has no decoder to supervise: its first one goes on
        from separeg.segment.ensemble import member_bundle

        events.warning(f"{job.init} is an ensemble of {len(bundle.architecture['members'])} networks: fine-tuning "
                       "continues its first network, and the model it writes is that one network",
                       stage="finetune")
        bundle = member_bundle(bundle, 0)
    if bundle.kind == "segmentation":  # "Update model": continue from a fine-tuned model (same organs, grid)
        encoder = bundle.architecture["backbone"]
    elif bundle.kind == "encoder":
        encoder = bundle.architecture["encoder"]
    else:
        raise InputError(f"--init {job.init} is a {bundle.kind} bundle; give an encoder from `separeg pretrain` "
                         "or a segmentation model to continue training")
    if encoder != job.config.encoder:
        events.log(f"using the bundle's architecture {encoder}", stage="finetune")
    return _Start(encoder, bundle)


def _resolve_label_table(job: FinetuneJob, start: _Start, events: Events):
    """The label table (``--labels``, ``labels.json`` beside the data, or a continued model's), the config (with a
    segmentation model's grid and 2.5D context) and the start (with the organ map when the model's organs differ:
    organs the two tables share keep their output weights, new organs get fresh ones)."""
    from separeg.rt.labels import LabelTable, load_label_table

    cfg = job.config
    labels_path = job.labels or Path(job.data) / "labels.json"
    model = start.model
    if model is not None and job.labels is None and not Path(labels_path).exists():
        table = LabelTable.from_dict(model.metadata["labels"], source=str(job.init))
    elif not Path(labels_path).exists():
        raise InputError(f"no label table: give --labels (a labels.json or CSV); {labels_path} does not exist")
    else:
        table = load_label_table(labels_path)
    if model is not None:
        model_table = LabelTable.from_dict(model.metadata["labels"], source=str(job.init))
        if _organ_keys(table) != _organ_keys(model_table):
            start = replace(start, organ_map=_transfer_map(table, model_table, job.init, events))
        # The network body learned its features on the model's grid and context: both come along.
        inputs = GridSpec.from_dict(model.metadata["inputs"])
        cfg = replace(cfg, spacing_xy=tuple(inputs.spacing_xy), hu_window=tuple(inputs.hu_window),
                      context_slices=inputs.context_slices)
    return table, cfg, start


def _organ_keys(table) -> list[tuple[int, str]]:
    return [(lb.value, lb.tg263 or lb.name) for lb in table]


def _transfer_map(table, model_table, source, events: Events) -> tuple[int | None, ...]:
    """Per output channel of a network for ``table``: the channel of ``model_table`` that holds the same organ (by
    TG-263 name, else name; background is channel 0), or None for an organ the model never learned."""
    known = {key: value for value, key in _organ_keys(model_table)}
    organ_map: list[int | None] = [0] + [None] * max(table.values)
    for value, key in _organ_keys(table):
        organ_map[value] = known.get(key)
    shared = [key for _, key in _organ_keys(table) if key in known]
    new = [key for _, key in _organ_keys(table) if key not in known]
    dropped = [key for key in known if key not in shared]
    if not shared:
        events.warning(f"{source} contours none of these organs: only its network body comes along (the output "
                       "layer starts fresh)", stage="finetune")
    events.log(f"starting from the segmentation model {source} with another label table: "
               f"{', '.join(shared) or 'no organ'} keep{'s' if len(shared) == 1 else ''} its output weights"
               + (f"; new: {', '.join(new)}" if new else "") + (f"; not trained on: {', '.join(dropped)}" if dropped
                                                                else ""), stage="finetune")
    return tuple(organ_map)


def _build_network(start: _Start, spec: GridSpec, n_classes: int, cfg: FinetuneConfig,
                   runtime: Runtime) -> torch.nn.Module:
    unet = _initial_network(start, spec, n_classes, cfg, runtime)
    for module in unet.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.momentum = cfg.bn_momentum
    return unet


def _initial_network(start: _Start, spec: GridSpec, n_classes: int, cfg: FinetuneConfig,
                     runtime: Runtime) -> torch.nn.Module:
    torch.manual_seed(cfg.seed)
    if start.model is not None and start.organ_map is None:  # continue a fine-tuned model: network, grid, organs
        return load_segmentation_model(start.model, runtime.device).train()
    if start.model is not None:  # another label table: the model's body, and its output weights per shared organ
        unet = build_unet(start.encoder, n_classes, spec.network_channels)
        transfer_segmentation_weights(unet, start.model.state_dict, start.organ_map)
        return unet.to(runtime.device)
    unet = build_unet(start.encoder, n_classes, spec.network_channels).to(runtime.device)
    if start.bundle is not None:
        load_encoder_weights(unet, _widen_input(start.bundle.state_dict, unet_encoder(unet).state_dict(), spec))
    return unet


def _widen_input(state: dict[str, torch.Tensor], target: dict[str, torch.Tensor],
                 spec: GridSpec) -> dict[str, torch.Tensor]:
    """A pretrained encoder's weights for 2.5D input: each input convolution's kernel for channel ``c`` moves to the
    centre slice of ``c``'s neighbours, the other slices start at 0, so the network starts by computing exactly the
    pretrained features and learns what the neighbours add."""
    k = spec.context_slices
    if k == 0:
        return state
    widened = dict(state)
    for key, weight in state.items():
        wanted = target.get(key)
        if wanted is None or weight.dim() != 4 or wanted.shape[1] != weight.shape[1] * (2 * k + 1):
            continue
        new = weight.new_zeros(wanted.shape)
        for c in range(weight.shape[1]):
            new[:, c * (2 * k + 1) + k] = weight[:, c]
        widened[key] = new
    return widened


def _train(objective, train: SliceSet, val: SliceSet | None, spec: GridSpec, cfg: FinetuneConfig, job: FinetuneJob,
           runtime: Runtime, events: Events, swap: list[int]) -> EpochValidator:
    """The training loop: batches of augmented patches, warm-up + decay, validation at each epoch's end. ``swap``:
    each output channel's left-right partner (for mirroring)."""
    out = Path(job.out_dir)
    encoder_ids = {id(p) for p in unet_encoder(objective.unet).parameters()}
    parameters = objective.trainable_parameters()
    groups = [{"params": [p for p in parameters if id(p) in encoder_ids], "lr_scale": cfg.encoder_lr_scale},
              {"params": [p for p in parameters if id(p) not in encoder_ids], "lr_scale": 1.0}]
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = cfg.steps_per_epoch or max(1, math.ceil(max(len(train.foreground), 1) / cfg.batch_size))
    total = cfg.epochs * steps_per_epoch
    warmup = min(cfg.warmup_steps, total // 10)
    patch = spec.multiple * max(1, round(cfg.patch_mm / min(spec.spacing_xy) / spec.multiple))
    validated = val if val is not None else train
    rows, every = _validation_plan(validated, cfg, steps_per_epoch, patch, events)
    validator = EpochValidator(objective.deployable, validated, on_training_data=val is None,
                               steps_per_epoch=steps_per_epoch, total=total, patience=cfg.patience,
                               best_path=out / "checkpoints" / "best.pt", runtime=runtime, events=events,
                               every=every, rows=rows)

    def step_loss(step: int) -> torch.Tensor:
        rng = np.random.default_rng(step_seed(cfg.seed, "finetune", step))
        x, y, annotated = sample_patches(train, cfg.batch_size, patch, cfg.foreground_fraction, rng)
        if cfg.mirror_augmentation:
            x, y, annotated = mirror_batch(x, y, annotated, swap, rng)
        generator = torch.Generator(device=runtime.device).manual_seed(step_seed(cfg.seed, "augment", step))
        x, y = augment_batch(x, y, generator, cfg.augmentation)
        return objective(x, y, annotated, progress=step / total, rng=rng, generator=generator)

    def restore(saved: dict) -> None:
        validator.history.update(json.loads(saved["history"]))

    with StopRequest(job.stop_file) as stop:
        train_steps(stage="finetune", model=objective, optimizer=optimizer, total=total, base_lr=cfg.lr,
                    step_loss=step_loss, after_step=objective.after_step,
                    checkpoint=out / "checkpoints" / "finetune.pt",
                    extra_state=lambda: {"history": json.dumps(validator.history)}, runtime=runtime, events=events,
                    stop=stop, checkpoint_seconds=job.checkpoint_minutes * 60, on_step=validator, restore=restore,
                    lr_at=lambda step: warmup_lr(cfg.lr, step, total, warmup=warmup, schedule=cfg.schedule))
    return validator


def _validation_plan(slices: SliceSet, cfg: FinetuneConfig, steps_per_epoch: int, patch: int,
                     events: Events) -> tuple[np.ndarray | None, int]:
    """Which slices the epoch-end validation predicts and every how many epochs (validation.py says why)."""
    rows = validation_rows(slices, cfg.validation_margin) if cfg.validation_margin >= 0 else None
    height, width = slices.images.shape[-2:]
    validated = len(rows) if rows is not None else len(slices)
    every = cfg.validate_every or validation_cadence(validated * height * width, steps_per_epoch, cfg.batch_size,
                                                     min(patch, height) * min(patch, width))
    events.log(f"validation every {every} epoch(s) on {validated} of {len(slices)} slices", stage="finetune")
    return rows, every


def _postprocessing(model: torch.nn.Module, slices: SliceSet, on_training_data: bool, table, cfg: FinetuneConfig,
                    runtime: Runtime, events: Events) -> dict:
    """Per organ, which post-processing steps contour applies: chosen on the validation cases by default."""
    values = list(table.values)
    if cfg.postprocessing == "none":
        return {"largest_component": [], "fill_holes": [], "chosen_on": "none"}
    if cfg.postprocessing == "all":
        return {"largest_component": values, "fill_holes": values, "chosen_on": "all"}
    chosen = choose_postprocessing(predict_slices(model, slices, runtime), slices, values)
    names = {lb.value: lb.tg263 or lb.name for lb in table}
    off = [names[v] for v in values if v not in chosen["largest_component"]]
    events.log("post-processing: largest connected component for "
               + (", ".join(names[v] for v in chosen["largest_component"]) or "no organ")
               + (f" (not for {', '.join(off)}: it lowered their DSC)" if off else ""), stage="finetune")
    return {**chosen, "chosen_on": "training" if on_training_data else "validation"}


def _organ_values(names: str, table) -> tuple[int, ...]:
    """Label values of comma-separated organ names, matched as the label table matches names (``by_name``: the
    label's name or TG-263 name, or a synonym).

    Raises:
        InputError: a name the label table does not hold.
    """
    found = {name: table.by_name(name) for name in (n.strip() for n in names.split(",")) if name}
    unknown = [name for name, label in found.items() if label is None]
    if unknown:
        raise InputError(f"--open-ended names {', '.join(unknown)}, which the label table does not hold; its organs: "
                         f"{', '.join(label.tg263 or label.name for label in table)}")
    return tuple(label.value for label in found.values())


def _mirroring(model: torch.nn.Module, slices: SliceSet, on_training_data: bool, plain: float, swap: list[int],
               runtime: Runtime, events: Events) -> dict:
    """Whether contour averages in the left-right mirrored prediction with laterality swapped
    (:mod:`separeg.segment.mirror`): chosen on the validation cases, kept when their mean DSC over organs does not
    drop below ``plain``, the best checkpoint's (mirroring assumes left-right symmetric anatomy; an asymmetric
    site's validation says no)."""
    ensemble = MirrorEnsemble(model, swap).to(runtime.device)
    mirrored = float(np.mean(list(validate(ensemble, slices, runtime).values()) or [0.0]))
    chosen = mirrored >= plain - 0.001
    events.log(f"test-time mirroring {'on' if chosen else 'off'}: mean DSC {100 * mirrored:.1f} % with it, "
               f"{100 * plain:.1f} % without", stage="finetune")
    return {"chosen": chosen, "dsc": {"plain": plain, "mirrored": mirrored},
            "chosen_on": "training" if on_training_data else "validation"}


def _write_bundle(out: Path, best: dict, start: _Start, spec: GridSpec, n_classes: int, table,
                  cfg: FinetuneConfig, identity: dict, objective, validator: EpochValidator, postprocessing: dict,
                  mirror: dict, train_cases: list, val_cases: list, events: Events) -> Path:
    from separeg import __version__
    from separeg.runtime.bundle import save_bundle
    from separeg.segment.body_site import body_area_statistics, organ_volume_statistics
    from separeg.segment.learned_organs import annotated_cases_per_organ

    history = validator.history
    what = validator.what
    # One rule with Slicer's model install: a model under the floor is kept, marked unusable, and warned about.
    unusable = useless_model_reason({"mean_dsc": history["best"], "on_training_data": validator.on_training_data})
    path = save_bundle(
        out / "model.separeg", kind="segmentation",
        architecture=unet_architecture(start.encoder, spec.network_channels, n_classes),
        state_dict=best["model"],
        metadata={"inputs": {**spec.to_dict(), "orientation": "LPS"},
                  "labels": table.to_dict(),
                  "training": {"init_encoder_sha256": identity["init"], "training_cases": len(train_cases),
                               "validation_cases": len(val_cases), "epochs_run": len(history["epochs"]),
                               "best_epoch": history["best_epoch"], "config": identity["config"],
                               "partial_labels": objective.mode, "mean_teacher": cfg.mean_teacher,
                               "separeg": __version__,
                               # contour leaves out organs no training case annotates (learned_organs, issue 30)
                               "annotated_cases_per_organ": annotated_cases_per_organ(
                                   [c.annotated for c in train_cases], table.values)},
                  "validation": {"mean_dsc": history["best"], "per_organ_dsc": validator.best_scores,
                                 "on_training_data": validator.on_training_data},
                  "usable": unusable is None, "unusable_reason": unusable,
                  "postprocessing": postprocessing,
                  "test_time_mirroring": mirror,
                  "data": {**_data_statistics(train_cases),  # organ volumes: contour's body-site check
                           "organ_volume_cc": organ_volume_statistics(train_cases, table.values),
                           "body_area_cm2": body_area_statistics(train_cases)}})
    write_json(history, out / "history.json")
    best_dsc = history["best"] or 0.0
    if unusable is not None:
        events.warning(unusable, stage="finetune")
    events.done(f"model written to {path} (best {what} mean DSC {100 * best_dsc:.1f} % at epoch "
                f"{history['best_epoch']})" + ("; NOT USABLE: do not install or contour with it" if unusable else ""))
    return path


def _input_channels(cfg: FinetuneConfig, init, source) -> tuple:
    """The input channels: ``--channels``, else those of the model or encoder started from, else one CT channel.

    Raises:
        InputError: ``--channels`` names another number of channels than the initial bundle takes.
    """
    from separeg.io.channels import channels_from_metadata

    if init is None:
        return parse_channels(cfg.channels, cfg.hu_window)
    inputs = init.metadata.get("inputs") or {}
    from_bundle = channels_from_metadata({"hu_window": cfg.hu_window, **inputs}) if inputs.get("channels") else \
        parse_channels(None, cfg.hu_window)
    # Volumes per case: a 2.5D model's network channels are each volume at 2k + 1 slices.
    taken = int(init.architecture.get("in_channels", 1)) // (2 * int(inputs.get("context_slices", 0)) + 1)
    if cfg.channels is None:
        if len(from_bundle) != taken:  # an encoder that records only its channel count
            from_bundle = tuple(parse_channels(",".join(f"channel{i + 1}" for i in range(taken))))
        return from_bundle
    channels = parse_channels(cfg.channels, cfg.hu_window)
    if len(channels) != taken:
        raise InputError(f"--channels names {len(channels)} channel(s) ({cfg.channels}) but {source} takes {taken} "
                         f"({', '.join(c.name for c in from_bundle)}); start from a bundle trained on the same inputs")
    return channels


def _objective(unet: torch.nn.Module, cfg: FinetuneConfig, job: FinetuneJob, table, train_cases: list,
               spec: GridSpec, runtime: Runtime, events: Events):
    """The loss for these cases' annotations, with Mean Teacher on the unlabelled scans when asked for."""
    from separeg.segment.finetune.mean_teacher import MeanTeacher, UnlabelledSlices
    from separeg.segment.finetune.objective import Objective, choose_partial_label_mode

    mode = choose_partial_label_mode(cfg.partial_labels, [c.annotated for c in train_cases],
                                     [c.name for c in train_cases], {lb.value: lb.name for lb in table}, events)
    teacher = None
    if cfg.mean_teacher:
        unlabelled = UnlabelledSlices.from_archive(job.unlabelled, spec, max_slices=cfg.unlabelled_slices,
                                                   device=runtime.device, events=events)
        events.log(f"Mean Teacher: {len(unlabelled)} unlabelled slice(s) from {len(unlabelled.names)} volume(s), "
                   f"EMA decay {cfg.ema_decay}, consistency {cfg.consistency}", stage="finetune")
        teacher = MeanTeacher(unet, unlabelled, decay=cfg.ema_decay, consistency=cfg.consistency,
                              rampup=cfg.consistency_rampup)
    return Objective(unet, mode, max(table.values) + 1, hardness=cfg.hardness, psd_weight=cfg.psd_weight,
                     cocl_weight=cfg.cocl_weight, cocl_source=cfg.cocl_source,
                     deep_supervision=cfg.deep_supervision, mean_teacher=teacher).to(runtime.device)


def _data_statistics(cases: list) -> dict:
    """What the model was trained on, to warn about inputs far from it (no identifiers, no pixels)."""
    import SimpleITK as sitk

    spacing = np.array([c.image.GetSpacing() for c in cases])
    extent = np.array([np.array(c.image.GetSize()) * np.array(c.image.GetSpacing()) for c in cases])
    hu = [sitk.GetArrayViewFromImage(c.image) for c in cases]
    return {"modality": "CT", "spacing_min": spacing.min(0).tolist(), "spacing_max": spacing.max(0).tolist(),
            "extent_mm_min": extent.min(0).tolist(), "extent_mm_max": extent.max(0).tolist(),
            "hu_p01": float(np.mean([np.percentile(h, 1) for h in hu])),
            "hu_p99": float(np.mean([np.percentile(h, 99) for h in hu]))}


def _check_run(out: Path, identity: dict, job: FinetuneJob, runtime: Runtime) -> None:
    from separeg.pretrain.rundir import check_identity

    check_identity(out, identity, restart=job.restart, resume=job.resume,
                   has_progress=(out / "checkpoints" / "finetune.pt").exists(), runtime=runtime,
                   state=[out / "checkpoints", out / "model.separeg", out / "history.json"])
