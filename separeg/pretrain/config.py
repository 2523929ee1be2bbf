"""Configuration of `separeg pretrain`: one frozen dataclass, paper defaults, saved as ``config.json``."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from separeg.io.channels import CHANNELS_HELP
from separeg.pretrain.augment import AugmentConfig
from separeg.pretrain.encoders import ENCODER_DIMS
from separeg.pretrain.ssl import METHODS
from separeg.registry import (
    DISTILL_KL,
    DISTILL_LOSSES,
    ENCODERS,
    INTRA_SPLITS,
    MODALITIES,
    PAPER_PRETRAIN_ITERATIONS,
    SSL_METHODS,
    STAGES,
)
from separeg.runtime.errors import InputError
from separeg.runtime.flags import RUN_FLAGS, flag, positive_int
from separeg.sis.regions import SISConfig

__all__ = ["STAGES", "PretrainConfig", "PretrainJob", "config_differences", "config_from_dict"]


@dataclass(frozen=True)
class PretrainConfig:
    """What defines a pretraining run (a changed value needs ``--restart``).

    Defaults follow the paper ("Implementation details"): SimSiam, ResNet-50, regions of 128 x 128,
    100k iterations of batch 32 in total, K = 5 organ groups, distillation temperature 0.1. Where the
    paper is silent we follow SimSiam (SGD, momentum 0.9, weight decay 1e-4, lr 0.05 x batch/256,
    cosine decay) and split the iterations 40 % inter-organ, 40 % intra-organ and 20 % distillation.

    Transfer fixes (issue 22; each a setting, the old behaviour one value away):
    ``init_from_inter`` starts the intra-organ teachers and the distillation student from the inter-organ model
    instead of from scratch (so the exported student is not the least-trained network); ``intra_split`` "equal"
    gives every non-empty organ group the same steps (small groups, the small organs IID exists for, got a handful
    in proportion to size); ``distill_kl`` "per-dimension" averages Eq. 4's KL over the D channels as well as the
    batch (as ``nn.KLDivLoss``'s mean does) so it is on the scale of Eq. 5's cosine term instead of ~D times it;
    ``warmup_fraction`` warms each stage's lr up linearly before the cosine decay; ``max_magnification`` bounds how
    much a region is enlarged to fill its crop (regions of 8-15 px were magnified 4-8x to 64 px, while fine-tuning
    sees organs at native scale; None: fill the crop, as the paper's 128 x 128 at ~1 mm).
    """

    method: str = field(default="simsiam", metadata=flag("Φ_CLR (%(default)s)", choices=SSL_METHODS))
    encoder: str = field(default="resnet50", metadata=flag(
        "resnet50 (paper; the default), resnet18 or resnet18-slim (CPU-only sites), swin", choices=ENCODERS))
    in_channels: int = 1
    sis: SISConfig = field(default_factory=SISConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    crop_size: int = field(default=128, metadata=flag("region crop side (%(default)s)", type=positive_int))
    iterations: int = field(default=PAPER_PRETRAIN_ITERATIONS, metadata=flag(
        "iterations over all stages (%(default)s, the paper's budget)", type=positive_int))
    batch_size: int = field(default=32, metadata=flag("regions per step (%(default)s)", type=positive_int))
    lr: float | None = field(default=None, metadata=flag("peak learning rate (default 0.05 x batch / 256)", type=float))
    weight_decay: float = 1e-4
    temperature: float | None = None  # None: the method's (0.1; MoCo v3 0.2)
    ema: float = 0.996
    clusters: int = field(default=5, metadata=flag("organ groups K (%(default)s)", type=positive_int))
    iid: bool = field(default=True, metadata=flag("stop after the inter stage (the 'SIS only' ablation)", negate=True))
    distill_loss: str = field(default="both", metadata=flag(
        "L_intra + L_inter (both, the default) or L_intra only (ablation)", choices=DISTILL_LOSSES))
    distill_tau: float = 0.1
    distill_kl: str = field(default="per-dimension", metadata=flag(
        "Eq. 4's KL averaged over channels and batch (per-dimension, the default; on Eq. 5's scale) or summed over "
        "channels (batchmean, before issue 22)", choices=DISTILL_KL))
    init_from_inter: bool = field(default=True, metadata=flag(
        "intra-organ teachers and the distillation student start from scratch instead of from the inter-organ "
        "model (before issue 22)", name="--no-init-from-inter", negate=True))
    intra_split: str = field(default="equal", metadata=flag(
        "intra-organ steps per organ group: equal (the default) or in proportion to group size", choices=INTRA_SPLITS))
    warmup_fraction: float = field(default=0.05, metadata=flag(
        "linear lr warm-up over this fraction of each stage (%(default)s)", type=float))
    max_magnification: float | None = field(default=2.0, metadata=flag(
        "enlarge a region at most this many times to fill its crop (%(default)s; none: always fill it, the paper's "
        "resize)", type=lambda text: None if text.lower() == "none" else float(text), metavar="X"))
    stage_fractions: tuple[float, float, float] = (0.4, 0.4, 0.2)
    seed: int = field(default=0, metadata=flag("random seed (runs are deterministic per seed)"))
    modality: str = field(default="CT", metadata=flag("which images of the archive are used (%(default)s)",
                                                      choices=MODALITIES))
    channels: str | None = field(default=None, metadata=flag(  # None: one CT channel
        CHANNELS_HELP + "; the archive then holds <case>_0000, <case>_0001, ... files, one per channel"))
    sis_channel: int | None = field(default=None, metadata=flag(  # None: the first
        "the channel (0-based, --channels order) that structure-aware separation runs on (0)", type=int))

    def input_channels(self) -> tuple:
        from separeg.io.channels import parse_channels

        return parse_channels(self.channels, self.sis.hu_window)

    @property
    def normalised_inputs(self) -> bool:
        """Whether volumes go through per-channel normalisation (several channels, or one that is not a CT)."""
        return self.in_channels > 1 or self.input_channels()[0].normalisation != "window"

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise InputError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.encoder not in ENCODER_DIMS:
            raise InputError(f"unknown encoder {self.encoder!r}; choose one of {', '.join(ENCODER_DIMS)}")
        if self.distill_loss not in DISTILL_LOSSES:
            raise InputError(f"--distill-loss must be one of {', '.join(DISTILL_LOSSES)}")
        if self.distill_kl not in DISTILL_KL:
            raise InputError(f"distill-kl must be one of {', '.join(DISTILL_KL)}, got {self.distill_kl!r}")
        if self.intra_split not in INTRA_SPLITS:
            raise InputError(f"intra-split must be one of {', '.join(INTRA_SPLITS)}, got {self.intra_split!r}")
        if not 0.0 <= self.warmup_fraction < 1.0:
            raise InputError(f"warmup fraction must be in [0, 1), got {self.warmup_fraction}")
        if self.max_magnification is not None and self.max_magnification < 1.0:
            raise InputError(f"max magnification must be at least 1 (or None: regions fill the crop), got "
                             f"{self.max_magnification}")
        for name in ("iterations", "batch_size", "clusters", "crop_size", "in_channels"):
            if getattr(self, name) < 1:
                raise InputError(f"{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.temperature is None:  # resolved here, so a saved config names the value used
            object.__setattr__(self, "temperature", METHODS[self.method].temperature)
        if self.channels is not None:
            count = len(self.input_channels())
            if self.in_channels not in (1, count):
                raise InputError(f"in_channels {self.in_channels} contradicts --channels {self.channels!r}")
            object.__setattr__(self, "in_channels", count)
        if self.sis_channel is not None and not 0 <= self.sis_channel < self.in_channels:
            raise InputError(f"--sis-channel must be between 0 and {self.in_channels - 1} (channels are counted from 0 "
                             f"in --channels order), got {self.sis_channel}")
        if self.batch_size < 2:
            raise InputError("batch size must be at least 2 (BatchNorm and the contrastive losses need pairs)")
        if self.crop_size < 32:
            raise InputError(f"crop size must be at least 32 (the encoder downsamples 32x), got {self.crop_size}")
        if len(self.stage_fractions) != 3 or min(self.stage_fractions) < 0 or sum(self.stage_fractions) <= 0:
            raise InputError("stage fractions must be three non-negative numbers (inter, intra, distill)")
        object.__setattr__(self, "stage_fractions", tuple(float(f) for f in self.stage_fractions))
        if self.sis.mode == "dense" and (self.iid or self.method != "simsiam"):
            raise InputError("--separation dense is the paper's no-separation ablation of the inter-organ stage: "
                             "it runs with --method simsiam and --no-iid")

    @property
    def base_lr(self) -> float:
        return self.lr if self.lr is not None else 0.05 * self.batch_size / 256

    def inter_steps(self) -> int:
        if not self.iid:
            return self.iterations
        inter, intra, distill = self.stage_fractions
        return max(1, round(self.iterations * inter / (inter + intra + distill)))

    def intra_steps(self, cluster_sizes: list[int]) -> list[int]:
        """Steps per organ group: the same for every non-empty group (``intra_split`` "equal") or in proportion to
        its number of regions ("proportional"); at least 1 for a non-empty group, 0 for an empty one."""
        inter, intra, distill = self.stage_fractions
        total = self.iterations * intra / (inter + intra + distill)
        if self.intra_split == "equal":
            groups = max(sum(1 for size in cluster_sizes if size), 1)
            return [max(1, round(total / groups)) if size else 0 for size in cluster_sizes]
        n = max(sum(cluster_sizes), 1)
        return [max(1, round(total * size / n)) if size else 0 for size in cluster_sizes]

    def warmup_steps(self, total: int) -> int:
        """Linear lr warm-up steps of a stage of ``total`` steps."""
        return round(total * self.warmup_fraction)

    def min_crop_window(self) -> int:
        """Smallest square window (pixels) a region is cut from, so that it is magnified at most
        ``max_magnification`` times (0: every region fills its crop)."""
        return 0 if self.max_magnification is None else int(-(-self.crop_size // self.max_magnification))

    def distill_steps(self) -> int:
        inter, intra, distill = self.stage_fractions
        return max(1, round(self.iterations * distill / (inter + intra + distill)))


@dataclass(frozen=True)
class PretrainJob:
    """A run: the config plus where and how it runs (these may change between a run and its resumption)."""

    archive: Path = field(metadata=flag("folder with CT volumes and/or DICOM series", name="archive", exists=True))
    run_dir: Path = field(metadata=flag("run directory (resumed when it exists)", name="--out", type=Path,
                                        required=True))
    config: PretrainConfig = field(default_factory=PretrainConfig)
    device: str = field(default="auto", metadata=RUN_FLAGS["device"])
    resume: bool = field(default=False, metadata=RUN_FLAGS["resume"])
    restart: bool = field(default=False, metadata=RUN_FLAGS["restart"])
    stop_file: Path | None = field(default=None, metadata=RUN_FLAGS["stop_file"])
    checkpoint_minutes: float = field(default=10.0, metadata=RUN_FLAGS["checkpoint_minutes"])
    stages: tuple[str, ...] = field(default=STAGES, metadata=flag(
        f"comma-separated subset of {','.join(STAGES)}", group="running",
        type=lambda text: tuple(s.strip() for s in text.split(",") if s.strip())))
    workers: int | None = field(default=None, metadata=RUN_FLAGS["workers"])

    def __post_init__(self) -> None:
        unknown = [s for s in self.stages if s not in STAGES]
        if unknown:
            raise InputError(f"unknown stage(s) {', '.join(unknown)}; stages are {', '.join(STAGES)}")
        if self.restart and self.resume:
            raise InputError("--restart and --resume contradict each other; give one")


def config_from_dict(data: dict) -> PretrainConfig:
    values = dict(data)
    values["sis"] = SISConfig(**{**values["sis"], "hu_window": tuple(values["sis"]["hu_window"])})
    values["augment"] = AugmentConfig.from_dict(values["augment"])
    values["stage_fractions"] = tuple(values["stage_fractions"])
    known = {f.name for f in fields(PretrainConfig)}
    return PretrainConfig(**{k: v for k, v in values.items() if k in known})


def config_differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Human-readable differences between two config dicts, e.g. ``batch_size: 32 -> 64``."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out


def as_json_dict(config: PretrainConfig) -> dict:
    """The config as JSON types (tuples become lists), as it is saved and compared."""
    import json

    return json.loads(json.dumps(asdict(config)))
