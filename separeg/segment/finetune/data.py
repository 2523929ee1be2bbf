"""Fine-tuning data: the training and validation slices on the model grid, and the batches drawn from them.

Slices are held once, as ``(N, C, H, W)``; 2.5D inputs (``GridSpec.context_slices`` k > 0) are gathered per batch
from each slice's neighbours within its own case (:func:`separeg.segment.network.neighbour_index`), in the channel order
:func:`separeg.segment.network.with_context` gives at contour time.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from separeg.io.channels import check_channel_count
from separeg.segment.network import GridSpec, model_input, neighbour_index, to_canonical, to_model_grid

__all__ = ["IGNORE", "SliceSet", "sample_patches"]

# A label voxel the loss must not use (a propagated label below the confidence threshold): negative, so that it never
# passes for a class; nearest-neighbour warps (augment) keep it.
IGNORE = -1


class SliceSet:
    """Slices and label maps of a list of cases on the model grid, on one device.

    Attributes:
        images: ``(N, C, H, W)`` float (C input channels); labels: ``(N, H, W)`` uint8 (int64 past 256 classes;
        batches are int64); annotated: ``(N, K)`` bool per slice (its case's annotated organs, background always);
        supervised: ``(N, K)``, the organs a slice's labels speak for in training (``annotated``, less each
        ``open_ended`` organ on the case's slices beyond its contour, and every organ absent from a sparse slice);
        scored: ``(N, K)`` bool, where validation scores each organ (every slice that is not sparse, and a sparse
        slice for the organs it shows); case_of: ``(N,)`` case index per slice; neighbours: ``(N, 2k + 1)`` rows of
        ``images`` that make each slice's 2.5D input; known: ``(N, H, W)`` bool, the voxels whose labels the loss may
        use, or None (all; the cases' own contours).

    Args:
        open_ended: label values of organs whose contours may stop short of the organ's end (OpenKBP contours the
            spinal cord to mid-neck in a third of its patients, though the cord goes on in the image): on a case's
            slices above and below its contour of such an organ, the organ is unknown, not background.
        min_body_area: a slice of a CT channel whose voxels above -500 HU cover less than this (mm^2) is *sparse*:
            OpenKBP stores CT only inside the contours on slices outside the treated region, so an organ absent
            there (a cord whose contour ends) is unknown, neither taught as background nor scored; the organs a
            sparse slice shows keep their labels (a whole larynx or brainstem may lie on such slices). 0: off.
        known: per case, a ``(Z, Y, X)`` bool array on its image's grid: the voxels whose labels the loss may use
            (the confident voxels of labels propagated from other cases, ``--archive``); others are :data:`IGNORE`
            in :func:`sample_patches`. None: every voxel.
    """

    def __init__(self, cases: list, n_classes: int, spec: GridSpec, device: torch.device,
                 open_ended: tuple[int, ...] = (), min_body_area: float = 0.0,
                 known: list[np.ndarray] | None = None) -> None:
        import SimpleITK as sitk

        images, labels, annotated, supervised, scored, case_of, neighbours, voxels = [], [], [], [], [], [], [], []
        shape, offset = None, 0
        for i, case in enumerate(cases):
            check_channel_count(len(case.images), spec.input_channels, f"case {case.name}")
            canonical = [to_canonical(image) for image in case.images]
            lab = sitk.GetArrayFromImage(to_canonical(_label_image(case)))
            spacing = canonical[0].GetSpacing()[:2]
            x = model_input([sitk.GetArrayFromImage(c) for c in canonical], spacing, spec, device=device,
                            context=False)
            y = to_model_grid(lab, spacing, spec, labels=True, device=device)[:, 0]
            if known is not None:  # like the labels: same grid, nearest neighbour
                mask = _label_image(case, known[i].astype(np.uint8))
                voxels.append(to_model_grid(sitk.GetArrayFromImage(to_canonical(mask)), spacing, spec, labels=True,
                                            device=device)[:, 0] > 0)
            if shape is not None and x.shape[-2:] != shape:
                x, y = _fit(x, shape), _fit(y[:, None].float(), shape)[:, 0].long()
                if known is not None:
                    voxels[-1] = _fit(voxels[-1][:, None].float(), shape)[:, 0] > 0  # the padding is unknown
            shape = tuple(x.shape[-2:])
            mask = torch.zeros(n_classes, dtype=torch.bool)
            mask[0] = True
            mask[sorted(case.annotated)] = True
            images.append(x)
            labels.append(y.to(torch.uint8) if n_classes <= 256 else y)  # 8x less memory (160 cases: 6 -> 0.8 GB)
            annotated.append(mask.expand(len(x), -1))
            flags = _within_extent(mask.expand(len(x), -1).clone(), y, open_ended)
            on_sparse = _known_on_sparse_slices(canonical[0], y, n_classes, min_body_area, spec)
            supervised.append(flags & on_sparse.to(flags.device))
            scored.append(on_sparse)
            case_of.append(torch.full((len(x),), i))
            neighbours.append(neighbour_index(len(x), spec.context_slices) + offset)
            offset += len(x)
        self.images = torch.cat(images)
        del images[:]  # the slices are held once, not twice, from here on
        self.labels = torch.cat(labels)
        del labels[:]
        self.annotated = torch.cat(annotated).to(device)
        self.supervised = torch.cat(supervised).to(device)
        self.scored = torch.cat(scored).to(device)
        self.case_of = torch.cat(case_of).numpy()
        self.neighbours = torch.cat(neighbours).to(device)
        self.known = torch.cat(voxels).to(device) if known is not None else None
        self.foreground = np.flatnonzero((self.labels > 0).flatten(1).any(1).cpu().numpy())
        # (slice, y, x) of every voxel of each organ, for class-balanced patch centres.
        labels_cpu = self.labels.cpu()
        self.organ_voxels = {int(v): torch.nonzero(labels_cpu == v).numpy()
                             for v in torch.unique(labels_cpu).tolist() if v > 0}
        self.names = [c.name for c in cases]

    def __len__(self) -> int:
        return len(self.labels)

    def network_input(self, rows: torch.Tensor | slice) -> torch.Tensor:
        """The network's ``(B, C * (2k + 1), H, W)`` input for slices ``rows``."""
        stacked = self.images[self.neighbours[rows]]  # (B, 2k+1, C, H, W)
        return stacked.transpose(1, 2).flatten(1, 2)


def sample_patches(slices: SliceSet, batch: int, patch: int, foreground_fraction: float,
                   rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A training batch of ``patch x patch`` crops: ``(images, labels, annotated)``; images carry the 2.5D
    neighbours as channels.

    A ``foreground_fraction`` of the batch is centred (with jitter of a quarter patch) on a voxel of an organ
    drawn uniformly among the organs present (class-balanced oversampling: an organ of a few hundred voxels is
    seen as often as the mandible); the rest is centred anywhere. Labels are :data:`IGNORE` where ``slices.known``
    is False.
    """
    _, _, height, width = slices.images.shape
    patch = min(patch, height, width)
    organs = sorted(slices.organ_voxels)
    n_fg = int(round(batch * foreground_fraction)) if organs else 0
    centres = []
    for i in range(batch):
        if i < n_fg:
            voxels = slices.organ_voxels[organs[rng.integers(len(organs))]]
            k, y, x = voxels[rng.integers(len(voxels))]
            y, x = y + rng.integers(-patch // 4, patch // 4 + 1), x + rng.integers(-patch // 4, patch // 4 + 1)
        else:
            k, y, x = rng.integers(len(slices)), rng.integers(height), rng.integers(width)
        y0 = int(np.clip(y - patch // 2, 0, height - patch))
        x0 = int(np.clip(x - patch // 2, 0, width - patch))
        centres.append((int(k), y0, x0))
    index = torch.as_tensor([c[0] for c in centres], device=slices.images.device)
    images = torch.stack([slices.images[slices.neighbours[k], :, y0:y0 + patch, x0:x0 + patch].transpose(0, 1)
                          .flatten(0, 1) for k, y0, x0 in centres])
    labels = torch.stack([slices.labels[k, y0:y0 + patch, x0:x0 + patch] for k, y0, x0 in centres]).long()
    if slices.known is not None:
        known = torch.stack([slices.known[k, y0:y0 + patch, x0:x0 + patch] for k, y0, x0 in centres])
        labels = labels.masked_fill(~known, IGNORE)
    return images, labels, slices.supervised[index]


def _within_extent(mask: torch.Tensor, labels: torch.Tensor, open_ended: tuple[int, ...]) -> torch.Tensor:
    """``(Z, K)`` annotation flags with each open-ended organ unflagged on the slices beyond its contour."""
    for value in open_ended:
        if value >= mask.shape[1] or not bool(mask[0, value]):
            continue
        present = torch.nonzero((labels == value).flatten(1).any(1)).flatten().cpu()
        if len(present):
            mask[:int(present[0]), value] = False
            mask[int(present[-1]) + 1:, value] = False
    return mask


def _known_on_sparse_slices(image, labels: torch.Tensor, n_classes: int, min_body_area: float,
                            spec: GridSpec) -> torch.Tensor:
    """``(Z, K)`` bool: False for an organ absent from a sparse slice (module docstring of :class:`SliceSet`)."""
    known = torch.ones(len(labels), n_classes, dtype=torch.bool)
    if min_body_area <= 0 or spec.input_channels[0].name != "CT":
        return known
    sparse = torch.as_tensor(_sparse_slices(image, min_body_area))
    shown = torch.stack([(labels == k).flatten(1).any(1).cpu() for k in range(n_classes)], dim=1)
    known[sparse, 1:] = shown[sparse, 1:]
    return known


def _sparse_slices(image, min_body_area: float) -> np.ndarray:
    """``(Z,)`` bool: axial slices whose voxels above -500 HU cover less than ``min_body_area`` mm^2."""
    import SimpleITK as sitk

    voxel_area = image.GetSpacing()[0] * image.GetSpacing()[1]
    body = (sitk.GetArrayViewFromImage(image) > -500).sum(axis=(1, 2)) * voxel_area
    return body < min_body_area


def _label_image(case, array: np.ndarray | None = None):
    """``array`` (default: the case's labels) as a uint8 image on the case's grid."""
    import SimpleITK as sitk

    image = sitk.GetImageFromArray((case.labels if array is None else array).astype(np.uint8))
    image.CopyInformation(case.image)
    return image


def _fit(x: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """Zero-pad or crop ``(N, C, H, W)`` at the bottom/right to ``shape`` (cases of different extents)."""
    h, w = shape
    x = x[..., :h, :w]
    return F.pad(x, (0, w - x.shape[-1], 0, h - x.shape[-2]))
