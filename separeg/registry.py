"""The one table of names that the CLI, the configs and the Slicer modules choose from. Torch-free, so the
Slicer modules' logic reads it without importing the core's heavy parts.

Each name here has exactly one implementation in the core (checked by ``Testing/test_registry.py``):
stages in :mod:`separeg.pretrain.stages`, SSL methods in :data:`separeg.pretrain.ssl.METHODS`, encoders in
:data:`separeg.pretrain.encoders.ENCODERS`, separations in :mod:`separeg.sis.regions`, partial-label modes in
:mod:`separeg.segment.finetune.objective`. The paper's budgets are the defaults of the configs and the
reference of ``separeg experiment``'s ``budget`` factor.

May import: the standard library only.
"""

from __future__ import annotations

from types import MappingProxyType

__all__ = [
    "AUGMENTATIONS",
    "COCL_SOURCES",
    "DISTILL_KL",
    "DISTILL_LOSSES",
    "ENCODERS",
    "FUSIONS",
    "HOLE_CONVENTIONS",
    "INTRA_SPLITS",
    "MODALITIES",
    "PAPER_FINETUNE_EPOCHS",
    "PAPER_PRETRAIN_ITERATIONS",
    "PARTIAL_LABEL_MODES",
    "POSTPROCESSING_MODES",
    "SCHEDULES",
    "SEPARATIONS",
    "SEPARATION_EXTENTS",
    "SSL_METHODS",
    "STAGES",
    "STAGE_TITLES",
    "UNKNOWN_LABEL_POLICIES",
]

# Which images of an archive are used (DICOM Modality; any: every image volume).
MODALITIES: tuple[str, ...] = ("CT", "MR", "PT", "any")

# Pretraining (paper §3): separation -> inter-organ SSL -> organ groups -> intra-organ SSL -> distillation -> export.
STAGES: tuple[str, ...] = ("sis", "inter", "cluster", "intra", "distill", "export")
STAGE_TITLES = MappingProxyType({"sis": "Image separation", "inter": "Inter-organ SSL", "cluster": "Organ groups",
                                 "intra": "Intra-organ SSL", "distill": "Distillation", "export": "Export"})
SSL_METHODS: tuple[str, ...] = ("simsiam", "byol", "simclr", "mocov3")
ENCODERS: tuple[str, ...] = ("resnet50", "resnet18", "resnet18-slim", "swin")
DISTILL_LOSSES: tuple[str, ...] = ("both", "intra")
# Eq. 4's KL averaged over channels and batch (on Eq. 5's scale), or summed over channels (the exact KL per sample).
DISTILL_KL: tuple[str, ...] = ("per-dimension", "batchmean")
# Intra-organ steps per organ group: the same for every group, or in proportion to its size.
INTRA_SPLITS: tuple[str, ...] = ("equal", "proportional")
# Structure-aware image separation (paper §3.1) and its ablations; the extent SLIC runs over.
SEPARATIONS: tuple[str, ...] = ("sis", "regular", "image", "dense")
SEPARATION_EXTENTS: tuple[str, ...] = ("body", "slice")

# Fine-tuning.
PARTIAL_LABEL_MODES: tuple[str, ...] = ("auto", "plseg", "marginal", "background")
COCL_SOURCES: tuple[str, ...] = ("probabilities", "features")
AUGMENTATIONS: tuple[str, ...] = ("nnunet", "light", "none")
SCHEDULES: tuple[str, ...] = ("poly", "cosine")
POSTPROCESSING_MODES: tuple[str, ...] = ("validation", "all", "none")
# Multi-atlas label fusion of `separeg atlas`.
FUSIONS: tuple[str, ...] = ("vote", "staple")

# Export: RTSTRUCT holes as separate contours (even-odd) or joined by keyhole cuts.
HOLE_CONVENTIONS: tuple[str, ...] = ("separate", "keyhole")
# Evaluate: label values the label table does not list are refused or left out of every organ.
UNKNOWN_LABEL_POLICIES: tuple[str, ...] = ("error", "ignore")

# The paper's budgets ("Implementation details"): 100k pretraining iterations of batch 32, 200 fine-tuning epochs.
PAPER_PRETRAIN_ITERATIONS = 100_000
PAPER_FINETUNE_EPOCHS = 200
