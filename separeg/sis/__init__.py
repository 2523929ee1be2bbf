"""Structure-aware image separation (SIS, paper §3.1): superpixel regions (``regions``), the region set of an
archive (``regionset``), batched region crops (``crops``), the ``separeg regions`` job (``job``) and region
overlays (``figures``).

May import: :mod:`separeg.runtime`, :mod:`separeg.io`, :mod:`separeg.registry`.
"""
