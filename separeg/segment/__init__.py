"""Few-shot segmentation: training cases (``cases``: finding them; ``case_loading``: reading one), the U-Net on a
pretrained encoder (``network``, with :func:`~separeg.segment.network.load_segmentation_model`), fine-tuning as
hooks (``finetune_config``, ``finetune_cases``, ``finetune_data``, ``finetune_objective``, ``finetune_validation``,
and the loop in ``finetune``), partial labels (``plseg``), Mean Teacher (``mean_teacher``), segmentation
augmentation and losses (``augment``, ``losses``), Auto-contour (``contour``; slice-batched inference in
``inference``; the path before issue 24 in ``contour_legacy``) and the multi-atlas baseline (``atlas``,
``atlas_registration``).

May import: :mod:`separeg.runtime`, :mod:`separeg.io`, :mod:`separeg.rt`, :mod:`separeg.pretrain` (encoders, the
channels of a pretrained bundle), :mod:`separeg.registry`.
"""
