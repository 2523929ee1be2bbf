"""The experiment protocol as data: methods, the experiment config read from JSON and checked, and the plan of
runs (per training-set size, method and draw). Imported by :mod:`separeg.experiments.protocol` (which runs the
plan) and :mod:`separeg.experiments.report` (which tabulates it)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from separeg.runtime.errors import InputError

__all__ = ["ExperimentConfig", "Method", "RunSpec", "load_experiment", "plan_runs"]



@dataclass(frozen=True)
class Method:
    """``pretrain``: keyword arguments of :class:`separeg.pretrain.config.PretrainConfig` (``separation`` sets
    ``sis.mode``) or None for random init; ``finetune``: of :class:`separeg.segment.finetune.config.FinetuneConfig`;
    ``unlabelled``: Mean Teacher reads the pretraining set. ``atlas``: multi-atlas contouring instead of a model
    (``fusion``, ``threads`` and :class:`separeg.atlas.registration.RegistrationConfig` fields); X_tr is the
    atlas set. ``archive``: fine-tune with ``--archive`` on this many training-pool CTs outside X_tr (the labelled
    cases propagated onto them by registration), the same CTs for every method and seed of a draw. ``ensemble``:
    ``{"of": METHOD, "seeds": [...]}`` trains nothing: each draw's test cases are contoured by the ensemble of that
    method's models of those fine-tuning seeds (``separeg contour --ensemble``)."""

    name: str
    pretrain: dict[str, Any] | None = None
    finetune: dict[str, Any] = field(default_factory=dict)
    atlas: dict[str, Any] | None = None
    init: str | None = None  # without pretrain: start fine-tuning from this encoder (a bundle path or model name)
    archive: int | None = None
    ensemble: dict[str, Any] | None = None

    @property
    def seedless(self) -> bool:
        """Atlas and ensemble methods have no fine-tuning seed: one run per draw serves every seed."""
        return self.atlas is not None or self.ensemble is not None


@dataclass(frozen=True)
class ExperimentConfig:
    name: str
    data: Path  # <case>_ct / <case>_oar volumes and labels.json
    train_pool: list[str]
    validation: list[str]
    test: list[str]
    methods: list[Method]
    train_sizes: list[int] = field(default_factory=lambda: [1, 10])
    draws: dict[int, int] = field(default_factory=dict)  # size -> number of draws (default 1)
    budget_pretrain: float = 1.0
    budget_finetune: float = 1.0
    encoder: str = "resnet50"
    pretrain: dict[str, Any] = field(default_factory=dict)  # shared PretrainConfig settings
    finetune: dict[str, Any] = field(default_factory=dict)  # shared FinetuneConfig settings
    hide_fraction: float = 0.0
    seed: int = 0  # draws of X_tr, pretraining, and fine-tuning unless ``seeds`` is given
    seeds: list[int] = field(default_factory=list)  # fine-tuning seeds, each run on every draw (default [seed])
    device: str = "auto"

    @property
    def finetune_seeds(self) -> list[int]:
        return list(self.seeds) or [self.seed]

    @property
    def budget_text(self) -> str:
        if self.budget_pretrain == self.budget_finetune:
            return f"budget {self.budget_pretrain:g} x the paper's"
        return f"budget {self.budget_pretrain:g} x the paper's pretraining, {self.budget_finetune:g} x its fine-tuning"


@dataclass(frozen=True)
class RunSpec:
    method: Method
    size: int
    draw: int
    cases: tuple[str, ...]
    seed: int = 0  # fine-tuning seed
    first_seed: bool = True  # the config's first fine-tuning seed: its runs keep the seedless folder name

    @property
    def folder(self) -> str:
        """``n<size>_d<draw>``, with ``_s<seed>`` for the second and later fine-tuning seeds."""
        return f"n{self.size}_d{self.draw}" + ("" if self.first_seed else f"_s{self.seed}")

    @property
    def key(self) -> str:
        return f"{self.method.name}/{self.folder}"


