"""Representation diagnostics of a pretraining run, for its ``report.md`` (issue 22).

Three questions a physicist should not have to guess at:

- **Collapse**: the standard deviation over regions of the L2-normalised outputs, averaged over dimensions
  (SimSiam, Chen & He 2021, §4.1): about ``1 / sqrt(dim)`` when the outputs spread over the sphere, 0 when every
  region maps to one point.
- **Did the weights move**: per encoder layer, ``||W - W0|| / ||W0||`` against the weights the stage started from
  (``checkpoints/initial/<stage>.pt``, written when a stage starts).
- **Distillation balance**: the mean of Eq. 4's KL term and of Eq. 5's cosine term at the start and the end of
  the stage (``distill_terms.json``), so that one term cannot silently dwarf the other.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from separeg.runtime.atomic import atomic_path

__all__ = ["DistillTerms", "save_initial_weights", "initial_weights", "spread", "weight_change",
           "stage_diagnostics", "diagnostics_markdown"]

DIAGNOSTICS = "diagnostics.json"
DISTILL_TERMS = "distill_terms.json"


def _initial_path(run, stage: str) -> Path:
    return run.checkpoints / "initial" / f"{stage}.pt"


def save_initial_weights(run, stage: str, module: nn.Module, write: bool = True) -> None:
    """Keep the weights a stage starts from (once: a resumed stage keeps its first start's)."""
    path = _initial_path(run, stage)
    if not write or path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path, suffix=".pt") as tmp:
        torch.save({k: v.detach().cpu().clone() for k, v in module.state_dict().items()}, tmp)


def initial_weights(run, stage: str) -> dict[str, torch.Tensor] | None:
    path = _initial_path(run, stage)
    return torch.load(path, map_location="cpu", weights_only=True) if path.exists() else None


class DistillTerms:
    """The two distillation terms per step, summarised into ``distill_terms.json`` at the end of the stage."""

    def __init__(self, run) -> None:
        self.path = Path(run.root) / DISTILL_TERMS
        # Kept on the device until save(): a float() per step would wait for the GPU every step, which the
        # training loop avoids (it syncs only every log_every steps).
        self.kl: list[torch.Tensor] = []
        self.cosine: list[torch.Tensor] = []

    def add(self, kl: torch.Tensor, cosine: torch.Tensor | None) -> None:
        self.kl.append(kl.detach())
        if cosine is not None:
            self.cosine.append(cosine.detach())

    def save(self) -> None:
        def summary(terms: list[torch.Tensor]) -> dict | None:
            if not terms:
                return None
            values = torch.stack(terms).float().cpu().numpy()
            tenth = max(1, len(values) // 10)
            return {"first": float(np.mean(values[:tenth])), "last": float(np.mean(values[-tenth:])),
                    "steps": len(values)}

        with atomic_path(self.path) as tmp:
            tmp.write_text(json.dumps({"kl": summary(self.kl), "cosine": summary(self.cosine)}, indent=2),
                           encoding="utf-8")


@torch.no_grad()
def spread(outputs: torch.Tensor) -> float:
    """Mean over dimensions of the std over samples of the L2-normalised ``(N, D)`` outputs (collapse -> 0)."""
    z = nn.functional.normalize(outputs.float(), dim=1)
    return float(z.std(dim=0).mean())


def weight_change(initial: dict[str, torch.Tensor], final: dict[str, torch.Tensor]) -> dict[str, float]:
    """``||W - W0|| / ||W0||`` per top-level layer (``conv1``, ``layer1``...) of an encoder's state dict; buffers
    (BatchNorm statistics) are left out."""
    groups: dict[str, list[float]] = {}
    for key, w0 in initial.items():
        if key not in final or not w0.is_floating_point() or "running_" in key:
            continue
        parts = key.removeprefix("encoder.").split(".")
        group = parts[0]
        delta = (final[key].float().cpu() - w0.float()).pow(2).sum().item()
        norm = w0.float().pow(2).sum().item()
        acc = groups.setdefault(group, [0.0, 0.0])
        acc[0] += delta
        acc[1] += norm
    return {g: math.sqrt(d / n) if n > 0 else float("nan") for g, (d, n) in groups.items()}


@torch.no_grad()
def stage_diagnostics(name: str, backbone: nn.Module, project: Callable[[torch.Tensor], torch.Tensor] | None,
                      crops: torch.Tensor, initial: dict[str, torch.Tensor] | None, batch: int = 128) -> dict:
    """Collapse and weight-change figures of one stage's network on fixed, unaugmented region crops.

    Args:
        backbone: the pooled encoder (``(B, C, H, W) -> (B, D)``), in eval mode.
        project: the projection the stage's loss saw (``(B, D) -> (B, 256)``), or None.
        crops: ``(N, C, S, S)`` crops, the same for every stage of a run.
        initial: the encoder's weights when the stage started, if known.
    """
    features = torch.cat([backbone(crops[i:i + batch]) for i in range(0, len(crops), batch)])
    out = {"stage": name, "feature_dim": int(features.shape[1]), "feature_spread": spread(features),
           "feature_reference": 1.0 / math.sqrt(features.shape[1])}
    if project is not None:
        z = torch.cat([project(features[i:i + batch]) for i in range(0, len(features), batch)])
        out.update(projection_dim=int(z.shape[1]), projection_spread=spread(z),
                   projection_reference=1.0 / math.sqrt(z.shape[1]))
    if initial is not None:
        out["weight_change"] = weight_change(initial, backbone.state_dict())
    return out


def diagnostics_markdown(diagnostics: dict) -> list[str]:
    """``report.md`` lines for ``diagnostics.json``'s content."""
    stages = diagnostics.get("stages", [])
    lines = []
    if stages:
        lines += ["## Representation diagnostics", "",
                  f"On {diagnostics.get('regions', '?')} fixed regions without augmentation. **Spread**: std over "
                  "regions of the L2-normalised outputs, mean over dimensions; about 1/sqrt(dim) (the reference) "
                  "when the outputs use the whole sphere, towards 0 when the model collapses to one output.", "",
                  "| stage | encoder features: spread (reference) | projections: spread (reference) |",
                  "|---|---|---|"]
        for s in stages:
            proj = (f"{s['projection_spread']:.4f} ({s['projection_reference']:.4f})" if "projection_spread" in s
                    else "–")
            lines.append(f"| {s['stage']} | {s['feature_spread']:.4f} ({s['feature_reference']:.4f}) | {proj} |")
        changed = [s for s in stages if s.get("weight_change")]
        if changed:
            groups = list(changed[0]["weight_change"])
            lines += ["", "**Weight change** per encoder layer, ||W - W0|| / ||W0|| from the weights the stage "
                      "started from (the inter-organ model's for stages initialised from it; random otherwise):",
                      "", "| stage | " + " | ".join(groups) + " |", "|---|" + "---|" * len(groups)]
            for s in changed:
                lines.append(f"| {s['stage']} | " + " | ".join(f"{s['weight_change'].get(g, float('nan')):.3f}"
                                                             for g in groups) + " |")
        lines.append("")
    terms = diagnostics.get("distill_terms")
    if terms and terms.get("kl"):
        kl, cos = terms["kl"], terms.get("cosine")
        lines += ["**Distillation balance** (mean of the first / last 10 % of steps): KL to the group teachers "
                  f"(Eq. 4, reduction {diagnostics.get('distill_kl', '?')}) {kl['first']:.4f} -> {kl['last']:.4f}"
                  + (f"; negative cosine to the inter-organ projection (Eq. 5) {cos['first']:.4f} -> "
                     f"{cos['last']:.4f}" if cos else "") + ".", ""]
    return lines
