"""`separeg evaluate PRED REF`: DSC, HD95 (mm) and volume difference per organ per case -> CSV, summary, box plots.

PRED and REF are two label-map files (NIfTI, NRRD, MHA) or two folders of them. In folders, a case is the file
name without its extension and the prediction of a case has the reference's name (``pred/pt_1.nii.gz`` is
compared with ``ref/pt_1.nii.gz``; the extensions may differ). A case with only one of the two files, unreadable
files or mismatched grids is listed as an error in the summary and skipped; the other cases are still evaluated.
The empty-mask policy and the HD95 convention are those of :mod:`separeg.evaluate.metrics`.

Organ names come from a label table in any form ``finetune`` and ``export`` read
(:func:`separeg.rt.labels.load_label_table`: ``segmentation.json`` of ``separeg contour``, ``labels.json``, OpenKBP's
``index_to_name``, CSV): ``--labels``, else
``segmentation.json`` or ``labels.json`` beside the reference, else beside the prediction; with none, organs are
``label_<n>``. Values the table does not list (255 is often "ignore") follow an explicit policy, ``unknown``:
``error`` (default: refused, as ``finetune`` refuses them) or ``ignore`` (voxels holding such a value in either map
are left out of every organ: background in both maps; the count is reported). Without a table every non-zero
value is an organ.

Outputs in ``out_dir``: ``metrics.csv`` (a row per case and organ), ``summary.md`` and ``summary.json`` (per organ
mean ± standard error over cases, as in the paper's tables), ``boxplots.png`` (DSC % and HD95 mm per organ).
"""

from __future__ import annotations

import csv
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np

from separeg.evaluate.metrics import (
    EMPTY_MASK_POLICY,
    HD95_CONVENTION,
    STATUS_MISSED,
    STATUS_NOT_IN_REFERENCE,
    STATUS_OK,
    OrganResult,
    organ_metrics,
)
from separeg.io.volumes import VOLUME_SUFFIXES, Geometry, is_volume_file, read_volume
from separeg.rt.labels import load_label_table
from separeg.runtime.atomic import atomic_path, write_json
from separeg.runtime.errors import InputError
from separeg.runtime.events import Events
from separeg.sis.figures import SMALL_N_NOTE, box_or_points

__all__ = ["EvaluateJob", "CaseError", "OrganSummary", "EvaluationResult", "case_name", "read_labels",
           "find_label_table", "match_cases", "read_label_pair", "summarise", "run_evaluate", "UNKNOWN_POLICIES",
           "LABEL_TABLE_NAMES"]

UNKNOWN_POLICIES = ("error", "ignore")
#: Label tables looked for beside the reference, then the prediction, when none is given.
LABEL_TABLE_NAMES = ("segmentation.json", "labels.json")


@dataclass(frozen=True)
class EvaluateJob:
    """What to evaluate.

    Attributes:
        pred: predicted label map, or a folder of them.
        ref: reference label map, or a folder of them (the same kind as ``pred``).
        out_dir: where the CSV, summaries and plot are written (created if missing).
        labels: a label table (any form of :func:`~separeg.rt.labels.load_label_table`); default: one of
            :data:`LABEL_TABLE_NAMES` beside the reference or the prediction; none: organs are ``label_<n>``.
        unknown: what to do with values the table does not list, one of :data:`UNKNOWN_POLICIES` (module doc).
    """

    pred: Path
    ref: Path
    out_dir: Path
    labels: Path | None = None
    unknown: str = "error"

    def __post_init__(self) -> None:
        if self.unknown not in UNKNOWN_POLICIES:
            raise InputError(f"unknown-label policy {self.unknown!r}: choose {' or '.join(UNKNOWN_POLICIES)}")


@dataclass(frozen=True)
class CaseError:
    case: str
    message: str


@dataclass(frozen=True)
class OrganSummary:
    """Mean ± standard error (std with ddof 1 / sqrt(n); None for n < 2) of one organ over the cases.

    ``n`` counts the cases whose reference holds the organ (``ok`` and ``missed``): the DSC and volume difference
    are averaged over them, a missed organ counting DSC 0. HD95 is averaged over the ``n_hd95`` cases where it is
    defined. For the "all organs" row (``organ`` None) each case contributes the mean over its evaluated organs.
    """

    organ: int | None
    name: str
    n: int
    dsc_mean_percent: float | None
    dsc_se_percent: float | None
    n_hd95: int
    hd95_mean_mm: float | None
    hd95_se_mm: float | None
    volume_diff_mean_percent: float | None
    volume_diff_se_percent: float | None
    n_missed: int
    n_not_in_reference: int
    n_predicted_not_in_reference: int  # of those, cases where the prediction does hold the organ


@dataclass
class EvaluationResult:
    results: list[OrganResult]
    errors: list[CaseError]
    organs: list[OrganSummary]
    overall: OrganSummary
    cases: list[str]
    metrics_csv: Path
    summary_md: Path
    summary_json: Path
    boxplots: Path


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
    return {label.value: label.tg263 or label.name for label in load_label_table(path)}


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


