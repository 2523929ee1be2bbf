"""Images in and out: volumes (NIfTI/NRRD/MHA, canonical orientation), DICOM series reading (``dicom_series``)
and writing (``dicom_write``), the CT series a DICOM object refers to (``dicom_ct``), the archive scan, and
multichannel cases (``channels``, ``channel_archive``).

May import: :mod:`separeg.runtime` and :mod:`separeg.registry`.
"""
