"""Fine-tuning's validation: per-organ DSC by patient on a cadence of epochs, the best checkpoint and early stopping
(:class:`EpochValidator`), and the per-organ post-processing chosen on the validation cases
(:func:`choose_postprocessing`, nnU-Net's rule: keep a step for an organ only where it does not lower its DSC).

Validation must not cost more than training (a one-case fine-tune spent two thirds of its time validating): the
epoch-end validation predicts only the slices within each case's organs plus a margin
(:func:`validation_rows`), and runs every :func:`validation_cadence` epochs, counted from the slices it predicts
against the slices an epoch trains on. The final post-processing and mirroring choices still see every slice (a
stray component far from the organs is what they judge).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from separeg.runtime.events import Events
from separeg.runtime.training import Runtime, save_checkpoint
from separeg.segment.finetune.data import SliceSet

__all__ = ["predict_slices", "case_organ_scores", "by_organ", "organ_scores", "validate", "choose_postprocessing",
           "validation_rows", "validation_cadence", "EpochValidator"]

MARGIN_SLICES = 8  # slices validated beyond each case's annotated organs, on each side
TRAINING_COST = 3.0  # a training step's pixel costs forward + backward (+ augmentation) against inference alone


@torch.no_grad()
def predict_slices(model: torch.nn.Module, slices: SliceSet, runtime: Runtime, batch: int = 32,
                   rows: np.ndarray | None = None) -> torch.Tensor:
    """``(N, H, W)`` argmax labels of every slice (or of ``rows``, in that order) on the model grid."""
    was_training = model.training
    model.eval()
    rows = np.arange(len(slices)) if rows is None else rows
    predictions = []
    for start in range(0, len(rows), batch):
        index = torch.as_tensor(rows[start:start + batch], device=slices.neighbours.device)
        with runtime.autocast:
            predictions.append(model(slices.network_input(index)).argmax(1))
    model.train(was_training)
    return torch.cat(predictions)


def validation_rows(slices: SliceSet, margin: int = MARGIN_SLICES) -> np.ndarray:
    """The slices epoch-end validation predicts: per case, from its first to its last slice with an organ voxel,
    ``margin`` more on each side (cases without an organ voxel: all their slices)."""
    has_organ = (slices.labels > 0).flatten(1).any(1).cpu().numpy()
    keep = np.zeros(len(slices.case_of), bool)
    for case in np.unique(slices.case_of):
        rows = np.flatnonzero(slices.case_of == case)
        inside = rows[has_organ[rows]]
        if not len(inside):
            keep[rows] = True
            continue
        keep[rows[(rows >= inside[0] - margin) & (rows <= inside[-1] + margin)]] = True
    return np.flatnonzero(keep)


def validation_cadence(validated_pixels: int, steps_per_epoch: int, batch: int, patch_pixels: int) -> int:
    """Epochs between validations so that validating costs at most what training does: the pixels validation
    predicts against an epoch's training pixels (each :data:`TRAINING_COST` times an inference pixel)."""
    epoch_cost = TRAINING_COST * steps_per_epoch * batch * patch_pixels
    return max(1, math.ceil(validated_pixels / epoch_cost))


def _dsc(pred: np.ndarray | torch.Tensor, ref: np.ndarray | torch.Tensor) -> float | None:
    total = int(pred.sum() + ref.sum())
    return 2.0 * float((pred & ref).sum()) / total if total else None


def case_organ_scores(prediction: torch.Tensor, slices: SliceSet,
                      rows: np.ndarray | None = None) -> dict[int, dict[int, float]]:
    """``{case index: {organ: DSC}}``, 3D over each case's slices that score the organ (``slices.scored``),
    annotated organs only; organs neither predicted nor present in a case are not scored there. ``prediction``
    holds the slices ``rows`` (default: all)."""
    rows = np.arange(len(slices)) if rows is None else rows
    case_of = slices.case_of[rows]
    scores: dict[int, dict[int, float]] = {}
    for case in np.unique(case_of):
        where = np.flatnonzero(case_of == case)  # positions in ``prediction``
        case_rows = torch.as_tensor(rows[where], device=slices.labels.device)  # rows of ``slices``
        pred = prediction[torch.as_tensor(where, device=prediction.device)]
        ref, scored = slices.labels[case_rows], slices.scored[case_rows]
        scores[int(case)] = {}
        for organ in torch.nonzero(slices.annotated[case_rows[0]]).flatten().tolist()[1:]:
            keep = scored[:, organ]
            score = _dsc(pred[keep] == organ, ref[keep] == organ)
            if score is not None:
                scores[int(case)][organ] = score
    return scores


def by_organ(case_scores: dict[int, dict[int, float]]) -> dict[int, list[float]]:
    """:func:`case_organ_scores` regrouped: ``{organ: [DSC of each case that scored it]}``."""
    scores: dict[int, list[float]] = {}
    for organs in case_scores.values():
        for organ, score in organs.items():
            scores.setdefault(organ, []).append(score)
    return scores


def organ_scores(prediction: torch.Tensor, slices: SliceSet, rows: np.ndarray | None = None) -> dict[int, list[float]]:
    """DSC per annotated organ, one value per case (3D over the case's slices, or its ``rows``)."""
    return by_organ(case_organ_scores(prediction, slices, rows))


