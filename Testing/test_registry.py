"""separeg.registry: torch-free, and every name it lists has its implementation (and nothing more)."""

from __future__ import annotations

import subprocess
import sys

from separeg import registry


def test_the_registry_imports_nothing_heavy() -> None:
    code = ("import sys, separeg.registry; heavy = {'torch', 'numpy', 'scipy', 'SimpleITK'} & set(sys.modules); "
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_each_name_has_one_implementation() -> None:
    from separeg.pretrain.config import DISTILL_LOSSES, STAGES
    from separeg.pretrain.encoders import ENCODERS
    from separeg.pretrain.ssl import METHODS
    from separeg.segment.finetune.objective import PARTIAL_LABEL_MODES
    from separeg.sis.regions import SEPARATION_EXTENTS, SEPARATION_MODES

    assert tuple(METHODS) == registry.SSL_METHODS
    assert tuple(ENCODERS) == registry.ENCODERS
    assert STAGES is registry.STAGES and tuple(registry.STAGE_TITLES) == registry.STAGES
    assert DISTILL_LOSSES is registry.DISTILL_LOSSES
    assert SEPARATION_MODES is registry.SEPARATIONS and SEPARATION_EXTENTS is registry.SEPARATION_EXTENTS
    assert PARTIAL_LABEL_MODES is registry.PARTIAL_LABEL_MODES


def test_the_paper_budgets_are_the_config_defaults() -> None:
    from separeg.pretrain.config import PretrainConfig
    from separeg.segment.finetune.config import FinetuneConfig

    assert PretrainConfig().iterations == registry.PAPER_PRETRAIN_ITERATIONS == 100_000
    assert FinetuneConfig().epochs == registry.PAPER_FINETUNE_EPOCHS == 200


def test_the_cli_offers_the_registry_choices() -> None:
    from separeg.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices
    choices = {(name, a.dest): tuple(a.choices) for name, p in sub.items() for a in p._actions if a.choices}
    assert choices[("pretrain", "method")] == registry.SSL_METHODS
    assert choices[("pretrain", "encoder")] == choices[("finetune", "encoder")] == registry.ENCODERS
    assert choices[("pretrain", "separation")] == registry.SEPARATIONS
    assert choices[("pretrain", "distill_loss")] == registry.DISTILL_LOSSES
    assert choices[("finetune", "partial_labels")] == registry.PARTIAL_LABEL_MODES
    assert choices[("finetune", "augmentation")] == registry.AUGMENTATIONS
    assert choices[("atlas", "fusion")] == registry.FUSIONS
    assert choices[("scan", "modality")] == choices[("pretrain", "modality")] == registry.MODALITIES
    assert choices[("export", "holes")] == registry.HOLE_CONVENTIONS
    assert choices[("evaluate", "unknown_labels")] == registry.UNKNOWN_LABEL_POLICIES
