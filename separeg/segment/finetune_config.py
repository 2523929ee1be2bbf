"""What a fine-tuning run is given: :class:`FinetuneConfig` (training settings, recorded in the bundle) and
:class:`FinetuneJob` (data, output and how to run).

The nnU-Net-grade parts are switches: 2.5D input (``context_slices``), nnU-Net's augmentation set without
mirroring (``augmentation="nnunet"``, :mod:`separeg.segment.augment`), deep supervision, linear warm-up then poly decay,
and per-organ post-processing kept only where it helps on the validation cases (``postprocessing="validation"``);
class-balanced foreground oversampling and the budget chosen on the validation curve (early stopping under an
epoch cap) are always on. The defaults are what measured best with one labelled case and a few hundred steps,
the product's few-label regime (Testing/results/recipe_cpu): the earlier recipe. ``NNUNET_RECIPE`` turns every
part on, as the shipped hn-oar-7 v2 (36 training cases) was trained; ``OLD_RECIPE`` spells out the defaults.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from separeg.registry import PAPER_FINETUNE_EPOCHS, POSTPROCESSING_MODES, SCHEDULES
from separeg.runtime.errors import InputError

__all__ = ["FinetuneConfig", "FinetuneJob", "OLD_RECIPE", "NNUNET_RECIPE", "SCHEDULES", "POSTPROCESSING_MODES"]


# The recipe before issue 21 (for ablations and paired comparisons; the defaults but for PL-Seg's COCL source).
OLD_RECIPE = {"context_slices": 0, "augmentation": "light", "deep_supervision": False, "schedule": "cosine",
              "warmup_steps": 0, "cocl_source": "features", "postprocessing": "all"}
# Every nnU-Net-grade part on, as hn-oar-7 v2 was trained (the `new` arm of Testing/results/recipe_cpu).
NNUNET_RECIPE = {"context_slices": 1, "augmentation": "nnunet", "deep_supervision": True, "schedule": "poly",
                 "warmup_steps": 200, "postprocessing": "validation"}


@dataclass(frozen=True)
class FinetuneConfig:
    """Training settings. Paper budget: 200 epochs; an epoch is one pass over the foreground slices."""

    encoder: str = "resnet50"
    epochs: int = PAPER_FINETUNE_EPOCHS  # the cap; early stopping (patience) usually ends training before it
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
    channels: str | None = None  # --channels, e.g. "T1,T2" (separeg.io.channels.parse_channels); None: one CT channel
    seed: int = 0
    # Defaults are the settings measured best with one labelled case and a few hundred steps (the recipe before
    # issue 21; Testing/results/recipe_cpu): every nnU-Net-grade part lowered DSC there (all together -4.1 points,
    # 2D + light augmentation still -3.2). hn-oar-7 v2 (36 cases) uses 2.5D, nnunet, deep supervision, poly and
    # validation post-processing.
    context_slices: int = 0  # 2.5D: neighbouring slices on each side given as extra channels (0: 2D)
    augmentation: str = "light"  # nnunet | light | none (separeg.segment.augment)
    deep_supervision: bool = False  # supervise the coarser decoder scales too
    schedule: str = "cosine"  # poly | cosine, after a linear warm-up
    warmup_steps: int = 0  # at most a tenth of the run
    encoder_lr_scale: float = 1.0  # the encoder's learning rate relative to the decoder's
    postprocessing: str = "all"  # validation (per organ, kept where it helps) | all | none
    partial_labels: str = "auto"  # auto | plseg | marginal | background (separeg.segment.finetune_objective)
    hardness: bool = True  # PL-Seg: HADFL's hardness weights
    psd_weight: float = 0.1  # PL-Seg: progressive self-distillation weight at the end (0: off)
    cocl_weight: float = 0.1  # PL-Seg: classwise orthogonal contrastive loss weight (0: off)
    cocl_source: str = "probabilities"  # PL-Seg COCL on probability maps (the authors') or decoder features
    mean_teacher: bool = False  # needs FinetuneJob.unlabelled
    ema_decay: float = 0.99
    consistency: float = 0.1  # Mean Teacher consistency weight after the ramp-up
    consistency_rampup: float = 0.4  # fraction of training
    unlabelled_slices: int = 2048  # at most this many unlabelled slices held in memory

    def __post_init__(self) -> None:
        from separeg.segment.augment import AUGMENTATIONS
        from separeg.segment.finetune_objective import PARTIAL_LABEL_MODES
        from separeg.segment.plseg import COCL_SOURCES

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
        for name in ("psd_weight", "cocl_weight", "consistency", "context_slices", "warmup_steps",
                     "encoder_lr_scale"):
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
    synonyms: Path | None = None  # ROI name -> TG-263 table for DICOM RTSTRUCT cases (rt.rtstruct.load_synonyms)
    config: FinetuneConfig = field(default_factory=FinetuneConfig)
    device: str = "auto"
    restart: bool = False
    resume: bool = False
    stop_file: Path | None = None
    checkpoint_minutes: float = 10.0
