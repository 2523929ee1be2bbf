"""`separeg finetune`: a U-Net from a pretrained encoder, trained on a few annotated CTs (DESIGN §2.9).

2D on axial slices as in the paper; Dice + CE, or PL-Seg's losses when cases annotate different organs (an organ
a case does not annotate is unknown there; :mod:`separeg.finetune_objective`); optionally Mean Teacher on
unlabelled scans (``--mean-teacher --unlabelled ARCHIVE``); class-balanced foreground sampling of square
patches (an organ is drawn uniformly, then one of its pixels is the patch's centre: organs of a few hundred
voxels are learnt as early as the mandible); light augmentation on the device (no left-right flips: they would
swap Parotid_L and Parotid_R); validation by patient after every epoch, the best checkpoint by mean DSC
kept, early stopping. Resumable like pretraining; writes ``OUT/model.separeg``.
"""

from __future__ import annotations

import json
import math
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .atomic import write_json
from .channels import check_channel_count, parse_channels
from .errors import InputError
from .events import Events, FileSink
from .segmodel import (
    GridSpec,
    build_unet,
    load_encoder_weights,
    model_input,
    to_canonical,
    to_model_grid,
    unet_architecture,
)
from .training import Runtime, StopRequest, load_checkpoint, save_checkpoint, setup_runtime, step_seed, train_steps

__all__ = ["FinetuneConfig", "FinetuneJob", "run_finetune", "SliceSet"]


@dataclass(frozen=True)
class FinetuneConfig:
    """Training settings. Paper budget: 200 epochs; an epoch is one pass over the foreground slices."""

    encoder: str = "resnet50"
    epochs: int = 200
    steps_per_epoch: int | None = None
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 1e-4
    patience: int = 30
    foreground_fraction: float = 0.67
    patch_mm: float = 256.0  # square training patches of this side (full slices are used when smaller)
    validation_cases: int | None = None  # default: 20 % of the cases (at least 1 when there are 2 or more)
    spacing_xy: tuple[float, float] | None = None  # default: median in-plane spacing of the training cases
    hu_window: tuple[float, float] = (-1000.0, 1000.0)
    channels: str | None = None  # --channels, e.g. "T1,T2" (separeg.channels.parse_channels); None: one CT channel
    seed: int = 0
    partial_labels: str = "auto"  # auto | plseg | marginal | background (separeg.finetune_objective)
    hardness: bool = True  # PL-Seg: HADFL's hardness weights
    psd_weight: float = 0.1  # PL-Seg: progressive self-distillation weight at the end (0: off)
    cocl_weight: float = 0.1  # PL-Seg: classwise orthogonal contrastive loss weight (0: off)
    mean_teacher: bool = False  # needs FinetuneJob.unlabelled
    ema_decay: float = 0.99
    consistency: float = 0.1  # Mean Teacher consistency weight after the ramp-up
    consistency_rampup: float = 0.4  # fraction of training
    unlabelled_slices: int = 2048  # at most this many unlabelled slices held in memory

    def __post_init__(self) -> None:
        from .finetune_objective import PARTIAL_LABEL_MODES

        for name in ("epochs", "batch_size", "patience", "unlabelled_slices"):
            if getattr(self, name) < 1:
                raise InputError(f"{name.replace('_', '-')} must be at least 1")
        if not 0.0 <= self.foreground_fraction <= 1.0:
            raise InputError("foreground fraction must be in [0, 1]")
        if self.partial_labels not in PARTIAL_LABEL_MODES:
            raise InputError(f"partial-labels must be one of {', '.join(PARTIAL_LABEL_MODES)}")
        for name in ("psd_weight", "cocl_weight", "consistency"):
            if getattr(self, name) < 0:
                raise InputError(f"{name.replace('_', '-')} must not be negative")
        if not 0.0 <= self.ema_decay < 1.0:
            raise InputError("ema-decay must be in [0, 1)")


