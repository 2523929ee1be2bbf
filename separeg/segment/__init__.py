"""Few-shot segmentation: training cases (``cases``: finding them; ``case_loading``: reading one), the U-Net on a
pretrained encoder (``network``, with :func:`~separeg.segment.network.load_segmentation_model`), fine-tuning (the
:mod:`separeg.segment.finetune` package), Auto-contour (``contour``; slice-batched inference in
``inference``; the path before issue 24 in ``contour_legacy``); the organs a model may write
(``learned_organs``, ``output_organs``, ``body_mask``, ``body_site``, ``model_quality``). The multi-atlas baseline is
:mod:`separeg.atlas`.

May import: :mod:`separeg.runtime`, :mod:`separeg.io`, :mod:`separeg.rt`, :mod:`separeg.pretrain` (encoders, the
channels of a pretrained bundle), :mod:`separeg.registry`.
"""
