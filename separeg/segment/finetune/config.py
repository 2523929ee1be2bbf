"""What a fine-tuning run is given: :class:`FinetuneConfig` (training settings, recorded in the bundle) and
:class:`FinetuneJob` (data, output and how to run).

The nnU-Net-grade parts are switches: 2.5D input (``context_slices``), nnU-Net's augmentation set without mirroring
(``augmentation="nnunet"``, :mod:`separeg.segment.finetune.augment`), deep supervision, linear warm-up then poly
decay, and per-organ post-processing kept only where it helps on the validation cases
(``postprocessing="validation"``); class-balanced foreground oversampling and the budget chosen on the validation
curve (early stopping under an epoch cap) are always on. Every part is on by default (``NNUNET_RECIPE``, as the
shipped hn-oar-7 v2 was trained): trained until the validation curve stops improving, it beat the earlier recipe
(``OLD_RECIPE``) with 36 training cases and matched or beat it with one (Testing/results/recipe_cpu). Capped at a few
hundred steps with one case, the earlier recipe was ahead: the nnU-Net parts converge more slowly. """

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from separeg.io.channels import CHANNELS_HELP
from separeg.registry import (
    AUGMENTATIONS,
    COCL_SOURCES,
    ENCODERS,
    PAPER_FINETUNE_EPOCHS,
    PARTIAL_LABEL_MODES,
    POSTPROCESSING_MODES,
    SCHEDULES,
)
from separeg.runtime.errors import InputError
from separeg.runtime.flags import RUN_FLAGS, flag, positive_int

__all__ = ["FinetuneConfig", "FinetuneJob", "OLD_RECIPE", "NNUNET_RECIPE", "LEGACY_VALIDATION", "SCHEDULES",
           "POSTPROCESSING_MODES"]


# The recipe before issue 21 (for ablations and paired comparisons; its COCL source is PL-Seg's before the fix).
OLD_RECIPE = {"context_slices": 0, "augmentation": "light", "deep_supervision": False, "schedule": "cosine",
              "warmup_steps": 0, "cocl_source": "features", "postprocessing": "all"}
# The validation and grid settings before issue 32 (every epoch, every slice, the cases' own spacing): runs started
# before these settings existed resume when given them, and hn-oar-7's recipe keeps them.
LEGACY_VALIDATION = {"finest_grid_mm": 0.0, "validate_every": 1, "validation_margin": -1}
# Every nnU-Net-grade part on, as hn-oar-7 v2 was trained (the `new` arm of Testing/results/recipe_cpu): the defaults.
NNUNET_RECIPE = {"context_slices": 1, "augmentation": "nnunet", "deep_supervision": True, "schedule": "poly",
                 "warmup_steps": 200, "postprocessing": "validation"}


