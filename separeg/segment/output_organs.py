"""Which organs of a raw contour are output, and where (issue 30): not those the model never learned
(:mod:`separeg.segment.learned_organs`) unless asked for, and none outside the body (:mod:`separeg.segment.body_mask`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from separeg.segment.body_mask import constrain_to_body
from separeg.segment.learned_organs import unlearned_organs

__all__ = ["OutputOrgans", "select_output_organs", "INCLUDE_UNLEARNED_FLAG"]

INCLUDE_UNLEARNED_FLAG = "--include-unlearned"


@dataclass
class OutputOrgans:
    """``table``: the organs written; ``not_contoured``: ``[{"value", "name", "tg263", "reason"}]`` left out;
    ``warnings`` in contour's format; ``outside_body``: voxels set to background outside the body (None: not a CT)."""

    table: object
    not_contoured: list[dict] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    outside_body: int | None = None


def select_output_organs(labels: np.ndarray, hu: np.ndarray | None, metadata: Mapping, table, *,
                         include_unlearned: bool = False) -> OutputOrgans:
    """Clear, in place, the organs the model did not learn (unless ``include_unlearned``) and every label outside
    the body (when ``hu``, the CT on the labels' grid, is given).

    Args:
        labels: ``(Z, H, W)`` raw labels, edited in place.
        hu: ``(Z, H, W)`` CT in HU on the same grid, or None for a model whose first input is not a CT.
        metadata: the bundle's metadata; table: its :class:`~separeg.rt.labels.LabelTable`.
    """
    from separeg.rt.labels import LabelTable

    unlearned = unlearned_organs(metadata, table.values)
    described = "; ".join(f"{_name(table, v)} ({why})" for v, why in unlearned.items())
    result = OutputOrgans(table)
    if unlearned and include_unlearned:
        result.warnings.append(f"organs the model did not learn: {described}; written as asked "
                               f"({INCLUDE_UNLEARNED_FLAG}): do not trust them")
    elif unlearned:
        for value in unlearned:
            labels[labels == value] = 0
        result.table = LabelTable(tuple(lb for lb in table if lb.value not in unlearned))
        result.not_contoured = [{"value": v, "name": table.by_value(v).name, "tg263": table.by_value(v).tg263,
                                 "reason": why} for v, why in unlearned.items()]
        result.warnings.append(f"not contoured: {described}; the model cannot contour "
                               f"{'it' if len(unlearned) == 1 else 'them'}, so no segment, ROI or SEG segment is "
                               f"written ({INCLUDE_UNLEARNED_FLAG} writes {'it' if len(unlearned) == 1 else 'them'})")
    if hu is not None:
        result.outside_body = constrain_to_body(labels, hu)
    return result


def _name(table, value: int) -> str:
    label = table.by_value(value)
    return label.tg263 or label.name
