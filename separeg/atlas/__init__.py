"""Atlas registration: the classical baseline (``separeg atlas``: register labelled cases to a CT and fuse their
organs, ``contour``) and its SimpleITK registration (``registration``).

May import: :mod:`separeg.segment` (case loading, contour post-processing, the model grid), :mod:`separeg.runtime`,
:mod:`separeg.io`, :mod:`separeg.rt`, :mod:`separeg.registry`.
"""
