"""Each parameter written once: the config dataclass fields carry their flags; the CLI is generated from them."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

import pytest

from separeg.cli import build_parser
from separeg.pretrain.config import PretrainConfig
from separeg.runtime.flags import add_flags, config_from_args, flag, flag_fields, positive_int
from separeg.segment.finetune_config import FinetuneConfig
from separeg.sis.regions import SISConfig


def _subparser(name: str) -> argparse.ArgumentParser:
    parser = build_parser()
    return next(a for a in parser._actions if a.dest == "command").choices[name]


@pytest.mark.parametrize(("command", "configs"), [("pretrain", (PretrainConfig, SISConfig)),
                                                  ("finetune", (FinetuneConfig,)), ("regions", (SISConfig,))])
def test_every_flag_field_is_an_option_and_defaults_are_the_configs(command: str, configs: tuple) -> None:
    options = {o: a for a in _subparser(command)._actions for o in a.option_strings}
    for cls in configs:
        for f, spec in flag_fields(cls):
            action = options[spec.option(f.name)]
            assert action.help and not (isinstance(f.default, int | float) and not isinstance(f.default, bool)
                                        and f.default is not None and str(f.default) in action.help
                                        and "%(default)s" not in action.help), f"{f.name}: default written by hand"


def test_parsing_no_flags_gives_the_default_configs(tmp_path) -> None:
    args = build_parser().parse_args(["pretrain", str(tmp_path), "--out", str(tmp_path / "run")])
    assert config_from_args(PretrainConfig, args) == PretrainConfig()
    args = build_parser().parse_args(["finetune", str(tmp_path), "--out", str(tmp_path / "run")])
    assert config_from_args(FinetuneConfig, args) == FinetuneConfig()


def test_flag_kinds_and_nested_configs() -> None:
    @dataclass(frozen=True)
    class Inner:
        size: int = field(default=3, metadata=flag("size (%(default)s)", type=positive_int))

    @dataclass(frozen=True)
    class Outer:
        name: str = field(default="a", metadata=flag("name", choices=("a", "b")))
        on: bool = field(default=True, metadata=flag("switch off", negate=True))
        both: bool = field(default=False, metadata=flag("either way", optional=True))
        inner: Inner = field(default_factory=Inner)
        hidden: float = 0.5

    parser = argparse.ArgumentParser()
    add_flags(parser, Outer)
    add_flags(parser, Inner)
    assert config_from_args(Outer, parser.parse_args([])) == Outer()
    got = config_from_args(Outer, parser.parse_args(["--name", "b", "--no-on", "--both", "--size", "7"]), hidden=1.0)
    assert got == Outer("b", False, True, Inner(7), 1.0)
    assert "size (3)" in parser.format_help()
    with pytest.raises(SystemExit):
        parser.parse_args(["--size", "0"])
