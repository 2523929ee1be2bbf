"""The inputs of ``separeg evaluate``: prediction/reference pairs matched by case name, label maps read and checked
against each other (grid, spacing), organ names from a label table, and the policy for values the table lacks."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from separeg.io.volumes import VOLUME_SUFFIXES, Geometry, is_volume_file, read_volume
from separeg.rt.labels import load_label_table
from separeg.runtime.errors import InputError

__all__ = ["CaseError", "case_name", "read_labels", "find_label_table", "match_cases", "read_label_pair",
           "LABEL_TABLE_NAMES"]


#: Label tables looked for beside the reference, then the prediction, when none is given.
LABEL_TABLE_NAMES = ("segmentation.json", "labels.json")


@dataclass(frozen=True)
class CaseError:
    case: str
    message: str


def case_name(path: Path) -> str:
    """File name without its volume extension: ``pt_1.nii.gz`` -> ``pt_1``."""
    name = path.name
    suffix = next((s for s in VOLUME_SUFFIXES if name.lower().endswith(s)), path.suffix)
    return name[: len(name) - len(suffix)]


def read_labels(path: Path) -> dict[int, str]:
    """Organ names (TG-263 name where known, else the table's name) by value from any label table form.

    Raises:
        InputError: see :func:`~separeg.rt.labels.load_label_table`.
    """
    names = {label.value: label.tg263 or label.name for label in load_label_table(path)}
    return {**names, **_not_contoured(Path(path))}


def _not_contoured(path: Path) -> dict[int, str]:
    """The organs ``separeg contour`` left out of a ``segmentation.json`` (a model that never learned them): still
    organs of the table, so a reference holding one scores it as missed instead of an unknown value (issue 30)."""
    import json

    if path.suffix.lower() != ".json":
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}  # load_label_table has read it already; not JSON of this kind
    left_out = data.get("not_contoured") if isinstance(data, dict) else None
    return {int(o["value"]): o.get("tg263") or o["name"] for o in left_out or []}


def find_label_table(pred: Path, ref: Path) -> Path | None:
    """The first of :data:`LABEL_TABLE_NAMES` beside the reference, then beside the prediction (file or folder)."""
    for path in (Path(ref), Path(pred)):
        folder = path if path.is_dir() else path.parent
        for name in LABEL_TABLE_NAMES:
            if (folder / name).is_file():
                return folder / name
    return None


def _apply_policy(pred: np.ndarray, ref: np.ndarray, names: dict[int, str], policy: str, case: str,
                  table: Path) -> int:
    """Values of ``pred``/``ref`` not in ``names``: refused (``error``) or set to background in both maps where
    either holds one (``ignore``; returns the number of voxels left out). Arrays are changed in place."""
    known = np.zeros(max(int(pred.max(initial=0)), int(ref.max(initial=0)), max(names, default=0)) + 1, bool)
    known[0] = True
    known[list(names)] = True
    bad = ~known[pred] | ~known[ref]
    if not bad.any():
        return 0
    values = sorted(set(np.unique(ref[bad]).tolist() + np.unique(pred[bad]).tolist()) - set(names) - {0})
    if policy == "error":
        raise InputError(f"{case}: label value(s) {', '.join(map(str, values))} are not in the label table {table} "
                         f"({', '.join(f'{v} {n}' for v, n in sorted(names.items()))}); give the table the maps were "
                         "made with, or --unknown-labels ignore to leave those voxels out (e.g. 255 = ignore)")
    pred[bad] = 0
    ref[bad] = 0
    return int(bad.sum())


def _volume_files(folder: Path) -> tuple[dict[str, Path], list[CaseError]]:
    files: dict[str, Path] = {}
    errors = []
    for path in sorted(p for p in folder.iterdir() if p.is_file() and is_volume_file(p)):
        name = case_name(path)
        if name in files:
            errors.append(CaseError(name, f"two files for one case in {folder}: {files[name].name} and {path.name}"))
        files[name] = path
    return files, errors


def match_cases(pred: Path, ref: Path) -> tuple[list[tuple[str, Path, Path]], list[CaseError]]:
    """Pair predictions with references.

    Returns:
        ``([(case, pred_file, ref_file), ...], errors)``: two files make one case named after the reference;
        two folders are matched by case name, unmatched and ambiguous cases become errors.

    Raises:
        InputError: a path is missing, one is a file and the other a folder, or a folder holds no label map.
    """
    pred, ref = Path(pred), Path(ref)
    for what, path in (("prediction", pred), ("reference", ref)):
        if not path.exists():
            raise InputError(f"{what} {path} does not exist")
    if pred.is_file() and ref.is_file():
        return [(case_name(ref), pred, ref)], []
    if not (pred.is_dir() and ref.is_dir()):
        raise InputError(f"give two label-map files or two folders of them; got {pred} and {ref}")
    pred_files, errors = _volume_files(pred)
    ref_files, ref_errors = _volume_files(ref)
    errors += ref_errors
    for what, folder, found in (("prediction", pred, pred_files), ("reference", ref, ref_files)):
        if not found:
            raise InputError(f"{what} folder {folder} holds no label map ({', '.join(VOLUME_SUFFIXES)})")
    ambiguous = {e.case for e in errors}
    errors += [CaseError(c, f"no prediction in {pred} for reference {ref_files[c].name}")
               for c in sorted(set(ref_files) - set(pred_files) - ambiguous)]
    errors += [CaseError(c, f"no reference in {ref} for prediction {pred_files[c].name}")
               for c in sorted(set(pred_files) - set(ref_files) - ambiguous)]
    pairs = [(c, pred_files[c], ref_files[c]) for c in sorted(set(pred_files) & set(ref_files)) if c not in ambiguous]
    return pairs, errors


def _label_array(path: Path):
    import SimpleITK as sitk

    image = read_volume(path)
    array = sitk.GetArrayFromImage(image)
    if not np.issubdtype(array.dtype, np.integer):
        if not np.all(np.isfinite(array)) or not np.array_equal(array, np.round(array)):
            raise InputError(f"{path} holds non-integer values ({array.dtype}); a label map is needed, not an image "
                             "or probabilities")
        array = array.astype(np.int32)
    if array.size and array.min() < 0:
        raise InputError(f"{path} holds negative values; label maps use 0 for background and 1.. for organs")
    return array, image


def read_label_pair(pred: Path, ref: Path) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
    """Read two label maps that must share one grid.

    Returns:
        ``(pred, ref, spacing)``: ``(Z, Y, X)`` integer arrays and the spacing ``(sx, sy, sz)`` in mm.

    Raises:
        InputError: unreadable file, not a label map, or the grids differ (both geometries in the message).
    """
    pred_array, pred_image = _label_array(pred)
    ref_array, ref_image = _label_array(ref)
    g_pred, g_ref = Geometry.of(pred_image), Geometry.of(ref_image)
    if not g_pred.matches(g_ref):
        raise InputError(f"prediction and reference are not on the same grid; resample the prediction onto the "
                         f"reference:\n  prediction {pred}: {g_pred.describe()}"
                         f"\n  reference  {ref}: {g_ref.describe()}")
    return pred_array, ref_array, tuple(float(s) for s in g_ref.spacing)