def load_experiment(path: str | Path) -> ExperimentConfig:
    """Read and check an experiment config (JSON); relative paths are taken from its folder.

    Raises:
        InputError: unreadable JSON, missing keys, unknown cases, overlapping splits, or sizes the pool cannot give.
    """
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"experiment config {path} could not be read as JSON ({exc})") from exc
    missing = [k for k in ("name", "data", "train_pool", "validation", "test", "methods") if k not in raw]
    if missing:
        raise InputError(f"experiment config {path} lacks {', '.join(missing)}")
    budget = raw.pop("budget", 1.0)
    budgets = budget if isinstance(budget, dict) else {"pretrain": budget, "finetune": budget}
    methods = [Method(m["name"], m.get("pretrain"), m.get("finetune", {}), m.get("atlas"), m.get("init"),
                      m.get("archive"), m.get("ensemble")) for m in raw.pop("methods")]
    data = Path(raw.pop("data"))
    cfg = ExperimentConfig(data=data if data.is_absolute() else (path.parent / data).resolve(), methods=methods,
                           budget_pretrain=float(budgets["pretrain"]), budget_finetune=float(budgets["finetune"]),
                           draws={int(k): int(v) for k, v in raw.pop("draws", {}).items()}, **raw)
    _check(cfg)
    return cfg


def _check(cfg: ExperimentConfig) -> None:
    names = [m.name for m in cfg.methods]
    if len(set(names)) != len(names) or not names:
        raise InputError("experiment methods need distinct names (and at least one method)")
    for m in cfg.methods:
        if m.atlas is not None and (m.pretrain is not None or m.finetune or m.archive):
            raise InputError(f"method {m.name}: an atlas method trains no model; drop its pretrain/finetune/archive "
                             "settings")
        if m.ensemble is not None:
            source = next((o for o in cfg.methods if o.name == m.ensemble.get("of")), None)
            seeds = list(m.ensemble.get("seeds", []))
            if source is None or source.seedless or m.pretrain is not None or m.finetune or m.archive:
                raise InputError(f"method {m.name}: an ensemble names a trained method of this config "
                                 '({"of": METHOD, "seeds": [...]}) and trains nothing itself')
            if len(seeds) < 2 or not set(seeds) <= set(cfg.finetune_seeds):
                raise InputError(f"method {m.name}: ensemble seeds must be 2 or more of the config's seeds "
                                 f"{cfg.finetune_seeds}")
        if m.archive is not None and not 0 < m.archive <= len(cfg.train_pool) - max(cfg.train_sizes):
            raise InputError(f"method {m.name}: archive must be 1..{len(cfg.train_pool) - max(cfg.train_sizes)} "
                             "(training-pool CTs outside the largest X_tr)")
    splits = {"train_pool": set(cfg.train_pool), "validation": set(cfg.validation), "test": set(cfg.test)}
    for a, b in (("train_pool", "validation"), ("train_pool", "test"), ("validation", "test")):
        if splits[a] & splits[b]:
            raise InputError(f"cases in both {a} and {b}: {', '.join(sorted(splits[a] & splits[b]))}")
    absent = [c for c in set().union(*splits.values()) if not (cfg.data / f"{c}_ct.nii.gz").exists()
              or not (cfg.data / f"{c}_oar.nii.gz").exists()]
    if absent:
        raise InputError(f"{cfg.data} lacks <case>_ct.nii.gz / <case>_oar.nii.gz for {', '.join(sorted(absent))}")
    if not (cfg.data / "labels.json").exists():
        raise InputError(f"{cfg.data} has no labels.json")
    if max(cfg.train_sizes) > len(cfg.train_pool):
        raise InputError(f"train size {max(cfg.train_sizes)} exceeds the training pool ({len(cfg.train_pool)})")
    if len(set(cfg.finetune_seeds)) != len(cfg.finetune_seeds):
        raise InputError(f"experiment seeds must be distinct, got {cfg.seeds}")
    if not 0.0 <= cfg.hide_fraction < 1.0:
        raise InputError("hide_fraction must be in [0, 1)")


def plan_runs(cfg: ExperimentConfig) -> list[RunSpec]:
    """Runs in the order they should be done: per size (smallest first), per method (config order), per
    fine-tuning seed, per draw. The draws depend on ``seed`` only, so every fine-tuning seed sees the same X_tr."""
    runs = []
    for size in sorted(cfg.train_sizes):
        draws = [tuple(sorted(np.random.default_rng([cfg.seed, size, d]).choice(cfg.train_pool, size, replace=False)
                              .tolist())) for d in range(cfg.draws.get(size, 1))]
        seeds = cfg.finetune_seeds
        for method in cfg.methods:
            runs += [RunSpec(method, size, d, cases, seed, seed == seeds[0])
                     for seed in seeds for d, cases in enumerate(draws)]
    return runs
