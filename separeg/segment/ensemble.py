"""Several segmentation models as one: the mean of their softmax probabilities (nnU-Net ensembles its five folds
this way). The members must be interchangeable: the same organs at the same label values, the same input channels,
grid and 2.5D context (seeds or folds of one recipe, or the same recipe on other data).

Two ways to use one: ``separeg contour --ensemble`` (members given at contour time) or one bundle that holds every
member (``separeg pack --ensemble``, :func:`pack_ensemble`): its architecture lists the members' architectures
(``members``) and its weights are theirs under ``members.<i>.``; :func:`~separeg.segment.network.
load_segmentation_model` rebuilds it, so Auto-contour, Slicer and the demo use it like any model, by name.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from separeg.runtime.errors import InputError

__all__ = ["ModelEnsemble", "check_members", "pack_ensemble", "member_bundle"]


class ModelEnsemble(nn.Module):
    """The members' softmax probabilities averaged; returns log-probabilities, so that a caller taking the argmax of
    logits (contour, validation) or wrapping it in :class:`~separeg.segment.mirror.MirrorEnsemble` needs no change."""

    def __init__(self, models: list[nn.Module]) -> None:
        super().__init__()
        self.members = nn.ModuleList(models)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        total = None
        for model in self.members:  # a running sum: memory does not grow with the members
            probabilities = model(x).float().softmax(1)
            total = probabilities if total is None else total + probabilities
        return (total / len(self.members)).clamp_min(1e-12).log()


def check_members(first, others: list) -> None:
    """Refuse an ensemble whose bundles differ in organs or inputs from the first (``first``, ``others``:
    :class:`~separeg.runtime.bundle.Bundle` of kind ``segmentation``).

    Raises:
        InputError: naming the member and what differs.
    """
    for bundle in others:
        for key, what in (("labels", "organs"), ("inputs", "input channels, grid or 2.5D context")):
            if bundle.metadata.get(key) != first.metadata.get(key):
                raise InputError(f"ensemble member {bundle.path} has other {what} than {first.path}; an ensemble "
                                 "averages models of one recipe (seeds or folds) trained for the same organs")
        if bundle.architecture.get("out_channels") != first.architecture.get("out_channels"):
            raise InputError(f"ensemble member {bundle.path} has {bundle.architecture.get('out_channels')} output "
                             f"channels, {first.path} {first.architecture.get('out_channels')}")


def pack_ensemble(sources: list, target, *, half: bool = False, metadata: dict | None = None):
    """Write one segmentation bundle holding the models ``sources`` (paths or installed names; the first one's
    labels, inputs, post-processing, mirroring and data ranges describe the ensemble) for release.

    Raises:
        InputError: fewer than two models, or members that differ (:func:`check_members`); BundleError: unreadable.
    """
    from separeg.runtime.bundle import load_bundle, save_bundle
    from separeg.runtime.model_store import resolve_model

    bundles = [load_bundle(resolve_model(s), expected_kind="segmentation") for s in sources]
    if len(bundles) < 2:
        raise InputError("an ensemble needs at least two models")
    if any("members" in b.architecture for b in bundles):
        raise InputError("an ensemble member is itself an ensemble; give its member models instead")
    check_members(bundles[0], bundles[1:])
    first = bundles[0]
    state = {f"members.{i}.{k}": (v.half() if half and v.is_floating_point() else v)
             for i, b in enumerate(bundles) for k, v in b.state_dict.items()}
    architecture = {**first.architecture, "members": [b.architecture for b in bundles]}
    extra = {**first.metadata, **(metadata or {}),
             "ensemble": [{"weights_sha256": b.weights_sha256, "name": Path(b.path).stem} for b in bundles],
             "packed_from": {"weights_sha256": first.weights_sha256, "created": first.created,
                             "weights_dtype": "float16" if half else "as trained"}}
    return save_bundle(target, kind="segmentation", architecture=architecture, state_dict=state, metadata=extra)


def member_bundle(bundle, index: int = 0):
    """Member ``index`` of an ensemble bundle as a bundle of its own (its architecture and weights; the ensemble's
    labels, inputs and choices): what fine-tuning continues from, since an average of networks has no decoder to
    supervise."""
    from dataclasses import replace

    prefix = f"members.{index}."
    recorded = bundle.metadata.get("ensemble") or []  # each member's own hash, as pack_ensemble wrote it
    return replace(bundle, architecture=bundle.architecture["members"][index],
                   state_dict={k[len(prefix):]: v for k, v in bundle.state_dict.items() if k.startswith(prefix)},
                   weights_sha256=recorded[index]["weights_sha256"] if index < len(recorded) else bundle.weights_sha256)