@dataclass(frozen=True)
class FinetuneConfig:
    """Training settings. Paper budget: 200 epochs; an epoch is one pass over the foreground slices."""

    # A network that trains in minutes on a CPU workstation (resnet50 is the paper's; give it for a GPU).
    encoder: str = field(default="resnet18-slim", metadata=flag(
        "used without --init (with it, the bundle's encoder); %(default)s", choices=ENCODERS))
    # The cap; early stopping (patience) usually ends training before it.
    epochs: int = field(default=PAPER_FINETUNE_EPOCHS, metadata=flag("epochs (%(default)s, the paper's)",
                                                                     type=positive_int))
    steps_per_epoch: int | None = field(default=None, metadata=flag("default: foreground slices / batch size",
                                                                    type=positive_int))
    batch_size: int = field(default=16, metadata=flag("slices per step (%(default)s)", type=positive_int))
    lr: float = field(default=1e-3, metadata=flag("AdamW learning rate (%(default)s)"))
    weight_decay: float = 1e-4
    patience: int = field(default=30, metadata=flag("early stopping, in epochs (%(default)s)", type=positive_int))
    foreground_fraction: float = 0.67
    # Square training patches of this side (full slices are used when smaller).
    patch_mm: float = field(default=256.0, metadata=flag("side of the square training patches in mm (%(default)s)",
                                                         group="recipe"))
    # Default: 20 % of the cases (at least 1 when there are 2 or more).
    validation_cases: int | None = field(default=None, metadata=flag("cases held out (default 20 %%)", type=int))
    spacing_xy: tuple[float, float] | None = None  # default: median in-plane spacing of the training cases
    # A 0.98 mm clinical CT would otherwise train and validate on 512^2 slices: 16x the pixels of a 2 mm grid.
    finest_grid_mm: float = field(default=2.0, metadata=flag(
        "the model grid is the training cases' median in-plane spacing, but no finer than this (mm; 0 = no limit; "
        "%(default)s)", group="recipe"))
    validate_every: int = field(default=0, metadata=flag(
        "validate every N epochs (0 = as often as keeps validation cheaper than training; %(default)s)",
        group="recipe"))
    validation_margin: int = field(default=8, metadata=flag(
        "after each epoch, validate only the slices within the validation cases' organs and this many beyond "
        "(-1 = every slice; the final post-processing choice always sees every slice; %(default)s)",
        group="recipe"))
    hu_window: tuple[float, float] = (-1000.0, 1000.0)
    channels: str | None = field(default=None, metadata=flag(  # e.g. "T1,T2"; None: one CT channel
        CHANNELS_HELP + "; default: those of --init, else CT"))
    seed: int = field(default=0, metadata=flag("random seed (%(default)s)"))
    # Defaults: NNUNET_RECIPE, measured best once both recipes converge (Testing/results/recipe_cpu).
    context_slices: int = field(default=1, metadata=flag(
        "2.5D: neighbouring slices on each side as extra input channels (0 = 2D; %(default)s)", group="recipe"))
    augmentation: str = field(default="nnunet", metadata=flag(  # separeg.segment.finetune.augment
        "nnunet (nnU-Net's set without mirroring), light (the earlier recipe) or none (%(default)s)",
        choices=AUGMENTATIONS, group="recipe"))
    mirror_augmentation: bool = field(default=False, metadata=flag(  # separeg.segment.mirror
        "mirror half the training patches left-right, exchanging _R and _L organs (%(default)s)", optional=True,
        group="recipe"))
    deep_supervision: bool = field(default=True, metadata=flag(
        "also supervise the 3 coarser decoder scales (%(default)s)", optional=True, group="recipe"))
    schedule: str = field(default="poly", metadata=flag(  # after a linear warm-up
        "learning-rate decay after the warm-up (%(default)s)", choices=SCHEDULES, group="recipe"))
    warmup_steps: int = field(default=200, metadata=flag(
        "linear warm-up steps, at most a tenth of the run (%(default)s)", group="recipe"))
    # Running statistics are an exponential average over the last batches of augmented patches: at 0.1 a few odd
    # batches moved them far enough to collapse validation (Testing/results/pool_cpu, the 80-patient run).
    bn_momentum: float = field(default=0.1, metadata=flag(
        "BatchNorm running-statistics momentum (PyTorch's; smaller averages over more batches; %(default)s)",
        group="recipe"))
    encoder_lr_scale: float = field(default=1.0, metadata=flag(
        "encoder learning rate relative to the decoder's (%(default)s)", group="recipe"))
    postprocessing: str = field(default="validation", metadata=flag(
        "per-organ largest component and hole filling: chosen on the validation cases, for every organ (all), or "
        "none (%(default)s)", choices=POSTPROCESSING_MODES, group="recipe"))
    partial_labels: str = field(default="auto", metadata=flag(  # separeg.segment.finetune.objective
        "how to treat organs a case does not annotate: plseg (PL-Seg losses), marginal (marginal Dice + CE), "
        "background (naive: unlabelled voxels are background); auto: plseg when the training cases annotate "
        "different organs, else background", choices=PARTIAL_LABEL_MODES, group="partial"))
    open_ended: str = field(default="", metadata=flag(  # separeg.segment.finetune.data.SliceSet
        "organs whose contours may stop short of the organ's end, comma-separated (e.g. SpinalCord,Esophagus): on a "
        "case's slices beyond its contour they are unknown, not background (partial-label modes)", group="partial"))
    min_body_area: float = field(default=4000.0, metadata=flag(  # separeg.segment.finetune.data.SliceSet
        "CT slices whose voxels above -500 HU cover less than this many mm^2 are unknown for every organ in training "
        "and not scored in validation: OpenKBP stores CT only inside the contours outside the treated region "
        "(0 = off; %(default)s)", group="partial"))
    hardness: bool = field(default=True, metadata=flag("PL-Seg without HADFL's hardness weights", negate=True,
                                                       group="partial"))
    psd_weight: float = field(default=0.1, metadata=flag(
        "PL-Seg self-distillation weight, ramped up to it (0 = off; %(default)s)", group="partial"))
    cocl_weight: float = field(default=0.1, metadata=flag(
        "PL-Seg orthogonal contrastive loss weight (0 = off; %(default)s)", group="partial"))
    cocl_source: str = "probabilities"  # PL-Seg COCL on probability maps (the authors') or decoder features
    mean_teacher: bool = field(default=False, metadata=flag(  # needs FinetuneJob.unlabelled
        "add Mean Teacher consistency on unlabelled scans (needs --unlabelled)", group="partial"))
    ema_decay: float = field(default=0.99, metadata=flag("teacher EMA decay (%(default)s)", group="partial"))
    consistency: float = field(default=0.1, metadata=flag(  # Mean Teacher, after the ramp-up
        "consistency loss weight after ramp-up (%(default)s)", group="partial"))
    consistency_rampup: float = 0.4  # fraction of training
    unlabelled_slices: int = 2048  # at most this many unlabelled slices held in memory
    archive_weight: float = field(default=0.5, metadata=flag(  # separeg.segment.finetune.propagated
        "weight of the loss on the labels propagated onto the --archive CTs, relative to the labelled cases' "
        "(%(default)s)", group="partial"))
    archive_confidence: float = field(default=0.5, metadata=flag(  # separeg.atlas.archive: |2 vote - 1|, least organ
        "propagated voxels less confident than this (0-1: how far every organ's vote over the labelled cases is "
        "from 50/50) are unknown, not taught (%(default)s)", group="partial"))

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "patience", "unlabelled_slices"):
            if getattr(self, name) < 1:
                raise InputError(f"{name.replace('_', '-')} must be at least 1")
        if not 0.0 <= self.foreground_fraction <= 1.0:
            raise InputError("foreground fraction must be in [0, 1]")
        choices = {"partial_labels": PARTIAL_LABEL_MODES, "augmentation": AUGMENTATIONS, "schedule": SCHEDULES,
                   "postprocessing": POSTPROCESSING_MODES, "cocl_source": COCL_SOURCES}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise InputError(f"{name.replace('_', '-')} must be one of {', '.join(allowed)}")
        if self.validation_margin < -1:
            raise InputError("validation-margin must be -1 (every slice) or at least 0")
        for name in ("psd_weight", "cocl_weight", "consistency", "context_slices", "warmup_steps",
                     "encoder_lr_scale", "min_body_area", "finest_grid_mm", "validate_every"):
            if getattr(self, name) < 0:
                raise InputError(f"{name.replace('_', '-')} must not be negative")
        if not 0.0 < self.bn_momentum <= 1.0:
            raise InputError("bn-momentum must be in (0, 1]")
        if not 0.0 <= self.ema_decay < 1.0:
            raise InputError("ema-decay must be in [0, 1)")
        if self.archive_weight < 0 or not 0.0 <= self.archive_confidence <= 1.0:
            raise InputError("archive-weight must not be negative and archive-confidence must be in [0, 1]")


