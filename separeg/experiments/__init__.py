"""Experiments on top of the pipeline: the few-shot protocol as data (``plan``: methods, config, runs), running it
(``protocol``), its report (``report``), paired comparisons between runs (``paired``) and the demo on the bundled
sample data (``demo``).

May import: every other sub-package; nothing imports it except :mod:`separeg.cli`.
"""
