"""Pretraining an encoder on an unlabelled archive: the config (``config``), the stages sis -> inter -> cluster
-> intra -> distill -> export (``stages``), the run folder (``rundir``), the time/disk estimate (``estimate``),
the report (``report``), view augmentation (``augment``), the encoders (``encoders``) and the self-supervised
methods (``ssl/``: SimSiam, SimCLR, BYOL, MoCo v3, dense).

May import: :mod:`separeg.runtime`, :mod:`separeg.io`, :mod:`separeg.sis`, :mod:`separeg.registry`.
"""
