"""Few-shot segmentation: cases (``cases``), the U-Net built on a pretrained encoder (``network``), fine-tuning
(``finetune_config``, ``finetune_data``, ``finetune_objective``, ``finetune_validation``, ``finetune``),
partial labels (``plseg``), Mean Teacher (``mean_teacher``), segmentation augmentation and losses
(``augment``, ``losses``), Auto-contour (``contour``) and the atlas baseline (``atlas``).

May import: :mod:`separeg.runtime`, :mod:`separeg.io`, :mod:`separeg.rt`, :mod:`separeg.pretrain` (encoders,
channels of a pretrained bundle), :mod:`separeg.registry`; the validation plots come from :mod:`separeg.sis`.
"""
