"""Organ labels: label value, name, TG-263 name and display colour, filled from the registry of
:mod:`separeg.rt.organs`.

One table (:data:`~separeg.rt.organs.ORGAN_COLORS`, :data:`~separeg.rt.organs.SYNONYMS`) feeds the CLI, the Slicer
modules and every export, so an organ has the same TG-263 name and colour everywhere. A :class:`LabelTable` is what
a model bundle stores (:meth:`LabelTable.to_dict`); :func:`load_label_table` reads one from the OpenKBP
``labels.json``, our own JSON, a plain ``{"1": "spleen", ...}`` JSON mapping or a CSV file. Display names and SNOMED
CT / DICOM codes of the same organs (for DICOM SEG and Slicer terminology) are in :mod:`separeg.rt.terminology`:
:func:`terminology` (re-exported here).

Background (value 0) is implicit and never part of a table. In a label map of a training case, 0 means "not
contoured", which for an organ the case does not contour is *unknown*, not background (see
:mod:`separeg.segment.cases`).
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from separeg.rt.organs import RGB, _normalise, default_color, normalise_name, to_tg263
from separeg.rt.terminology import CodedConcept, Terminology, display_name, terminology
from separeg.runtime.atomic import write_json
from separeg.runtime.errors import InputError, read_text_table

__all__ = ["Label", "LabelTable", "load_label_table", "CodedConcept", "Terminology", "terminology", "display_name"]

TABLE_SCHEMA = 1
BACKGROUND_NAMES = ("background", "bg", "clear", "unlabeled", "unlabelled")

# ----------------------------------------------------------------------------------------------- table


@dataclass(frozen=True)
class Label:
    """One organ of a label map.

    Attributes:
        value: the voxel value in the label map, 1 or more (0 is background).
        name: the name shown to users and written to exports (as in the source data).
        tg263: the TG-263 name, "" when the structure has none in the registry.
        color: display colour, RGB 0-255.
    """

    value: int
    name: str
    tg263: str
    color: RGB

    def __post_init__(self) -> None:
        if isinstance(self.value, bool) or not isinstance(self.value, int):
            raise InputError(f"label value {self.value!r} ({self.name!r}) is not an integer; use whole numbers")
        if self.value < 1:
            raise InputError(f"label value {self.value} ({self.name!r}) is not allowed: 0 is the implicit background "
                             "and values are positive; number the organs from 1")
        if not isinstance(self.name, str) or not self.name.strip():
            raise InputError(f"label value {self.value} has no name; give every organ a name")
        color = tuple(self.color) if isinstance(self.color, tuple | list) else ()
        if len(color) != 3 or not all(isinstance(c, int) and not isinstance(c, bool) and 0 <= c <= 255 for c in color):
            raise InputError(f"label {self.name!r}: colour {self.color!r} is not three integers 0-255 (R, G, B)")
        object.__setattr__(self, "color", color)

    def to_dict(self) -> dict:
        return {"value": self.value, "name": self.name, "tg263": self.tg263, "color": list(self.color)}


@dataclass(frozen=True)
class LabelTable:
    """The organs of a label map, ordered by value; values, names and TG-263 names are unique.

    Raises:
        InputError: on construction, for duplicate values, names or TG-263 names.
    """

    labels: tuple[Label, ...]
    _by_value: Mapping[int, Label] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        labels = tuple(sorted(self.labels, key=lambda label: label.value))
        object.__setattr__(self, "labels", labels)
        _refuse_duplicates(labels, "value", lambda label: label.value)
        _refuse_duplicates(labels, "name", lambda label: label.name)
        # Names are matched ignoring case and punctuation (by_name, RTSTRUCT and SEG import): no two may look alike.
        _refuse_duplicates([label for label in labels if normalise_name(label.name)],
                           "name ignoring case, spaces and punctuation", lambda label: normalise_name(label.name))
        _refuse_duplicates([label for label in labels if label.tg263], "TG-263 name", lambda label: label.tg263)
        object.__setattr__(self, "_by_value", {label.value: label for label in labels})

    def __len__(self) -> int:
        return len(self.labels)

    def __iter__(self) -> Iterator[Label]:
        return iter(self.labels)

    @property
    def values(self) -> tuple[int, ...]:
        return tuple(label.value for label in self.labels)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(label.name for label in self.labels)

    def present_in(self, labels: np.ndarray, source: str = "the label map", hint: str = "") -> list[Label]:
        """The table's labels that occur in a label map, in value order; refuses values the table does not list.

        Raises:
            InputError: a non-zero value of ``labels`` has no label (the message names ``source`` and the table).
        """
        values = np.flatnonzero(np.bincount(labels.ravel())) if labels.dtype == np.uint8 else np.unique(labels)
        present = [int(v) for v in values if v != 0]
        unknown = [v for v in present if v not in self._by_value]
        if unknown:
            raise InputError(f"{source} has label values {', '.join(map(str, unknown))} that the label table does "
                             f"not list ({', '.join(f'{lb.value} {lb.name}' for lb in self)}); give the label table "
                             f"the label map was made with{hint}")
        return [self._by_value[v] for v in present]

    def by_value(self, value: int) -> Label:
        """The label with this voxel value.

        Raises:
            KeyError: no label has this value (the message lists the table's values).
        """
        try:
            return self._by_value[int(value)]
        except KeyError:
            raise KeyError(f"no label with value {value}; the table has {_format_values(self.values)}") from None

    def by_name(self, name: str) -> Label | None:
        """The label whose name or TG-263 name is ``name`` or a synonym of it (see :func:`to_tg263`), else None.

        A label whose own name matches is preferred to one that matches through TG-263 names.

        Raises:
            InputError: the name matches two labels (one by its name, the other by its TG-263 name).
        """
        key = _normalise(name)
        if not key:
            return None
        tg263 = to_tg263(name)
        found = [label for label in self.labels
                 if key in (_normalise(label.name), _normalise(label.tg263)) or (tg263 and label.tg263 == tg263)]
        exact = [label for label in found if _normalise(label.name) == key]
        if len(found) > 1 and len(exact) != 1:
            listed = ", ".join(f"{lb.value} {lb.name!r}" for lb in found)
            raise InputError(f"the name {name!r} matches the labels {listed}; rename one of them, or map the name "
                             "with a synonym table")
        return (exact or found or [None])[0]

    def to_dict(self) -> dict:
        """JSON-friendly form, as stored in model bundles: ``{"schema": 1, "labels": [{value, name, tg263, color}]}``"""
        return {"schema": TABLE_SCHEMA, "labels": [label.to_dict() for label in self.labels]}

    @classmethod
    def from_dict(cls, data: Mapping, *, source: str = "label table") -> LabelTable:
        """Inverse of :meth:`to_dict`; also accepts the OpenKBP and ``{"1": "name"}`` forms of :func:`load_label_table`.

        Missing TG-263 names and colours are filled from the registry.

        Raises:
            InputError: malformed content, duplicate or non-integer values, value 0 with an organ name.
        """
        return _table_from_json(data, source)

    @classmethod
    def from_names(cls, names: Iterable[str], *, merge_numbered_targets: bool = False) -> LabelTable:
        """A table numbering ``names`` 1, 2, ... in order, TG-263 names and colours from the registry."""
        return cls(tuple(_complete(value, name, None, None, merge_numbered_targets)
                         for value, name in enumerate(names, start=1)))

    def save(self, path: str | Path) -> Path:
        """Write :meth:`to_dict` as JSON, atomically."""
        return write_json(self.to_dict(), path)

    @classmethod
    def load(cls, path: str | Path) -> LabelTable:
        """Read a table written by :meth:`save` (or any form :func:`load_label_table` reads)."""
        return load_label_table(path)


def _refuse_duplicates(labels: Iterable[Label], what: str, key) -> None:
    seen: dict[object, Label] = {}
    for label in labels:
        other = seen.setdefault(key(label), label)
        if other is not label:
            raise InputError(f"labels {other.value} ({other.name!r}) and {label.value} ({label.name!r}) have the same "
                             f"{what} {key(label)!r}; each organ needs its own {what}. Merge or rename them.")


def _format_values(values: Iterable[int]) -> str:
    values = list(values)
    return "values " + ", ".join(map(str, values)) if values else "no values"


# ----------------------------------------------------------------------------------------------- reading


def load_label_table(path: str | Path, *, merge_numbered_targets: bool = False) -> LabelTable:
    """Read a label table from JSON or CSV.

    Accepted forms:

    - OpenKBP / TotalSegmentator JSON: ``{"index_to_name": {"1": "Brainstem", ...}, "index_to_tg263": {...}}``
      (``index_to_tg263`` optional);
    - our own JSON (:meth:`LabelTable.to_dict`): ``{"labels": [{"value", "name", "tg263", "color"}, ...]}``;
    - a plain JSON mapping ``{"1": "spleen", "2": "kidney_right", ...}``;
    - CSV (``.csv``, comma, semicolon or tab separated) with a header ``value,name[,tg263][,r,g,b]``.

    An entry for value 0 named "background" is skipped (background is implicit). Missing TG-263 names are looked
    up with :func:`to_tg263` from the name (none found: ""); given ones that are registry synonyms are written
    in their TG-263 form. Missing colours come from the registry, else from :func:`default_color`.

    Args:
        path: the file.
        merge_numbered_targets: see :func:`to_tg263`.

    Raises:
        InputError: the file is missing, unreadable or of another form; values are duplicated, not integers,
            or 0 for an organ; a colour is not three integers 0-255.
    """
    path = Path(path)
    text = read_text_table(path, "label table")
    suffix = path.suffix.lower()
    if suffix == ".json":
        try:
            data = json.loads(text, object_pairs_hook=_no_duplicate_keys)
        except json.JSONDecodeError as exc:
            raise InputError(f"label table {path} is not valid JSON (line {exc.lineno}: {exc.msg}); fix the file") \
                from exc
        except _DuplicateKeyError as exc:
            raise InputError(f"label table {path} has the key {exc.args[0]!r} twice; each value may appear once") \
                from exc
        return _table_from_json(data, str(path), merge_numbered_targets)
    if suffix in (".csv", ".tsv", ".txt"):
        return _table_from_csv(text, str(path), merge_numbered_targets)
    raise InputError(f"label table {path} has an unknown format; use .json (OpenKBP labels.json or a saved table) "
                     "or .csv with the columns value,name[,tg263][,r,g,b]")


class _DuplicateKeyError(ValueError):
    pass


def _no_duplicate_keys(pairs: list[tuple[str, object]]) -> dict:
    data: dict = {}
    for key, value in pairs:
        if key in data:
            raise _DuplicateKeyError(key)
        data[key] = value
    return data


def _parse_value(raw: object, source: str) -> int:
    if isinstance(raw, int) and not isinstance(raw, bool):
        return raw
    if isinstance(raw, str) and re.fullmatch(r"\s*[+-]?\d+\s*", raw):
        return int(raw)
    raise InputError(f"{source}: label value {raw!r} is not an integer; label values are whole numbers 1, 2, ...")


def _parse_color(raw: object, source: str, name: str) -> RGB | None:
    if raw is None or raw == "" or raw == []:
        return None
    parts = raw.replace(",", " ").split() if isinstance(raw, str) else raw
    try:
        color = tuple(_parse_value(c, source) for c in parts)  # type: ignore[union-attr]
    except (InputError, TypeError):
        color = ()
    if len(color) != 3 or not all(0 <= c <= 255 for c in color):
        raise InputError(f"{source}: colour {raw!r} of {name!r} is not three integers 0-255 (R, G, B)")
    return color  # type: ignore[return-value]


def _complete(value: int, name: str, tg263: str | None, color: RGB | None, merge_numbered_targets: bool) -> Label:
    name = name.strip()
    if tg263:
        tg263 = to_tg263(tg263, merge_numbered_targets=merge_numbered_targets) or tg263.strip()
    else:
        tg263 = to_tg263(name, merge_numbered_targets=merge_numbered_targets) or ""
    return Label(value, name, tg263, color or default_color(tg263, value))


def _entries_to_table(entries: list[tuple[object, object, object, object]], source: str,
                      merge_numbered_targets: bool) -> LabelTable:
    """``entries`` are raw ``(value, name, tg263, colour)``; checks them and fills TG-263 names and colours."""
    labels: list[Label] = []
    seen: dict[int, str] = {}
    for raw_value, raw_name, raw_tg263, raw_color in entries:
        value = _parse_value(raw_value, source)
        name = "" if raw_name is None else str(raw_name).strip()
        if value == 0:
            if name.lower() in BACKGROUND_NAMES or not name:
                continue
            raise InputError(f"{source}: value 0 is given to {name!r}, but 0 is the implicit background; "
                             "number the organs from 1 and leave 0 unlisted (or name it 'background')")
        if value in seen:
            raise InputError(f"{source}: value {value} is listed twice ({seen[value]!r} and {name!r}); "
                             "each value may appear once")
        seen[value] = name
        if not name:
            raise InputError(f"{source}: value {value} has no name; give every organ a name")
        tg263 = None if raw_tg263 is None else str(raw_tg263).strip()
        try:
            labels.append(_complete(value, name, tg263, _parse_color(raw_color, source, name), merge_numbered_targets))
        except InputError as exc:
            raise InputError(f"{source}: {exc}") from exc
    if not labels:
        raise InputError(f"{source} lists no organs (only background or nothing); list at least one value and name")
    try:
        return LabelTable(tuple(labels))
    except InputError as exc:
        raise InputError(f"{source}: {exc}") from exc


def _table_from_json(data: object, source: str, merge_numbered_targets: bool = False) -> LabelTable:
    if isinstance(data, Mapping) and "index_to_name" in data:  # OpenKBP, TotalSegmentator
        names, tg263 = data["index_to_name"], data.get("index_to_tg263") or {}
        if not isinstance(names, Mapping) or not isinstance(tg263, Mapping):
            raise InputError(f"{source}: index_to_name and index_to_tg263 must map values to names")
        entries = [(k, v, tg263.get(k), None) for k, v in names.items()]
    elif isinstance(data, Mapping) and "labels" in data:  # LabelTable.to_dict
        rows = data["labels"]
        if not isinstance(rows, list) or not all(isinstance(r, Mapping) for r in rows):
            raise InputError(f"{source}: 'labels' must be a list of {{value, name, tg263, color}} objects")
        missing = [i for i, r in enumerate(rows) if "value" not in r or "name" not in r]
        if missing:
            raise InputError(f"{source}: label entry {missing[0] + 1} has no 'value' or no 'name'; every entry needs "
                             "both")
        entries = [(r["value"], r["name"], r.get("tg263"), r.get("color")) for r in rows]
    elif isinstance(data, Mapping) and data and all(isinstance(v, str) for v in data.values()):  # {"1": "spleen"}
        entries = [(k, v, None, None) for k, v in data.items()]
    else:
        raise InputError(f"{source} is not a label table; expected OpenKBP's {{\"index_to_name\": ...}}, a saved "
                         "table {\"labels\": [...]} or {\"1\": \"name\", ...}")
    return _entries_to_table(entries, source, merge_numbered_targets)


def _table_from_csv(text: str, source: str, merge_numbered_targets: bool) -> LabelTable:
    lines = [line for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if not lines:
        raise InputError(f"{source} is empty; write a header value,name[,tg263][,r,g,b] and one row per organ")
    delimiter = max(",;\t", key=lines[0].count)
    reader = csv.reader(lines, delimiter=delimiter)
    header = [h.strip().lower() for h in next(reader)]
    if "value" not in header or "name" not in header:
        raise InputError(f"{source}: the header {lines[0]!r} lacks 'value' and 'name'; the first line must name the "
                         "columns value,name[,tg263][,r,g,b]")
    rgb = [c in header for c in "rgb"]
    if any(rgb) and not all(rgb):
        raise InputError(f"{source}: give all three colour columns r,g,b or none")
    index = {column: i for i, column in enumerate(header)}
    entries = []
    for line_number, row in enumerate(reader, start=2):
        if len(row) != len(header):
            raise InputError(f"{source}: row {line_number} has {len(row)} fields, the header {len(header)}; "
                             f"fix the row {delimiter.join(row)!r}")
        cell = {column: row[i].strip() for column, i in index.items()}
        color = [cell["r"], cell["g"], cell["b"]] if all(rgb) and any(cell[c] for c in "rgb") else None
        entries.append((cell["value"], cell["name"], cell.get("tg263") or None, color))
    return _entries_to_table(entries, source, merge_numbered_targets)
