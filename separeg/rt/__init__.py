"""Radiotherapy DICOM: label tables and TG-263 names (``labels``, ``terminology``), RTSTRUCT reading and
rasterising (``rtstruct``), RTSTRUCT writing (``rtstruct_write``), DICOM cases of CT + RTSTRUCT/SEG
(``dicom_cases``), keyhole contours for holes (``keyhole``), DICOM SEG (``seg``) and the export command
(``export``).

May import: :mod:`separeg.runtime`, :mod:`separeg.io`, :mod:`separeg.registry`.
"""
