"""SepaReg core: separated region-level contrastive pretraining and few-shot organ contouring for radiotherapy CT.

Headless: no Slicer, Qt or VTK imports. The Slicer modules run it through ``python -m separeg.cli``.
"""

__version__ = "0.1.0"