def validate(model: torch.nn.Module, slices: SliceSet, runtime: Runtime, batch: int = 32,
             rows: np.ndarray | None = None) -> dict[str, float]:
    """Mean DSC per organ over the validation cases (3D per case, annotated organs only) on the model grid, over
    every slice or ``rows``."""
    scores = organ_scores(predict_slices(model, slices, runtime, batch, rows), slices, rows)
    return {str(k): float(np.mean(v)) for k, v in sorted(scores.items())}


def choose_postprocessing(prediction: torch.Tensor, slices: SliceSet, values: list[int],
                          tolerance: float = 0.001) -> dict:
    """Per organ, whether keeping the largest connected component and filling holes helps on these cases.

    Each step is kept for an organ when its mean DSC over the cases is not lower than without it (by more than
    ``tolerance``); both steps act on one organ's voxels only, so organs are judged independently.

    Returns:
        ``{"largest_component": [values], "fill_holes": [values], "dsc": {value: {"raw", "largest_component",
        "both"}}}``, DSC means over the cases that annotate the organ.
    """
    from separeg.segment.contour import postprocess

    labels = prediction.cpu().numpy().astype(np.uint8)
    reference = slices.labels.cpu().numpy()
    table: dict[int, dict[str, list[float]]] = {v: {"raw": [], "largest_component": [], "both": []} for v in values}
    scored_all = slices.scored.cpu().numpy()
    for case in np.unique(slices.case_of):
        rows = np.flatnonzero(slices.case_of == case)
        pred, ref, scored = labels[rows], reference[rows], scored_all[rows]
        annotated = torch.nonzero(slices.annotated[int(rows[0])]).flatten().tolist()
        for value in (v for v in values if v in annotated):
            variants = {"raw": pred,
                        "largest_component": postprocess(pred, [value], largest_component=True, fill_holes=False),
                        "both": postprocess(pred, [value], largest_component=True, fill_holes=True)}
            keep = scored[:, value]  # post-processing acts on the whole case, scoring on the slices that count
            for name, variant in variants.items():
                score = _dsc(variant[keep] == value, ref[keep] == value)
                if score is not None:
                    table[value][name].append(score)
    mean = {v: {k: float(np.mean(s)) for k, s in t.items() if s} for v, t in table.items()}
    lcc = [v for v in values if mean[v] and mean[v]["largest_component"] >= mean[v]["raw"] - tolerance]
    fill = [v for v in values if mean[v] and mean[v]["both"] >= mean[v]["largest_component"] - tolerance]
    unscored = [v for v in values if not mean[v]]  # no case to judge by: keep the anatomical default
    return {"largest_component": sorted(lcc + unscored), "fill_holes": sorted(fill + unscored),
            "dsc": {str(v): m for v, m in mean.items() if m}}


class EpochValidator:
    """Called after every training step; every ``every`` epochs (and at the end) validates the slices ``rows``,
    keeps the best checkpoint and decides early stopping (``patience`` epochs, not validations, without
    improvement). Its ``history`` goes into the training checkpoint, so a resumed run keeps its curve.

    Args:
        model: the deployable model (validated and saved).
        slices: validation slices, or the training slices when there are no validation cases (then the choice of
            epoch is made on training data, and the log says so).
        rows: the slices validated (default: all; see :func:`validation_rows`).
    """

    def __init__(self, model: torch.nn.Module, slices: SliceSet, *, on_training_data: bool, steps_per_epoch: int,
                 total: int, patience: int, best_path: Path, runtime: Runtime, events: Events, every: int = 1,
                 rows: np.ndarray | None = None) -> None:
        self.model, self.slices, self.on_training_data = model, slices, on_training_data
        self.steps_per_epoch, self.total, self.patience, self.every = steps_per_epoch, total, patience, every
        self.best_path, self.runtime, self.events, self.rows = best_path, runtime, events, rows
        self.history: dict = {"epochs": [], "best": None, "best_epoch": None, "stale": 0}

    @property
    def what(self) -> str:
        return "training" if self.on_training_data else "validation"

    def __call__(self, step: int) -> bool:
        if step % (self.steps_per_epoch * self.every) and step != self.total:
            return False
        epoch = math.ceil(step / self.steps_per_epoch)
        scores = validate(self.model, self.slices, self.runtime, rows=self.rows)
        mean = float(np.mean(list(scores.values()))) if scores else 0.0
        history = self.history
        history["epochs"].append({"epoch": epoch, "step": step, "mean_dsc": mean, "dsc": scores})
        if history["best"] is None or mean > history["best"]:
            history.update(best=mean, best_epoch=epoch, stale=0)
            if self.runtime.is_main:
                save_checkpoint(self.best_path, {"model": self.model.state_dict(), "epoch": epoch, "mean_dsc": mean})
        else:
            history["stale"] = epoch - history["best_epoch"]  # epochs, whatever the cadence
        self.events.log(f"epoch {epoch}: {self.what} mean DSC {100 * mean:.1f} % (best {100 * history['best']:.1f} % "
                        f"at epoch {history['best_epoch']})", stage="finetune")
        if history["stale"] >= self.patience:
            self.events.log(f"early stop: no improvement for {self.patience} epochs", stage="finetune")
            return True
        return False

    @property
    def best_scores(self) -> dict[str, float]:
        best = self.history["best_epoch"]
        return next((e["dsc"] for e in self.history["epochs"] if e["epoch"] == best), {})
