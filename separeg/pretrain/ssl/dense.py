"""The paper's "no separation" ablation (Table 4): pixel-level SimSiam on feature maps.

"*No separation* refers to form positive region pairs at the same location of two feature maps. It can
be regarded as PixPro with removing its PPM module." Two augmented views of a whole slice are encoded to
feature maps; each feature-map pixel of one view is paired with the point of the other view's map that
shows the same image location (known from the crop + flip matrices), and SimSiam's loss is applied per
pixel. Pixels whose partner lies outside the other view are left out.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from separeg.pretrain.encoders import PooledEncoder

from .losses import negative_cosine

__all__ = ["DenseSSLModel", "corresponding_points"]


def _conv_head(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    """The MLP head applied to every pixel (1 x 1 convolutions, BN + ReLU between)."""
    return nn.Sequential(nn.Conv2d(in_dim, hidden_dim, 1, bias=False), nn.BatchNorm2d(hidden_dim),
                         nn.ReLU(inplace=True), nn.Conv2d(hidden_dim, out_dim, 1))


def corresponding_points(theta_from: torch.Tensor, theta_to: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Where the pixel centres of an ``height x width`` map of one view fall in the other view.

    Args:
        theta_from, theta_to: ``(B, 2, 3)`` matrices mapping each view's normalised coordinates to the
            input's (as made by :func:`separeg.pretrain.augment.augment_with_geometry`); their 2 x 2 parts are
            invertible.

    Returns:
        ``(B, height, width, 2)`` normalised ``(x, y)`` coordinates in the other view (``F.grid_sample``
        convention); outside [-1, 1] where the point is not in that view.
    """
    identity = torch.eye(2, 3, device=theta_from.device).expand(len(theta_from), 2, 3)
    grid = F.affine_grid(identity, [len(theta_from), 1, height, width], align_corners=False)  # (B, h, w, 2)
    # Row vectors: (B, h, w, 2) @ (B, 1, 2, 2); translations broadcast as (B, 1, 1, 2).
    points = grid @ theta_from[:, None, :, :2].transpose(-1, -2) + theta_from[:, None, None, :, 2]
    inverse = torch.linalg.inv(theta_to[:, :, :2])[:, None]
    return (points - theta_to[:, None, None, :, 2]) @ inverse.transpose(-1, -2)


class DenseSSLModel(nn.Module):
    """Encoder (as :class:`PooledEncoder`, so it exports the same way) + per-pixel projector and predictor."""

    def __init__(self, encoder: str, in_channels: int = 1, *, hidden_dim: int = 2048, out_dim: int = 256) -> None:
        super().__init__()
        self.backbone = PooledEncoder(encoder, in_channels)
        self.projector = _conv_head(self.backbone.dim, hidden_dim, out_dim)
        self.predictor = _conv_head(out_dim, hidden_dim, out_dim)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> dict[str, torch.Tensor]:
        """Projections ``z1, z2`` and predictions ``p1, p2``, each ``(B, out_dim, h, w)``."""
        z1 = self.projector(self.backbone.encoder(x1)[-1])
        z2 = self.projector(self.backbone.encoder(x2)[-1])
        return {"z1": z1, "z2": z2, "p1": self.predictor(z1), "p2": self.predictor(z2)}

    @staticmethod
    def loss(out: dict[str, torch.Tensor], theta1: torch.Tensor, theta2: torch.Tensor) -> torch.Tensor:
        """½ (D(p1, sg(z2 at the same place)) + D(p2, sg(z1 at the same place))) over pixels seen in both views."""
        height, width = out["z1"].shape[-2:]
        total = out["z1"].new_zeros(())
        for p, z, theta_p, theta_z in ((out["p1"], out["z2"], theta1, theta2), (out["p2"], out["z1"], theta2, theta1)):
            where = corresponding_points(theta_p.float(), theta_z.float(), height, width)
            inside = (where.abs() < 1).all(dim=-1)  # (B, h, w)
            partner = F.grid_sample(z.detach().float(), where, mode="bilinear", align_corners=False)
            if inside.any():
                p_pixels = p.float().permute(0, 2, 3, 1)[inside]  # (N, D)
                z_pixels = partner.permute(0, 2, 3, 1)[inside]
                total = total + 0.5 * negative_cosine(p_pixels, z_pixels)
        return total

    def after_step(self, progress: float) -> None:
        """No target network (SimSiam-style)."""
