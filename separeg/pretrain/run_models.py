"""The networks of a pretraining run: its SSL models built and loaded from checkpoints, the representation
diagnostics over them (``diagnostics.json``, :mod:`separeg.pretrain.diagnostics`) and the exported encoder bundle.
"""

from __future__ import annotations

import json

import numpy as np
import torch

from separeg.io.archive import Manifest
from separeg.pretrain.config import PretrainConfig, as_json_dict
from separeg.pretrain.diagnostics import DIAGNOSTICS, DISTILL_TERMS, initial_weights, stage_diagnostics
from separeg.pretrain.encoders import ENCODERS, PooledEncoder
from separeg.pretrain.rundir import RunDir
from separeg.pretrain.ssl import SSLModel
from separeg.pretrain.ssl.dense import DenseSSLModel
from separeg.runtime.atomic import atomic_path
from separeg.runtime.errors import InputError
from separeg.runtime.training import load_checkpoint

__all__ = ["build_ssl_model", "load_ssl_model", "write_diagnostics", "export_encoder"]


def build_ssl_model(cfg: PretrainConfig, device: torch.device) -> SSLModel | DenseSSLModel:
    if cfg.sis.mode == "dense":
        model = DenseSSLModel(cfg.encoder, cfg.in_channels)
    else:
        model = SSLModel(cfg.method, cfg.encoder, cfg.in_channels, temperature=cfg.temperature, momentum=cfg.ema)
    model = model.to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return model


def load_ssl_model(run: RunDir, cfg: PretrainConfig, device: torch.device, name: str) -> SSLModel:
    """The SSL model of stage checkpoint ``name`` (``inter``, ``intra<k>``), in eval mode."""
    path = run.checkpoint(name)
    if not path.exists():
        raise InputError(f"{path} is missing: run the stage that makes it first")
    model = build_ssl_model(cfg, device)
    model.load_state_dict(load_checkpoint(path, device)["model"])
    return model.eval()


def write_diagnostics(run: RunDir, cfg: PretrainConfig, region_set, device: torch.device, regions: int = 512) -> None:
    """``diagnostics.json``: collapse and weight change of every stage's network (:mod:`separeg.pretrain.diagnostics`)
    on the same fixed regions, and the distillation terms' balance."""
    rng = np.random.default_rng(cfg.seed)
    index = np.sort(rng.choice(len(region_set), min(regions, len(region_set)), replace=False))
    crops = region_set.crops(index)
    stages = []
    inter = None
    names = ["inter"] + sorted((p.stem for p in run.checkpoints.glob("intra*.pt")), key=lambda n: int(n[5:]))
    for name in names:
        if not run.checkpoint(name).exists() or cfg.sis.mode == "dense":
            continue
        model = load_ssl_model(run, cfg, device, name)
        inter = model if name == "inter" else inter
        stages.append(stage_diagnostics(name, model.backbone, model.projector, crops, initial_weights(run, name)))
    if run.checkpoint("distill").exists():
        student = PooledEncoder(cfg.encoder, cfg.in_channels).to(device)
        student.load_state_dict(load_checkpoint(run.checkpoint("distill"), device)["model"])
        project = inter.projector if inter is not None else None
        stages.append(stage_diagnostics("distill", student.eval(), project, crops, initial_weights(run, "distill")))
    terms_path = run.root / DISTILL_TERMS
    terms = json.loads(terms_path.read_text(encoding="utf-8")) if terms_path.exists() else None
    with atomic_path(run.root / DIAGNOSTICS) as tmp:
        tmp.write_text(json.dumps({"regions": len(index), "stages": stages, "distill_terms": terms,
                                   "distill_kl": cfg.distill_kl}, indent=2), encoding="utf-8")


def _implementation(encoder: str) -> dict:
    """What the encoder bundle's weights are and where they load (documentation for other tools)."""
    if ENCODERS[encoder].swin is not None:
        return {"implementation": f"monai.networks.nets.swin_unetr.SwinTransformer(spatial_dims=2, "
                                  f"embed_dim={ENCODERS[encoder].swin.feature_size})",
                "loads_into": "monai.networks.nets.SwinUNETR.swinViT"}
    return {"implementation": "monai.networks.nets.resnet.ResNetEncoder(spatial_dims=2)",
            "loads_into": "monai.networks.nets.FlexibleUNet.encoder"}


def export_encoder(run: RunDir, cfg: PretrainConfig, n_regions: int) -> None:
    """The student (or, without IID, the inter-organ) encoder as ``encoder.separeg``."""
    from separeg import __version__
    from separeg.runtime.bundle import save_bundle

    if cfg.iid:
        encoder = PooledEncoder(cfg.encoder, cfg.in_channels)
        encoder.load_state_dict(load_checkpoint(run.checkpoint("distill"))["model"])
    else:
        encoder = SSLModel(cfg.method, cfg.encoder, cfg.in_channels).backbone
        state = load_checkpoint(run.checkpoint("inter"))["model"]
        encoder.load_state_dict({k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")})
    manifest = Manifest.load(run.manifest)
    losses = {}
    for path in sorted(run.checkpoints.glob("*.pt")):
        history = load_checkpoint(path)["losses"]
        tail = history[-max(1, len(history) // 10):]
        losses[path.stem] = {"steps": len(history), "final_mean": float(np.mean(tail)) if tail else None}
    clusters = None
    if run.clusters.exists():
        with np.load(run.clusters) as data:
            clusters = data["counts"].tolist()
    save_bundle(
        run.encoder, kind="encoder",
        architecture={"encoder": cfg.encoder, "in_channels": cfg.in_channels, "feature_dim": encoder.dim,
                      **_implementation(cfg.encoder)},
        state_dict=encoder.encoder.state_dict(),
        metadata={"inputs": {"channels": [c.to_dict() for c in cfg.input_channels()],
                             "hu_window": list(cfg.sis.hu_window), "scale": "[0, 1]", "crop_size": cfg.crop_size,
                             "sis_channel": cfg.sis_channel or 0},
                  "training": {"config": as_json_dict(cfg), "manifest_hash": manifest.hash,
                               "volumes": len(manifest.usable()), "regions": n_regions,
                               "cluster_sizes": clusters, "stage_losses": losses, "separeg": __version__}})
