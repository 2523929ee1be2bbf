"""Fine-tuning's validation: per-organ DSC by patient after every epoch, the best checkpoint and early stopping
(:class:`EpochValidator`), and the per-organ post-processing chosen on the validation cases
(:func:`choose_postprocessing`, nnU-Net's rule: keep a step for an organ only where it does not lower its DSC).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from separeg.runtime.events import Events
from separeg.runtime.training import Runtime, save_checkpoint
from separeg.segment.finetune_data import SliceSet

__all__ = ["predict_slices", "case_organ_scores", "by_organ", "organ_scores", "validate", "choose_postprocessing",
           "EpochValidator"]


@torch.no_grad()
def predict_slices(model: torch.nn.Module, slices: SliceSet, runtime: Runtime, batch: int = 32) -> torch.Tensor:
    """``(N, H, W)`` argmax labels of every slice on the model grid."""
    was_training = model.training
    model.eval()
    predictions = []
    for start in range(0, len(slices), batch):
        with runtime.autocast:
            predictions.append(model(slices.network_input(slice(start, start + batch))).argmax(1))
    model.train(was_training)
    return torch.cat(predictions)


def _dsc(pred: np.ndarray | torch.Tensor, ref: np.ndarray | torch.Tensor) -> float | None:
    total = int(pred.sum() + ref.sum())
    return 2.0 * float((pred & ref).sum()) / total if total else None


def case_organ_scores(prediction: torch.Tensor, slices: SliceSet) -> dict[int, dict[int, float]]:
    """``{case index: {organ: DSC}}``, 3D over each case's slices that score the organ (``slices.scored``),
    annotated organs only; organs neither predicted nor present in a case are not scored there."""
    scores: dict[int, dict[int, float]] = {}
    for case in np.unique(slices.case_of):
        rows = torch.as_tensor(np.flatnonzero(slices.case_of == case), device=prediction.device)
        pred, ref, scored = prediction[rows], slices.labels[rows], slices.scored[rows]
        scores[int(case)] = {}
        for organ in torch.nonzero(slices.annotated[rows[0]]).flatten().tolist()[1:]:
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


def organ_scores(prediction: torch.Tensor, slices: SliceSet) -> dict[int, list[float]]:
    """DSC per annotated organ, one value per case (3D over the case's slices)."""
    return by_organ(case_organ_scores(prediction, slices))


def validate(model: torch.nn.Module, slices: SliceSet, runtime: Runtime, batch: int = 32) -> dict[str, float]:
    """Mean DSC per organ over the validation cases (3D per case, annotated organs only) on the model grid."""
    scores = organ_scores(predict_slices(model, slices, runtime, batch), slices)
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
    """Called after every training step; at each epoch's end validates, keeps the best checkpoint and decides
    early stopping. Its ``history`` goes into the training checkpoint, so a resumed run keeps its curve.

    Args:
        model: the deployable model (validated and saved).
        slices: validation slices, or the training slices when there are no validation cases (then the choice of
            epoch is made on training data, and the log says so).
    """

    def __init__(self, model: torch.nn.Module, slices: SliceSet, *, on_training_data: bool, steps_per_epoch: int,
                 total: int, patience: int, best_path: Path, runtime: Runtime, events: Events) -> None:
        self.model, self.slices, self.on_training_data = model, slices, on_training_data
        self.steps_per_epoch, self.total, self.patience = steps_per_epoch, total, patience
        self.best_path, self.runtime, self.events = best_path, runtime, events
        self.history: dict = {"epochs": [], "best": None, "best_epoch": None, "stale": 0}

    @property
    def what(self) -> str:
        return "training" if self.on_training_data else "validation"

    def __call__(self, step: int) -> bool:
        if step % self.steps_per_epoch and step != self.total:
            return False
        epoch = math.ceil(step / self.steps_per_epoch)
        scores = validate(self.model, self.slices, self.runtime)
        mean = float(np.mean(list(scores.values()))) if scores else 0.0
        history = self.history
        history["epochs"].append({"epoch": epoch, "step": step, "mean_dsc": mean, "dsc": scores})
        if history["best"] is None or mean > history["best"]:
            history.update(best=mean, best_epoch=epoch, stale=0)
            if self.runtime.is_main:
                save_checkpoint(self.best_path, {"model": self.model.state_dict(), "epoch": epoch, "mean_dsc": mean})
        else:
            history["stale"] += 1
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
