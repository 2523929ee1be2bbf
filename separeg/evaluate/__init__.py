"""Evaluation: metrics in mm with a written-down empty-mask policy (``metrics``: DSC, HD95, ...), the inputs of
``separeg evaluate`` (``inputs``: prediction/reference pairs, label maps, organ names) and the command itself
(``job``: per-case metrics, summary tables and plots).

May import: :mod:`separeg.runtime`, :mod:`separeg.io`, :mod:`separeg.rt` (label tables), :mod:`separeg.sis`
(figures), :mod:`separeg.registry`.
"""