@dataclass(frozen=True)
class FinetuneJob:
    """A run: the data, the output folder and how it runs; the flags of ``separeg finetune`` but for the config's."""

    data: Path = field(metadata=flag(  # cases, and the case list's format: separeg.segment.cases
        "folder of <case>_ct + <case>_oar volumes, or a JSON/CSV case list", name="data", exists=True))
    out_dir: Path = field(metadata=flag("run directory (resumed when it exists)", name="--out", type=Path,
                                        required=True))
    labels: Path | None = field(default=None, metadata=flag(
        "label table (labels.json or CSV); default: labels.json beside the data", exists=True))
    init: Path | str | None = field(default=None, metadata=flag(  # a path or a model name; random init without it
        "encoder bundle from `separeg pretrain`, or the name of a shipped one (separeg-encoder-hn-ct; see `separeg "
        "models`); random init without it"))
    config: FinetuneConfig = field(default_factory=FinetuneConfig)
    synonyms: Path | None = field(default=None, metadata=flag(  # for DICOM RTSTRUCT cases (rt.rtstruct.load_synonyms)
        "your RTSTRUCT ROI names -> TG-263 names (JSON or two-column CSV), for DICOM cases", exists=True,
        metavar="TABLE", group="finetune"))
    validation_data: Path | None = field(default=None, metadata=flag(  # default: drawn from data
        "fixed validation cases (a folder or case list); then every case of DATA trains", name="--validation",
        exists=True, metavar="DATA", group="finetune"))
    unlabelled: Path | None = field(default=None, metadata=flag(  # for Mean Teacher
        "folder of unlabelled CTs (volumes or DICOM series) for --mean-teacher", exists=True, metavar="ARCHIVE",
        group="partial"))
    archive: Path | None = field(default=None, metadata=flag(  # separeg.segment.finetune.propagated
        "unlabelled CTs to propagate the labelled cases onto (by registration; cached in OUT/archive) and train on "
        "too", exists=True, metavar="FOLDER", group="partial"))
    archive_threads: int | None = field(default=None, metadata=flag(
        "SimpleITK threads for the --archive registrations (default: all cores)", type=positive_int, metavar="N",
        group="partial"))
    device: str = field(default="auto", metadata=RUN_FLAGS["device"])
    resume: bool = field(default=False, metadata=RUN_FLAGS["resume"])
    restart: bool = field(default=False, metadata=RUN_FLAGS["restart"])
    stop_file: Path | None = field(default=None, metadata=RUN_FLAGS["stop_file"])
    checkpoint_minutes: float = field(default=10.0, metadata=RUN_FLAGS["checkpoint_minutes"])
