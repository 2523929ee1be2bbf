"""Fine-tuning a U-Net on a few contoured scans (``separeg finetune``), as hooks: settings (``config``), which cases
train and which validate (``cases``), slices and patches (``data``), the loss (``objective``: partial labels in
``plseg``, Mean Teacher in ``mean_teacher``, Dice + CE in ``losses``; labels propagated onto an unlabelled archive
in ``propagated``), augmentation (``augment``), validation and the post-processing choice (``validation``) and the
loop (``train``).

Kept import-light on purpose: ``config`` is read by the CLI and the Slicer panels before torch is installed.
May import: :mod:`separeg.segment` (network, cases, contour), :mod:`separeg.runtime`, :mod:`separeg.io`,
:mod:`separeg.rt`, :mod:`separeg.pretrain`, :mod:`separeg.registry`; :mod:`separeg.atlas` (archive label
propagation) only inside functions.
"""
