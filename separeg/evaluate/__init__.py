"""Evaluation: metrics in mm with a written-down empty-mask policy (``metrics``: DSC, HD95, ...) and the
``separeg evaluate`` command (``job``).

May import: :mod:`separeg.runtime`, :mod:`separeg.io`, :mod:`separeg.rt` (label tables), :mod:`separeg.sis`
(figures), :mod:`separeg.registry`.
"""
