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

from separeg.evaluate.inputs import (
    CaseError,
    _apply_policy,
    find_label_table,
    match_cases,
    read_label_pair,
    read_labels,
)
from separeg.evaluate.metrics import (
    EMPTY_MASK_POLICY,
    HD95_CONVENTION,
    STATUS_MISSED,
    STATUS_NOT_IN_REFERENCE,
    STATUS_OK,
    OrganResult,
    organ_metrics,
)
from separeg.registry import UNKNOWN_LABEL_POLICIES as UNKNOWN_POLICIES
from separeg.runtime.atomic import atomic_path, write_json
from separeg.runtime.errors import InputError
from separeg.runtime.events import Events
from separeg.sis.figures import SMALL_N_NOTE, box_or_points

__all__ = ["EvaluateJob", "OrganSummary", "EvaluationResult", "summarise", "run_evaluate", "UNKNOWN_POLICIES"]



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
