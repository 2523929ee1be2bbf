"""Frozen-encoder probe: does an encoder's feature map, untouched, separate organs? (issue 22)

The fast check to iterate pretraining on: if it does not separate a pretrained encoder from a random one,
fine-tuning will not either. A linear head (one 1 x 1 convolution) reads the encoder's five feature maps,
upsampled to a quarter of the slice and standardised per channel on the training slices; it is trained on the
slices of a few labelled cases (often one) with the fine-tuning loss (CE + soft Dice over the annotated organs) and
scored with 3D DSC per organ on other cases, on the fine-tuning model grid. The encoder never trains, BatchNorm runs
in eval mode, and every encoder sees the same slices, batches and head initialisation.

    python -m separeg.evaluate.probe --data ../shared/data/openkbp --train pt_22 --validation pt_42 pt_43 pt_45 \\
        --encoder random=random --encoder shipped=separeg-encoder-hn-ct --run RUN_DIR --out probe.md
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from separeg.runtime.errors import InputError, SepaRegError

__all__ = ["ProbeConfig", "probe_encoders", "encoder_sources", "probe_markdown", "main"]


@dataclass(frozen=True)
class ProbeConfig:
    steps: int = 500
    batch_size: int = 16
    lr: float = 0.05
    stride: int = 4  # features are upsampled to 1 / stride of the slice
    foreground_fraction: float = 0.67
    seed: int = 0


def encoder_sources(specs: list[str], runs: list[Path]) -> tuple[dict[str, dict | None], str | None]:
    """``{name: U-Net encoder state (None: random)}`` and their architecture, from ``NAME=SOURCE`` specs (SOURCE:
    ``random``, an encoder bundle or a model name) and pretraining run folders (their inter-organ model and their
    distilled student, from the checkpoints)."""
    from separeg.runtime.bundle import load_bundle
    from separeg.runtime.model_store import resolve_model

    states: dict[str, dict | None] = {}
    arch = None
    for spec in specs:
        name, _, source = spec.partition("=")
        if not source:
            raise InputError(f"--encoder {spec!r}: write NAME=SOURCE (SOURCE: random, a bundle or a model name)")
        if source == "random":
            states[name] = None
            continue
        bundle = load_bundle(resolve_model(source))
        if bundle.kind != "encoder":
            raise InputError(f"{source} is a {bundle.kind} bundle; the probe reads encoder bundles")
        arch = _same_arch(arch, bundle.architecture["encoder"], source)
        states[name] = bundle.state_dict
    for run in runs:
        states.update(_run_states(Path(run)))
        config = json.loads((Path(run) / "config.json").read_text(encoding="utf-8"))
        arch = _same_arch(arch, _find(config, "encoder"), str(run))
    return states, arch


def _find(node, key: str):
    if isinstance(node, dict):
        if isinstance(node.get(key), str):
            return node[key]
        return next((v for v in (_find(c, key) for c in node.values()) if v), None)
    return None


def _same_arch(current: str | None, new: str, source: str) -> str:
    if current is not None and new != current:
        raise InputError(f"{source} is a {new} encoder, the others {current}: probe one architecture at a time")
    return new


def _run_states(run: Path) -> dict[str, dict]:
    """The inter-organ encoder and the distilled student of a pretraining run (``checkpoints/``), U-Net keys."""
    from separeg.runtime.training import load_checkpoint

    states = {}
    for stage, prefix, label in (("inter", "backbone.encoder.", "inter-organ"), ("distill", "encoder.", "distilled")):
        path = run / "checkpoints" / f"{stage}.pt"
        if path.exists():
            model = load_checkpoint(path)["model"]
            states[f"{run.name} {label}"] = {k.removeprefix(prefix): v for k, v in model.items()
                                             if k.startswith(prefix)}
    if not states:
        raise InputError(f"{run} has no inter or distill checkpoint: is it a pretraining run folder?")
    return states


class _Features:
    """An encoder's frozen multi-scale features at ``1 / stride`` of the slice, ``(B, C, H / s, W / s)``."""

    def __init__(self, arch: str, state: dict | None, n_classes: int, device: torch.device, seed: int) -> None:
        from separeg.segment.network import build_unet, load_encoder_weights, unet_encoder

        torch.manual_seed(seed)  # the same random encoder for every "random" entry
        unet = build_unet(arch, n_classes, 1)
        if state is not None:
            load_encoder_weights(unet, {k: v.float() for k, v in state.items()})
        self.encoder = unet_encoder(unet).to(device).eval().requires_grad_(False)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, stride: int) -> torch.Tensor:
        maps = self.encoder(x)
        if not isinstance(maps, (list, tuple)):
            raise InputError("the probe needs an encoder that returns its feature maps (the ResNet encoders)")
        size = (x.shape[-2] // stride, x.shape[-1] // stride)
        return torch.cat([F.interpolate(m.float(), size=size, mode="bilinear", align_corners=False)
                          for m in maps if m.dim() == 4], dim=1)


def _features_of(extract: _Features, images: torch.Tensor, stride: int, batch: int = 16) -> torch.Tensor:
    return torch.cat([extract(images[i:i + batch], stride) for i in range(0, len(images), batch)])


def probe_encoder(arch: str, state: dict | None, train, val, cfg: ProbeConfig, device: torch.device) -> dict:
    """Train the linear head on ``train`` (a :class:`SliceSet`) over frozen features; DSC per organ on ``val``."""
    from separeg.segment.finetune.losses import marginal_dice_ce
    from separeg.segment.finetune.validation import by_organ, case_organ_scores

    n_classes = train.annotated.shape[1]
    extract = _Features(arch, state, n_classes, device, cfg.seed)
    feats = _features_of(extract, train.images, cfg.stride)
    mean = feats.mean(dim=(0, 2, 3), keepdim=True)
    std = feats.std(dim=(0, 2, 3), keepdim=True) + 1e-6
    feats = ((feats - mean) / std).half()  # half the memory of the cached training features
    torch.manual_seed(cfg.seed)
    head = torch.nn.Conv2d(feats.shape[1], n_classes, 1).to(device)
    optimizer = torch.optim.Adam(head.parameters(), lr=cfg.lr)
    rng = np.random.default_rng(cfg.seed)
    foreground = train.foreground if len(train.foreground) else np.arange(len(train))
    size = train.images.shape[-2:]
    for step in range(cfg.steps):
        n_fg = int(round(cfg.batch_size * cfg.foreground_fraction))
        rows = np.concatenate([rng.choice(foreground, n_fg), rng.integers(0, len(train), cfg.batch_size - n_fg)])
        rows_t = torch.as_tensor(rows, device=device)
        logits = F.interpolate(head(feats[rows_t].float()), size=size, mode="bilinear", align_corners=False)
        loss = marginal_dice_ce(logits, train.labels[rows_t].long(), train.annotated[rows_t])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        for group in optimizer.param_groups:  # cosine decay to 0
            group["lr"] = cfg.lr * 0.5 * (1 + np.cos(np.pi * (step + 1) / cfg.steps))
        optimizer.step()
    predictions = []
    with torch.no_grad():
        for i in range(0, len(val), 16):
            x = (_features_of(extract, val.images[i:i + 16], cfg.stride) - mean) / std
            predictions.append(F.interpolate(head(x), size=val.images.shape[-2:], mode="bilinear",
                                             align_corners=False).argmax(1))
    prediction = torch.cat(predictions)
    by_case = case_organ_scores(prediction, val)
    per_case = {name: float(np.mean(list(by_case[i].values()))) if by_case.get(i) else None
                for i, name in enumerate(val.names)}
    organs = {str(k): float(np.mean(v)) for k, v in sorted(by_organ(by_case).items())}
    return {"organs": organs, "all": float(np.mean(list(organs.values()))) if organs else 0.0,
            "per_case": per_case, "feature_channels": int(feats.shape[1]), "final_loss": float(loss.detach())}


def _load(data: Path, names: list[str], table) -> list:
    from separeg.segment.case_loading import load_case
    from separeg.segment.cases import find_cases

    cases = {c.name: c for c in find_cases(data)[0]}
    missing = [n for n in names if n not in cases]
    if missing:
        raise InputError(f"no case {', '.join(missing)} in {data} (cases are named like {next(iter(cases), '?')})")
    return [load_case(cases[n], table) for n in names]


def probe_encoders(states: dict[str, dict | None], arch: str, data: Path, train: list[str], validation: list[str],
                   labels: Path | None = None, cfg: ProbeConfig = ProbeConfig(), device: str = "cpu") -> dict:
    """Probe every encoder of ``states`` on the same slices; returns ``{name: result}`` (see :func:`probe_encoder`)."""
    from separeg.rt.labels import load_label_table
    from separeg.segment.network import GridSpec

    table = load_label_table(labels or Path(data) / "labels.json")
    dev = torch.device(device)
    from separeg.segment.finetune.data import SliceSet

    train_cases = _load(Path(data), train, table)
    spacing = tuple(float(np.median([c.image.GetSpacing()[a] for c in train_cases])) for a in (0, 1))
    spec = GridSpec((-1000.0, 1000.0), spacing)  # fine-tuning's grid: the training cases' median spacing
    n_classes = max(table.values) + 1
    train_slices = SliceSet(train_cases, n_classes, spec, dev)
    val_slices = SliceSet(_load(Path(data), validation, table), n_classes, spec, dev)
    names = {v: table.names[i] for i, v in enumerate(table.values)}
    results = {}
    for name, state in states.items():
        result = probe_encoder(arch, state, train_slices, val_slices, cfg, dev)
        result["organs"] = {names.get(int(k), k): v for k, v in result["organs"].items()}
        results[name] = result
    return {"arch": arch, "train": train, "validation": validation, "config": asdict(cfg),
            "grid_mm": list(spacing), "results": results}


def probe_markdown(report: dict) -> str:
    results = report["results"]
    organs = sorted({o for r in results.values() for o in r["organs"]})
    lines = ["# Frozen-encoder probe", "",
             f"Linear 1x1-conv head on frozen {report['arch']} features (all five scales at 1/"
             f"{report['config']['stride']} of the slice, standardised), {report['config']['steps']} steps on "
             f"{', '.join(report['train'])}; 3D DSC % per organ on {', '.join(report['validation'])} (grid "
             f"{report['grid_mm'][0]:.2f} mm). `python -m separeg.evaluate.probe`.", "",
             "| encoder | " + " | ".join(organs) + " | all |", "|---|" + "---|" * (len(organs) + 1)]
    for name, r in results.items():
        cells = [f"{100 * r['organs'][o]:.1f}" if o in r["organs"] else "–" for o in organs]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | **{100 * r['all']:.1f}** |")
    lines += ["", "Per validation case (mean DSC % over its annotated organs):", "",
              "| encoder | " + " | ".join(report["validation"]) + " |", "|---|" + "---|" * len(report["validation"])]
    for name, r in results.items():
        cells = [f"{100 * r['per_case'][c]:.1f}" if r["per_case"].get(c) is not None else "–"
                 for c in report["validation"]]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m separeg.evaluate.probe", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="folder of labelled cases (<case>_ct + <case>_oar)")
    parser.add_argument("--train", nargs="+", required=True, help="case(s) the head is trained on")
    parser.add_argument("--validation", nargs="+", required=True, help="cases it is scored on")
    parser.add_argument("--labels", type=Path, help="label table (default: DATA/labels.json)")
    parser.add_argument("--encoder", action="append", default=[], help="NAME=SOURCE (random, bundle, model name)")
    parser.add_argument("--run", action="append", type=Path, default=[], help="pretraining run folder")
    parser.add_argument("--arch", default="resnet18-slim", help="architecture of random-only probes (%(default)s)")
    parser.add_argument("--steps", type=int, default=ProbeConfig.steps, help="head training steps (%(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed (%(default)s)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (%(default)s)")
    parser.add_argument("--out", type=Path, required=True, help="probe.md to write (and probe.json beside it)")
    args = parser.parse_args(argv)
    try:
        if not args.data.is_dir():
            raise InputError(f"--data {args.data} is not a folder of labelled cases")
        states, arch = encoder_sources(args.encoder, args.run)
        if not states:
            raise InputError("nothing to probe: give --encoder NAME=SOURCE and/or --run RUN_DIR")
        report = probe_encoders(states, arch or args.arch, args.data, args.train, args.validation, args.labels,
                                ProbeConfig(steps=args.steps, seed=args.seed), args.device)
    except SepaRegError as exc:  # bad input, an unreadable bundle: say what, no traceback
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from separeg.runtime.atomic import atomic_path

    with atomic_path(args.out) as tmp:
        tmp.write_text(probe_markdown(report), encoding="utf-8")
    with atomic_path(args.out.with_suffix(".json")) as tmp:
        tmp.write_text(json.dumps(report, indent=2), encoding="utf-8")
    for run in args.run:
        _add_to_report(Path(run), args.out)
    print(probe_markdown(report))
    return 0


def _add_to_report(run: Path, probe: Path) -> None:
    """Link the probe from the run's ``report.md`` (its diagnostics section), once."""
    from separeg.runtime.atomic import atomic_path

    report = run / "report.md"
    if not report.exists():
        return
    text = report.read_text(encoding="utf-8")
    heading = "## Frozen-encoder probe"
    if heading in text:
        text = text[:text.index(heading)]
    text = text.rstrip() + "\n\n"
    try:
        target = probe.resolve().relative_to(run.resolve())
    except ValueError:
        target = probe.resolve()
    table = probe_markdown(json.loads(probe.with_suffix(".json").read_text(encoding="utf-8")))
    body = table.split("\n", 2)[2]  # without the page title
    with atomic_path(report) as tmp:
        tmp.write_text(text + f"{heading}\n\n{body}\nFull table: [{target}]({target}).\n", encoding="utf-8")


if __name__ == "__main__":
    raise SystemExit(main())
