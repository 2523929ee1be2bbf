"""Radiotherapy DICOM: the organ name registry (``organs``: TG-263 names, synonyms, colours), label tables
(``labels``) and their codes (``terminology``), RTSTRUCT reading (``rtstruct``) and rasterising (``raster``),
RTSTRUCT writing (``rtstruct_write``, holes as keyholes: ``keyhole``), DICOM training cases of CT + RTSTRUCT
(``dicom_cases``), DICOM SEG (``seg``) and the ``separeg export`` command (``export``).

May import: :mod:`separeg.runtime`, :mod:`separeg.io`, :mod:`separeg.registry`.
"""
