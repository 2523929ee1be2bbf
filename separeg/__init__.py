"""SepaReg core: separated region-level contrastive pretraining and few-shot organ contouring for radiotherapy CT.

Headless: no Slicer, Qt or VTK imports. The Slicer modules run it through ``python -m separeg.cli``.

Sub-packages by stage, each importing only the layers before it (each ``__init__`` says what it owns):
:mod:`~separeg.registry` (names and budgets) -> :mod:`~separeg.runtime` -> :mod:`~separeg.io` ->
:mod:`~separeg.sis`, :mod:`~separeg.rt` -> :mod:`~separeg.pretrain` -> :mod:`~separeg.segment` ->
:mod:`~separeg.evaluate` -> :mod:`~separeg.experiments` -> :mod:`~separeg.cli` / :mod:`~separeg.commands`.
"""

__version__ = "0.1.0"