@dataclass(frozen=True)
class FinetuneJob:
    data: Path  # a folder of <case>_ct / <case>_oar files, or a JSON/CSV case list
    out_dir: Path
    labels: Path | None = None  # label table; default: labels.json beside the data
    init: Path | str | None = None  # encoder bundle (path or model name, e.g. a shipped one); random init without it
    unlabelled: Path | None = None  # unlabelled scans for Mean Teacher (an archive folder)
    validation_data: Path | None = None  # fixed validation cases (folder or case list); default: drawn from data
    synonyms: Path | None = None  # ROI name -> TG-263 table for DICOM RTSTRUCT cases (separeg.dicom_rt.load_synonyms)
    config: FinetuneConfig = field(default_factory=FinetuneConfig)
    device: str = "auto"
    restart: bool = False
    resume: bool = False
    stop_file: Path | None = None
    checkpoint_minutes: float = 10.0


class SliceSet:
    """Slices and label maps of a list of cases on the model grid, on one device.

    Attributes:
        images: ``(N, C, H, W)`` float (C input channels); labels: ``(N, H, W)`` int64; annotated: ``(N, K)`` bool
        per slice (its case's annotated organs, background always); case_of: ``(N,)`` case index per slice.
    """

    def __init__(self, cases: list, n_classes: int, spec: GridSpec, device: torch.device) -> None:
        import SimpleITK as sitk

        images, labels, annotated, case_of = [], [], [], []
        shape = None
        for i, case in enumerate(cases):
            check_channel_count(len(case.images), spec.input_channels, f"case {case.name}")
            canonical = [to_canonical(image) for image in case.images]
            lab = sitk.GetArrayFromImage(to_canonical(_label_image(case)))
            spacing = canonical[0].GetSpacing()[:2]
            x = model_input([sitk.GetArrayFromImage(c) for c in canonical], spacing, spec, device=device)
            y = to_model_grid(lab, spacing, spec, labels=True, device=device)[:, 0]
            if shape is not None and x.shape[-2:] != shape:
                x, y = _fit(x, shape), _fit(y[:, None].float(), shape)[:, 0].long()
            shape = tuple(x.shape[-2:])
            mask = torch.zeros(n_classes, dtype=torch.bool)
            mask[0] = True
            mask[sorted(case.annotated)] = True
            images.append(x)
            labels.append(y)
            annotated.append(mask.expand(len(x), -1))
            case_of.append(torch.full((len(x),), i))
        self.images = torch.cat(images)
        self.labels = torch.cat(labels)
        self.annotated = torch.cat(annotated).to(device)
        self.case_of = torch.cat(case_of).numpy()
        self.foreground = np.flatnonzero((self.labels > 0).flatten(1).any(1).cpu().numpy())
        # (slice, y, x) of every voxel of each organ, for class-balanced patch centres.
        labels_cpu = self.labels.cpu()
        self.organ_voxels = {int(v): torch.nonzero(labels_cpu == v).numpy()
                             for v in torch.unique(labels_cpu).tolist() if v > 0}
        self.names = [c.name for c in cases]

    def __len__(self) -> int:
        return len(self.labels)


