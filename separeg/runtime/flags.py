"""Each parameter written once: a config dataclass field carries its command-line flag (name, help, type check,
choices) as field metadata, and the parser and the config-from-arguments mapping are generated from the fields.

A field becomes ``--field-name`` unless its :func:`flag` names another; ``help`` may use ``%(default)s``, which
argparse fills with the field's default. A boolean field is a switch: ``negate=True`` gives ``--no-...`` (the field
is True unless it is given), ``optional=True`` gives ``--x/--no-x``, otherwise ``--x`` sets it. A field whose
default is a config dataclass with flags of its own (``PretrainConfig.sis``, ``PretrainJob.config``) is built from
the same arguments. Job dataclasses (``PretrainJob``, ``FinetuneJob``) declare their flags the same way: a ``name``
without dashes is a positional argument, ``exists=True`` checks that a path exists, ``exclusive`` puts flags in one
mutually exclusive group (``--resume | --restart``).

May import: the standard library only.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from dataclasses import MISSING, Field, dataclass, fields, is_dataclass
from pathlib import Path
from typing import Any

__all__ = ["Flag", "flag", "add_flags", "config_from_args", "existing_path", "flag_fields", "positive_int", "RUN_FLAGS",
           "WORKERS_HELP"]

_KEY = "separeg.flag"


def positive_int(text: str) -> int:
    """argparse type: an integer of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def existing_path(text: str) -> Path:
    """argparse type: a path that exists (``~`` expanded)."""
    path = Path(text).expanduser()
    if not path.exists():
        raise argparse.ArgumentTypeError(f"{text} does not exist")
    return path


@dataclass(frozen=True)
class Flag:
    """The command-line side of one config field (see :func:`flag`)."""

    help: str
    name: str | None = None
    type: Callable[[str], Any] | None = None
    choices: Sequence[str] | None = None
    metavar: str | None = None
    negate: bool = False
    optional: bool = False
    group: str | None = None
    required: bool = False
    exists: bool = False
    exclusive: str | None = None

    def option(self, field_name: str) -> str:
        return self.name or "--" + ("no-" if self.negate else "") + field_name.replace("_", "-")

    def dest(self, field_name: str) -> str:
        return self.option(field_name).lstrip("-").replace("-", "_")


def flag(help: str, *, name: str | None = None, type: Callable[[str], Any] | None = None,
         choices: Sequence[str] | None = None, metavar: str | None = None, negate: bool = False,
         optional: bool = False, group: str | None = None, required: bool = False, exists: bool = False,
         exclusive: str | None = None) -> dict[str, Flag]:
    """Field metadata that makes a config field a command-line flag: ``field(default=..., metadata=flag(...))``.

    Args:
        help: the flag's help; ``%(default)s`` shows the field's default.
        name: the option (``--separation``) when it is not ``--`` + the field name with dashes; without dashes
            (``archive``), a positional argument.
        type: argparse type (a converter that raises ``argparse.ArgumentTypeError``), e.g. :func:`positive_int`;
            default: the type of the field's default (str when it is None).
        choices: the allowed values (from :mod:`separeg.registry`).
        metavar: the value's name in the help.
        negate: a boolean field that is True unless ``--no-<field>`` is given.
        optional: a boolean field given as ``--<field>/--no-<field>``.
        group: the key of the argument group it is listed in (see :func:`add_flags`).
        required: an option that must be given (``--out``).
        exists: the value is a path that must exist (:func:`existing_path`).
        exclusive: the key of a mutually exclusive group within the flag's argument group.
    """
    return {_KEY: Flag(help, name, type, choices, metavar, negate, optional, group, required, exists, exclusive)}


def flag_fields(cls: type) -> list[tuple[Field, Flag]]:
    """The fields of a config dataclass that are flags, in field order."""
    return [(f, f.metadata[_KEY]) for f in fields(cls) if _KEY in f.metadata]


def _default(f: Field) -> Any:
    if f.default is not MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not MISSING else None


def add_flags(parser: argparse.ArgumentParser | argparse._ArgumentGroup, cls: type,
              groups: dict[str | None, argparse._ArgumentGroup] | None = None) -> None:
    """Add the flags of ``cls``'s fields to ``parser``; a flag with ``group=key`` goes to ``groups[key]``. A field
    whose default is a config with flags of its own and whose name is a key of ``groups`` (``PretrainJob.config``)
    has its config's flags added there, in field order (so ``--help`` lists them where the field is)."""
    groups = groups or {}
    exclusive: dict[tuple[str | None, str], argparse._MutuallyExclusiveGroup] = {}
    for f in fields(cls):
        spec = f.metadata.get(_KEY)
        if spec is None:
            if f.name in groups and is_dataclass(default := _default(f)) and flag_fields(type(default)):
                add_flags(groups[f.name], type(default), groups)
            continue
        target = groups.get(spec.group, parser)
        if spec.exclusive is not None:
            key = (spec.group, spec.exclusive)
            target = exclusive[key] if key in exclusive else exclusive.setdefault(
                key, target.add_mutually_exclusive_group())
        default = _default(f)
        if isinstance(default, bool):
            if spec.optional:
                target.add_argument(spec.option(f.name), action=argparse.BooleanOptionalAction, default=default,
                                    help=spec.help)
            else:  # a switch: --x sets the field, --no-x (negate) clears it
                target.add_argument(spec.option(f.name), action="store_true", help=spec.help)
            continue
        kind = spec.type or (type(default) if default is not None and not spec.choices else None)
        if spec.exists:
            kind = existing_path
        extra: dict[str, Any] = {"metavar": spec.metavar} if spec.metavar else {}
        if spec.option(f.name).startswith("-"):  # an option (a positional argument has no default)
            extra.update(default=default, required=spec.required)
        target.add_argument(spec.option(f.name), type=kind, choices=spec.choices, help=spec.help, **extra)


def config_from_args(cls: type, args: argparse.Namespace, **overrides: Any) -> Any:
    """``cls`` built from parsed arguments: every flag field from its flag, nested flag configs likewise, the rest
    at their defaults; ``overrides`` win."""
    values: dict[str, Any] = {}
    for f in fields(cls):
        if not f.init or f.name in overrides:
            continue
        spec = f.metadata.get(_KEY)
        if spec is not None:
            value = getattr(args, spec.dest(f.name))
            values[f.name] = (not value) if spec.negate else value
        elif is_dataclass(default := _default(f)) and flag_fields(type(default)):
            values[f.name] = config_from_args(type(default), args)
    return cls(**values, **overrides)


WORKERS_HELP = "CPU threads for reading and separation (default: all cores)"

#: The flags every training job shares (``PretrainJob``, ``FinetuneJob``), written once here:
#: ``field(default=..., metadata=RUN_FLAGS[name])``.
RUN_FLAGS: dict[str, dict[str, Flag]] = {
    "device": flag("auto (CUDA, MPS, CPU), cpu, cuda, cuda:N or mps", group="running"),
    "resume": flag("insist on resuming an existing run", group="running", exclusive="mode"),
    "restart": flag("discard the run's progress and start over", group="running", exclusive="mode"),
    "stop_file": flag("stop cleanly (checkpoint first) when this file appears; used by Slicer", type=Path,
                      group="running"),
    "checkpoint_minutes": flag("save at least this often (%(default)s minutes)", group="running"),
    "workers": flag(WORKERS_HELP, type=positive_int),
}
