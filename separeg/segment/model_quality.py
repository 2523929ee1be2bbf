"""The one rule for a fine-tuned model too weak to use, shared by ``separeg finetune`` and Slicer's model install.

Torch-free: it reads only the ``validation`` block a fine-tuned bundle records (:func:`read_bundle_info`).

``separeg finetune`` applies it at the end of a run: a model under the floor is kept (its run folder can be resumed
or inspected), the bundle records ``"usable": false`` and ``"unusable_reason"`` (this function's text), the run
warns with exactly that text and its done line says NOT USABLE; the exit status stays 0, because tiny-budget runs
(smoke tests, the Slicer self-test) end under the floor by design.
"""

from __future__ import annotations

from collections.abc import Mapping

__all__ = ["MIN_USEFUL_DSC", "useless_model_reason"]

# Best validation mean DSC (a fraction) below which a model is refused: under 1 % it finds essentially none of its
# organs (a tiny fine-tune scoring 2e-5 printed "0.0 %" and was installed). A real few-label model scores 30-60 %.
MIN_USEFUL_DSC = 0.01


def useless_model_reason(validation: Mapping | None) -> str | None:
    """Why a model must not be used, or None when it passes.

    Args:
        validation: a bundle's ``validation`` block: ``mean_dsc`` (fraction, or None when nothing was validated),
            ``on_training_data`` (True when the best epoch was chosen on the training cases).

    Returns:
        One sentence with the score, the floor and what to try, or None.
    """
    validation = validation or {}
    mean = validation.get("mean_dsc")
    if mean is None or float(mean) >= MIN_USEFUL_DSC:
        return None
    what = "training" if validation.get("on_training_data") else "validation"
    return (f"its best {what} mean DSC is {100 * float(mean):.2f} %, below the {100 * MIN_USEFUL_DSC:.0f} % floor: "
            "the model finds almost none of its organs. Train longer (--epochs), on more cases, or from a "
            "pretrained encoder (--init)")
