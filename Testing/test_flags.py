"""Each parameter written once: the config dataclass fields carry their flags; the CLI is generated from them."""

from __future__ import annotations

import argparse
import inspect
from dataclasses import MISSING, dataclass, field
from pathlib import Path

import pytest

from separeg.cli import build_parser
from separeg.pretrain.config import PretrainConfig, PretrainJob
from separeg.runtime.flags import add_flags, config_from_args, flag, flag_fields, positive_int
from separeg.segment.finetune.config import FinetuneConfig, FinetuneJob
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


@pytest.mark.parametrize(("command", "job"), [("pretrain", PretrainJob), ("finetune", FinetuneJob)])
def test_job_fields_are_the_flags_and_parse_into_the_job(command: str, job: type, tmp_path) -> None:
    options = {o: a for a in _subparser(command)._actions for o in a.option_strings or [a.dest]}
    for f, spec in flag_fields(job):
        action = options[spec.option(f.name)]
        assert action.help and (f.default is MISSING or action.default == f.default), f.name
    args = build_parser().parse_args([command, str(tmp_path), "--out", str(tmp_path / "run")])
    assert config_from_args(job, args) == job(tmp_path, tmp_path / "run")  # the default job and config
    with pytest.raises(SystemExit):
        build_parser().parse_args([command, str(tmp_path), "--out", "run", "--resume", "--restart"])
    with pytest.raises(SystemExit):
        build_parser().parse_args([command, str(tmp_path / "missing"), "--out", "run"])


def test_pretrain_and_finetune_flags_reach_their_jobs(tmp_path) -> None:
    args = build_parser().parse_args(["pretrain", str(tmp_path), "--out", "run", "--stages", "sis, inter", "--resume",
                                      "--stop-file", "stop", "--checkpoint-minutes", "2", "--workers", "3",
                                      "--device", "cpu", "--clusters", "4"])
    assert config_from_args(PretrainJob, args) == PretrainJob(
        tmp_path, Path("run"), config=PretrainConfig(clusters=4), device="cpu", resume=True, stop_file=Path("stop"),
        checkpoint_minutes=2.0, stages=("sis", "inter"), workers=3)
    args = build_parser().parse_args(["finetune", str(tmp_path), "--out", "run", "--labels", str(tmp_path), "--init",
                                      "model", "--synonyms", str(tmp_path), "--validation", str(tmp_path),
                                      "--unlabelled", str(tmp_path), "--mean-teacher", "--restart"])
    assert config_from_args(FinetuneJob, args) == FinetuneJob(
        tmp_path, Path("run"), labels=tmp_path, init="model", synonyms=tmp_path, validation_data=tmp_path,
        unlabelled=tmp_path, config=FinetuneConfig(mean_teacher=True), restart=True)


def test_no_job_field_is_written_by_hand_in_the_cli_or_the_handlers() -> None:
    """The pretrain and finetune parsers and handlers take every job field from its flag: none is named there."""
    from separeg import cli, commands

    sources = {job: [inspect.getsource(fn) for fn in functions] for job, functions in (
        (PretrainJob, (cli._add_pretrain, cli._pretrain_command, commands.run_pretrain)),
        (FinetuneJob, (cli._add_finetune, cli._finetune_command, commands.run_finetune)))}
    for job, texts in sources.items():
        for f, spec in flag_fields(job):
            for text in texts:
                assert f'"{spec.option(f.name)}"' not in text and f"args.{spec.dest(f.name)}" not in text, f.name
