"""Which organs a segmentation model learned: an organ it never learned is not output (issue 30).

The demo's fine-tuned models were never shown an Esophagus (no training case contours it) and still answered one,
of 4 and 31 litres of air. Torch-free: it reads only a bundle's metadata (:func:`read_bundle_info`).

Rule: an organ is not learned when the bundle records how many training cases annotate each organ
(``training.annotated_cases_per_organ``, written by ``separeg finetune``) and none annotates it, or when its
recorded validation DSC (``validation.per_organ_dsc``) is below :data:`MIN_ORGAN_DSC`, the floor under which
``separeg finetune`` refuses a whole model. A bundle recording neither (a model fine-tuned before this field,
or made elsewhere) has every organ learned; the shipped ``hn-oar-7`` records validation DSCs of 47-82 %.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from separeg.segment.model_quality import MIN_USEFUL_DSC

__all__ = ["MIN_ORGAN_DSC", "annotated_cases_per_organ", "unlearned_organs"]

MIN_ORGAN_DSC = MIN_USEFUL_DSC  # a fraction: below 1 % the model finds essentially none of this organ


def annotated_cases_per_organ(annotated: Iterable[Iterable[int]], values: Iterable[int]) -> dict[str, int]:
    """``{str(value): number of cases annotating it}`` for every organ of the table (0 included), as the bundle
    records it (keys as ``validation.per_organ_dsc``'s)."""
    sets = [set(a) for a in annotated]
    return {str(v): sum(v in s for s in sets) for v in values}


def unlearned_organs(metadata: Mapping, values: Iterable[int]) -> dict[int, str]:
    """``{value: why}`` for the organs of ``values`` the model did not learn (module rule); empty when it learned all.

    Args:
        metadata: a segmentation bundle's metadata (``training`` and ``validation`` blocks, as ``finetune`` writes).
        values: the label values of the model's table.
    """
    counts = (metadata.get("training") or {}).get("annotated_cases_per_organ")
    validation = metadata.get("validation") or {}
    scores = validation.get("per_organ_dsc") or {}
    what = "training" if validation.get("on_training_data") else "validation"
    reasons = {}
    for value in values:
        if counts is not None and int(counts.get(str(value), 0)) == 0:
            reasons[value] = "no training case annotates it"
        elif scores.get(str(value)) is not None and float(scores[str(value)]) < MIN_ORGAN_DSC:
            reasons[value] = (f"its {what} DSC is {100 * float(scores[str(value)]):.1f} %, below the "
                              f"{100 * MIN_ORGAN_DSC:.0f} % floor")
    return reasons
