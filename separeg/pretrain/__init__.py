"""Pretraining an encoder on an unlabelled archive: the config (``config``), the stages sis -> inter -> cluster
-> intra -> distill -> export (``stages``; the sis stage and the region set in ``region_data``, the run's networks,
diagnostics and exported encoder in ``run_models``), the run folder (``rundir``), the time/disk estimate
(``estimate``), the report (``report``) and its representation diagnostics (``diagnostics``), view augmentation
(``augment``), the encoders (``encoders``) and the self-supervised methods
(``ssl/``: SimSiam, SimCLR, BYOL, MoCo v3, dense).

May import: :mod:`separeg.runtime`, :mod:`separeg.io`, :mod:`separeg.sis`, :mod:`separeg.registry`.
"""