def _mean_se(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    array = np.asarray(values, float)
    se = float(array.std(ddof=1) / np.sqrt(len(array))) if len(array) >= 2 else None
    return float(array.mean()), se


def _summary(organ: int | None, name: str, dsc: list[float], hd: list[float], vol: list[float], missed: int,
             absent: int, predicted: int) -> OrganSummary:
    return OrganSummary(organ, name, len(dsc), *_mean_se([100.0 * d for d in dsc]), len(hd), *_mean_se(hd),
                        *_mean_se(vol), missed, absent, predicted)


def summarise(results: list[OrganResult]) -> tuple[list[OrganSummary], OrganSummary]:
    """Per-organ mean ± SE over cases, and the "all organs" row (per case: mean over its evaluated organs).

    Returns:
        ``(per-organ summaries in label order, all-organs summary)``.
    """
    organs = []
    for value in sorted({r.organ for r in results}):
        rows = [r for r in results if r.organ == value]
        present = [r for r in rows if r.status in (STATUS_OK, STATUS_MISSED)]
        absent = [r for r in rows if r.status == STATUS_NOT_IN_REFERENCE]
        organs.append(_summary(value, rows[0].name, [r.dsc for r in present],
                               [r.hd95_mm for r in present if r.hd95_mm is not None],
                               [r.volume_diff_percent for r in present],
                               sum(r.status == STATUS_MISSED for r in present), len(absent),
                               sum(r.volume_pred_ml > 0 for r in absent)))
    dsc, hd, vol = [], [], []
    for case in dict.fromkeys(r.case for r in results):
        present = [r for r in results if r.case == case and r.status in (STATUS_OK, STATUS_MISSED)]
        if present:
            dsc.append(float(np.mean([r.dsc for r in present])))
            vol.append(float(np.mean([r.volume_diff_percent for r in present])))
        defined = [r.hd95_mm for r in present if r.hd95_mm is not None]
        if defined:
            hd.append(float(np.mean(defined)))
    overall = _summary(None, "All organs", dsc, hd, vol, sum(o.n_missed for o in organs),
                       sum(o.n_not_in_reference for o in organs), sum(o.n_predicted_not_in_reference for o in organs))
    return organs, overall


def _cell(value) -> str:
    if value is None:
        return ""
    return format(value, ".6g") if isinstance(value, float) else str(value)


def _write_csv(results: list[OrganResult], path: Path) -> Path:
    names = [f.name for f in fields(OrganResult)]
    with atomic_path(path) as tmp, tmp.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(names)
        writer.writerows([_cell(getattr(r, n)) for n in names] for r in results)
    return path


def _pm(mean: float | None, se: float | None, digits: int) -> str:
    if mean is None:
        return "–"
    return f"{mean:.{digits}f}" + (" (one case: no SE)" if se is None else f" ± {se:.{digits}f}")


def _markdown(job: EvaluateJob, cases: list[str], organs: list[OrganSummary], overall: OrganSummary,
              errors: list[CaseError]) -> str:
    lines = ["# Evaluation", "", f"Prediction `{job.pred}`, reference `{job.ref}`: {len(cases)} case(s) evaluated, "
             f"{len(errors)} error(s).", "",
             "| Organ | n | DSC (%) mean ± SE | HD95 (mm) mean ± SE | n HD95 | Volume diff. (%) mean ± SE | missed "
             "| not in reference |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for s in [*organs, overall]:
        name = f"**{s.name}**" if s.organ is None else s.name
        lines.append(f"| {name} | {s.n} | {_pm(s.dsc_mean_percent, s.dsc_se_percent, 1)} | "
                     f"{_pm(s.hd95_mean_mm, s.hd95_se_mm, 2)} | {s.n_hd95} | "
                     f"{_pm(s.volume_diff_mean_percent, s.volume_diff_se_percent, 1)} | {s.n_missed} | "
                     f"{s.n_not_in_reference} |")
    lines += ["", "SE: standard error over cases, std (ddof 1) / sqrt(n); none for one case. n: cases whose reference "
              "holds the organ. All organs: each case's mean over its evaluated organs, then mean ± SE over cases.",
              "", f"Empty masks: {EMPTY_MASK_POLICY}", "", HD95_CONVENTION, ""]
    if errors:
        lines += ["## Errors (cases not evaluated)", ""]
        lines += [f"- `{e.case}`: {e.message}".replace("\n", " ") for e in errors]
        lines.append("")
    return "\n".join(lines)


def _boxplots(results: list[OrganResult], organs: list[OrganSummary], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (("DSC (%), missed organs count 0", lambda r: 100.0 * r.dsc if r.dsc is not None else None),
              ("HD95 (mm), where defined", lambda r: r.hd95_mm))
    fig, axes = plt.subplots(2, 1, figsize=(max(6.0, 0.9 * len(organs) + 1.5), 7.0), squeeze=False)
    for ax, (title, value) in zip(axes[:, 0], panels, strict=True):
        data = [[v for r in results if r.organ == o.organ and (v := value(r)) is not None] for o in organs]
        small = box_or_points(ax, data)
        ax.set_xticks(range(1, len(organs) + 1), [o.name for o in organs], rotation=30, ha="right")
        ax.set_xlim(0.4, len(organs) + 0.6)
        if title.startswith("DSC"):
            ax.set_ylim(-2, 102)
        else:
            ax.set_ylim(0, max(1.0, 1.08 * max((max(d) for d in data if d), default=0.0)))
        ax.set_title(f"{title}; {SMALL_N_NOTE}" if small else title, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)
    return path


def run_evaluate(job: EvaluateJob, events: Events | None = None) -> EvaluationResult:
    """Evaluate predictions against references; write ``metrics.csv``, ``summary.md``, ``summary.json`` and
    ``boxplots.png`` into ``job.out_dir`` (each written atomically).

    Args:
        job: what to compare and where to write.
        events: progress (stage ``"evaluate"``, one step per case), a warning per skipped case, a closing log line.

    Returns:
        Every :class:`OrganResult` (a row per case and organ, label order), the cases skipped with their reason,
        the per-organ and all-organs summaries and the output paths.

    Raises:
        InputError: bad paths or labels file; for two files, any problem with the pair (unreadable, not a label
            map, grids differ); for folders, no case could be evaluated.
    """
    events = events or Events()
    pairs, errors = match_cases(Path(job.pred), Path(job.ref))
    table = Path(job.labels) if job.labels else find_label_table(Path(job.pred), Path(job.ref))
    names = read_labels(table) if table else {}
    if table and not job.labels:
        events.log(f"organ names from {table}", stage="evaluate")
    single = Path(job.ref).is_file()
    for error in errors:
        events.warning(f"{error.case} skipped: {error.message}", stage="evaluate")
    results: list[OrganResult] = []
    cases: list[str] = []
    events.progress("evaluate", 0, len(pairs))
    for i, (case, pred_path, ref_path) in enumerate(pairs, start=1):
        try:
            pred, ref, spacing = read_label_pair(pred_path, ref_path)
            left_out = _apply_policy(pred, ref, names, job.unknown, case, table) if names else 0
        except InputError as exc:
            if single:
                raise
            errors.append(CaseError(case, str(exc)))
            events.warning(f"{case} skipped: {exc}", stage="evaluate")
            events.progress("evaluate", i, len(pairs))
            continue
        if left_out:
            events.warning(f"{case}: {left_out} voxels hold values not in {table}; left out (--unknown-labels "
                           "ignore)", stage="evaluate")
        present = set(np.unique(ref).tolist()) | set(np.unique(pred).tolist())
        labels = {v: names.get(v, f"label_{v}") for v in (set(names) | present) - {0}}
        results += organ_metrics(pred, ref, spacing, labels, case=case)
        cases.append(case)
        events.progress("evaluate", i, len(pairs))
    if not cases:
        raise InputError("no case could be evaluated:\n" + "\n".join(f"  {e.case}: {e.message}" for e in errors))
    results = _complete(results, cases)
    organs, overall = summarise(results)

    out = Path(job.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    metrics_csv = _write_csv(results, out / "metrics.csv")
    summary_md = out / "summary.md"
    with atomic_path(summary_md) as tmp:
        tmp.write_text(_markdown(job, cases, organs, overall, errors), encoding="utf-8")
    summary_json = write_json({
        "pred": str(job.pred), "ref": str(job.ref), "labels": str(table) if table else None,
        "unknown_labels": job.unknown if table else "no label table: every non-zero value is an organ",
        "cases": cases, "errors": [asdict(e) for e in errors], "empty_mask_policy": EMPTY_MASK_POLICY,
        "hd95": HD95_CONVENTION, "organs": [asdict(o) for o in organs], "all_organs": asdict(overall),
    }, out / "summary.json")
    boxplots = _boxplots(results, organs, out / "boxplots.png")
    events.log(f"{len(cases)} case(s) evaluated, {len(errors)} error(s); all organs: DSC "
               f"{_pm(overall.dsc_mean_percent, overall.dsc_se_percent, 1)} %, HD95 "
               f"{_pm(overall.hd95_mean_mm, overall.hd95_se_mm, 2)} mm", stage="evaluate")
    return EvaluationResult(results, errors, organs, overall, cases, metrics_csv, summary_md, summary_json, boxplots)


def _complete(results: list[OrganResult], cases: list[str]) -> list[OrganResult]:
    """Add a ``not_in_reference`` row (both maps empty) for every organ seen in some case but absent from another."""
    names = {r.organ: r.name for r in results}
    have = {(r.case, r.organ) for r in results}
    results = results + [OrganResult(c, v, names[v], STATUS_NOT_IN_REFERENCE, None, None, None, None, 0.0, 0.0, None)
                         for c in cases for v in names if (c, v) not in have]
    order = {c: i for i, c in enumerate(cases)}
    return sorted(results, key=lambda r: (order[r.case], r.organ))