def sample_patches(slices: SliceSet, batch: int, patch: int, foreground_fraction: float,
                   rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A training batch of ``patch x patch`` crops: ``(images, labels, annotated)``.

    A ``foreground_fraction`` of the batch is centred (with jitter of a quarter patch) on a voxel of an organ
    drawn uniformly among the organs present; the rest is centred anywhere.
    """
    _, _, height, width = slices.images.shape
    patch = min(patch, height, width)
    organs = sorted(slices.organ_voxels)
    n_fg = int(round(batch * foreground_fraction)) if organs else 0
    centres = []
    for i in range(batch):
        if i < n_fg:
            voxels = slices.organ_voxels[organs[rng.integers(len(organs))]]
            k, y, x = voxels[rng.integers(len(voxels))]
            y, x = y + rng.integers(-patch // 4, patch // 4 + 1), x + rng.integers(-patch // 4, patch // 4 + 1)
        else:
            k, y, x = rng.integers(len(slices)), rng.integers(height), rng.integers(width)
        y0 = int(np.clip(y - patch // 2, 0, height - patch))
        x0 = int(np.clip(x - patch // 2, 0, width - patch))
        centres.append((int(k), y0, x0))
    index = torch.as_tensor([c[0] for c in centres], device=slices.images.device)
    images = torch.stack([slices.images[k, :, y0:y0 + patch, x0:x0 + patch] for k, y0, x0 in centres])
    labels = torch.stack([slices.labels[k, y0:y0 + patch, x0:x0 + patch] for k, y0, x0 in centres])
    return images, labels, slices.annotated[index]


def _label_image(case):
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(case.labels.astype(np.uint8))
    image.CopyInformation(case.image)
    return image


def _fit(x: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """Zero-pad or crop ``(N, C, H, W)`` at the bottom/right to ``shape`` (cases of different extents)."""
    h, w = shape
    x = x[..., :h, :w]
    return F.pad(x, (0, w - x.shape[-1], 0, h - x.shape[-2]))


def augment_pairs(x: torch.Tensor, y: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Light joint augmentation: rotation ±10°, scale 0.9-1.1, brightness/contrast ±10 %. No flips."""
    batch = len(x)
    u = torch.rand(batch, 4, generator=generator, device=generator.device).to(x.device)
    angle = (u[:, 0] - 0.5) * math.radians(20)
    scale = 0.9 + 0.2 * u[:, 1]
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    zero = torch.zeros_like(cos)
    theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    y = F.grid_sample(y[:, None].float(), grid, mode="nearest", padding_mode="zeros", align_corners=False)
    x = (x - 0.5) * (0.9 + 0.2 * u[:, 2, None, None, None]) + 0.5 + 0.1 * (u[:, 3, None, None, None] - 0.5)
    return x, y[:, 0].long()


@torch.no_grad()
def validate(model: torch.nn.Module, slices: SliceSet, runtime: Runtime, batch: int = 32) -> dict[str, float]:
    """Mean DSC per organ over the validation cases (3D per case, annotated organs only) on the model grid."""
    model.eval()
    predictions = []
    for start in range(0, len(slices), batch):
        with runtime.autocast:
            predictions.append(model(slices.images[start:start + batch]).argmax(1))
    model.train()
    prediction = torch.cat(predictions)
    scores: dict[int, list[float]] = {}
    for case in np.unique(slices.case_of):
        rows = torch.as_tensor(np.flatnonzero(slices.case_of == case), device=prediction.device)
        pred, ref = prediction[rows], slices.labels[rows]
        for organ in torch.nonzero(slices.annotated[rows[0]]).flatten().tolist()[1:]:
            p, r = pred == organ, ref == organ
            total = int(p.sum() + r.sum())
            if total:
                scores.setdefault(organ, []).append(2.0 * float((p & r).sum()) / total)
    return {str(k): float(np.mean(v)) for k, v in sorted(scores.items())}


def run_finetune(job: FinetuneJob, events: Events | None = None) -> Path:
    """Train a segmentation model; returns the path of ``model.separeg``. The run directory is locked while it runs
    (released at the end, so that one process may run many fine-tunes, as ``separeg experiment`` does).

    Raises:
        InputError: bad data (geometry mismatch, unknown labels), an encoder bundle of the wrong kind,
            or a configuration clash with an existing run.
        CancelledError: stopped; a checkpoint was saved.
    """
    with ExitStack() as cleanup:
        return _run_finetune(job, events, cleanup)


def _run_finetune(job: FinetuneJob, events: Events | None, cleanup: ExitStack) -> Path:
    from .bundle import load_bundle, save_bundle
    from .cases import load_case
    from .labels import LabelTable, load_label_table

    events = events or Events()
    if job.config.mean_teacher and job.unlabelled is None:
        raise InputError("--mean-teacher needs unlabelled scans: give --unlabelled ARCHIVE (a folder of CTs)")
    runtime = setup_runtime(job.device)
    out = Path(job.out_dir)
    cfg = job.config
    encoder_name, init_state, init_hash, init_model, init_bundle = cfg.encoder, None, None, None, None
    if job.init is not None:
        from .models import resolve_model

        bundle = init_bundle = load_bundle(resolve_model(job.init))
        if bundle.kind == "segmentation":  # "Update model": continue from a fine-tuned model (same organs, grid)
            init_model = bundle
            encoder_name = bundle.architecture["backbone"]
        elif bundle.kind == "encoder":
            encoder_name = bundle.architecture["encoder"]
        else:
            raise InputError(f"--init {job.init} is a {bundle.kind} bundle; give an encoder from `separeg pretrain` "
                             "or a segmentation model to continue training")
        init_state, init_hash = bundle.state_dict, bundle.weights_sha256
        if encoder_name != cfg.encoder:
            events.log(f"using the bundle's architecture {encoder_name}", stage="finetune")
    labels_path = job.labels or Path(job.data) / "labels.json"
    if init_model is not None and job.labels is None and not Path(labels_path).exists():
        table = LabelTable.from_dict(init_model.metadata["labels"], source=str(job.init))
    elif not Path(labels_path).exists():
        raise InputError(f"no label table: give --labels (a labels.json or CSV); {labels_path} does not exist")
    else:
        table = load_label_table(labels_path)
    if init_model is not None:
        model_table = LabelTable.from_dict(init_model.metadata["labels"], source=str(job.init))
        if [(lb.value, lb.tg263 or lb.name) for lb in table] != [(lb.value, lb.tg263 or lb.name) for lb in model_table]:
            raise InputError(f"the label table of {labels_path} differs from the model's "
                             f"({', '.join(model_table.names)}); continue a model only with cases labelled like its "
                             "training cases")
        cfg = replace(cfg, spacing_xy=tuple(init_model.metadata["inputs"]["spacing_xy"]),
                      hu_window=tuple(init_model.metadata["inputs"]["hu_window"]))
    channels = _input_channels(cfg, init_bundle, job.init)
    if len(channels) > 1 and cfg.mean_teacher:
        raise InputError("--mean-teacher reads single-volume CT archives; it is not available with several input "
                         "channels yet. Leave out --mean-teacher or train on one channel")
    synonyms = None
    if job.synonyms is not None:
        from .dicom_rt import load_synonyms

        synonyms = load_synonyms(job.synonyms)
    cases = [load_case(c, table, synonyms=synonyms) for c in _case_list(job.data, events)]
    if job.validation_data is not None:  # a fixed validation set (the experiment protocol)
        train_cases, val_cases = cases, [load_case(c, table, synonyms=synonyms)
                                         for c in _case_list(job.validation_data, events)]
        clash = {c.name for c in train_cases} & {c.name for c in val_cases}
        if clash:
            raise InputError(f"case(s) {', '.join(sorted(clash))} are both training and validation cases; "
                             "a validation case must be unseen in training")
    else:
        train_cases, val_cases = _split(cases, cfg)
    spacing = cfg.spacing_xy or tuple(float(np.median([c.image.GetSpacing()[a] for c in train_cases])) for a in (0, 1))
    spec = GridSpec(cfg.hu_window, spacing, channels=channels)
    for case in cases:
        for note in case.warnings:
            events.warning(note, stage="finetune")
    identity = {"data": str(Path(job.data).resolve()), "init": init_hash, "config": json.loads(json.dumps(asdict(cfg))),
                "cases": sorted(c.name for c in cases), "validation": sorted(c.name for c in val_cases),
                "synonyms": synonyms,
                "unlabelled": str(Path(job.unlabelled).resolve()) if cfg.mean_teacher else None}
    _check_run(out, identity, job, runtime)
    if runtime.is_main:
        from .runlock import release_run_lock

        cleanup.callback(release_run_lock, out)
    if runtime.is_main:
        events.add_sink(FileSink(out / "events.jsonl"))
    events.log(f"{len(train_cases)} training case(s), {len(val_cases)} validation case(s); encoder {encoder_name}"
               f"{' from ' + str(job.init) if job.init else ' (random init)'}; grid {spacing[0]:.3g} x "
               f"{spacing[1]:.3g} mm", stage="finetune")
    n_classes = max(table.values) + 1
    train = SliceSet(train_cases, n_classes, spec, runtime.device)
    val = SliceSet(val_cases, n_classes, spec, runtime.device) if val_cases else None
    torch.manual_seed(cfg.seed)
    unet = build_unet(encoder_name, n_classes, len(spec.input_channels)).to(runtime.device)
    if init_model is not None:
        unet.load_state_dict({k: v.to(runtime.device) for k, v in init_state.items()})
    elif init_state is not None:
        load_encoder_weights(unet, init_state)
    objective = _objective(unet, cfg, job, table, train_cases, spec, runtime, events)
    model = objective.deployable
    optimizer = torch.optim.AdamW(objective.trainable_parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = cfg.steps_per_epoch or max(1, math.ceil(max(len(train.foreground), 1) / cfg.batch_size))
    total = cfg.epochs * steps_per_epoch
    history: dict = {"epochs": [], "best": None, "best_epoch": None, "stale": 0}
    best_path = out / "checkpoints" / "best.pt"

    patch = spec.multiple * max(1, round(cfg.patch_mm / min(spacing) / spec.multiple))

    def step_loss(step: int) -> torch.Tensor:
        rng = np.random.default_rng(step_seed(cfg.seed, "finetune", step))
        x, y, annotated = sample_patches(train, cfg.batch_size, patch, cfg.foreground_fraction, rng)
        generator = torch.Generator(device=runtime.device).manual_seed(step_seed(cfg.seed, "augment", step))
        x, y = augment_pairs(x, y, generator)
        return objective(x, y, annotated, progress=step / total, rng=rng, generator=generator)

    def on_step(step: int) -> bool:
        if step % steps_per_epoch and step != total:
            return False
        epoch = math.ceil(step / steps_per_epoch)
        scores = validate(model, val if val is not None else train, runtime)
        mean = float(np.mean(list(scores.values()))) if scores else 0.0
        history["epochs"].append({"epoch": epoch, "mean_dsc": mean, "dsc": scores})
        if history["best"] is None or mean > history["best"]:
            history.update(best=mean, best_epoch=epoch, stale=0)
            if runtime.is_main:
                save_checkpoint(best_path, {"model": model.state_dict(), "epoch": epoch, "mean_dsc": mean})
        else:
            history["stale"] += 1
        events.log(f"epoch {epoch}: {'validation' if val is not None else 'training'} mean DSC {100 * mean:.1f} % "
                   f"(best {100 * history['best']:.1f} % at epoch {history['best_epoch']})", stage="finetune")
        if history["stale"] >= cfg.patience:
            events.log(f"early stop: no improvement for {cfg.patience} epochs", stage="finetune")
            return True
        return False

    def restore(saved: dict) -> None:
        history.update(json.loads(saved["history"]))

    with StopRequest(job.stop_file) as stop:
        train_steps(stage="finetune", model=objective, optimizer=optimizer, total=total, base_lr=cfg.lr,
                    step_loss=step_loss, after_step=objective.after_step,
                    checkpoint=out / "checkpoints" / "finetune.pt",
                    extra_state=lambda: {"history": json.dumps(history)}, runtime=runtime, events=events, stop=stop,
                    checkpoint_seconds=job.checkpoint_minutes * 60, on_step=on_step, restore=restore)
    if not runtime.is_main:
        return out / "model.separeg"
    best = load_checkpoint(best_path)
    stats = _data_statistics(train_cases)
    from . import __version__

    path = save_bundle(
        out / "model.separeg", kind="segmentation",
        architecture=unet_architecture(encoder_name, len(spec.input_channels), n_classes),
        state_dict=best["model"],
        metadata={"inputs": {**spec.to_dict(), "orientation": "LPS"},
                  "labels": table.to_dict(),
                  "training": {"init_encoder_sha256": init_hash, "training_cases": len(train_cases),
                               "validation_cases": len(val_cases), "epochs_run": len(history["epochs"]),
                               "best_epoch": history["best_epoch"], "config": identity["config"],
                               "partial_labels": objective.mode, "mean_teacher": cfg.mean_teacher,
                               "separeg": __version__},
                  "validation": {"mean_dsc": history["best"], "per_organ_dsc": history["epochs"][
                      history["best_epoch"] - 1]["dsc"] if history["epochs"] else {}},
                  "data": stats})
    write_json(history, out / "history.json")
    events.done(f"model written to {path} (best {'validation' if val else 'training'} mean DSC "
                f"{100 * (history['best'] or 0):.1f} % at epoch {history['best_epoch']})")
    return path


def _input_channels(cfg: FinetuneConfig, init, source) -> tuple:
    """The input channels: ``--channels``, else those of the model or encoder started from, else one CT channel.

    Raises:
        InputError: ``--channels`` names another number of channels than the initial bundle takes.
    """
    from .channels import channels_from_metadata

    if init is None:
        return parse_channels(cfg.channels, cfg.hu_window)
    inputs = init.metadata.get("inputs") or {}
    from_bundle = channels_from_metadata({"hu_window": cfg.hu_window, **inputs}) if inputs.get("channels") else \
        parse_channels(None, cfg.hu_window)
    taken = int(init.architecture.get("in_channels", 1))
    if cfg.channels is None:
        if len(from_bundle) != taken:  # an encoder that records only its channel count
            from_bundle = tuple(parse_channels(",".join(f"channel{i + 1}" for i in range(taken))))
        return from_bundle
    channels = parse_channels(cfg.channels, cfg.hu_window)
    if len(channels) != taken:
        raise InputError(f"--channels names {len(channels)} channel(s) ({cfg.channels}) but {source} takes {taken} "
                         f"({', '.join(c.name for c in from_bundle)}); start from a bundle trained on the same inputs")
    return channels


def _case_list(data: Path, events: Events) -> list:
    from .cases import find_cases, read_case_list

    if Path(data).is_file():
        return read_case_list(data)
    case_list, unpaired = find_cases(data)
    if unpaired:
        events.warning(f"{len(unpaired)} volume(s) without a partner are not used: "
                       + ", ".join(p.name for p in unpaired[:5]), stage="finetune")
    return case_list


def _split(cases: list, cfg: FinetuneConfig) -> tuple[list, list]:
    """Training and validation cases: ``cfg.validation_cases`` (default 20 %) drawn with ``cfg.seed``."""
    n_val = cfg.validation_cases if cfg.validation_cases is not None else (max(1, round(0.2 * len(cases)))
                                                                            if len(cases) >= 2 else 0)
    if n_val >= len(cases):
        raise InputError(f"{len(cases)} case(s) cannot give {n_val} validation case(s) and a training case")
    order = np.random.default_rng(cfg.seed).permutation(len(cases))
    return [cases[i] for i in order[n_val:]], [cases[i] for i in order[:n_val]]


def _objective(unet: torch.nn.Module, cfg: FinetuneConfig, job: FinetuneJob, table, train_cases: list,
               spec: GridSpec, runtime: Runtime, events: Events):
    """The loss for these cases' annotations, with Mean Teacher on the unlabelled scans when asked for."""
    from .finetune_objective import Objective, choose_partial_label_mode
    from .mean_teacher import MeanTeacher, UnlabelledSlices

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
                     cocl_weight=cfg.cocl_weight, mean_teacher=teacher).to(runtime.device)


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
    from .rundir import check_identity

    check_identity(out, identity, restart=job.restart, resume=job.resume,
                   has_progress=(out / "checkpoints" / "finetune.pt").exists(), runtime=runtime,
                   state=[out / "checkpoints", out / "model.separeg", out / "history.json"])
