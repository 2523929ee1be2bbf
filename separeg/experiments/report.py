"""The report of an experiment (:mod:`separeg.experiments.protocol`), rebuilt from whatever runs have finished.

Per method and training-set size: DSC (%) and HD95 (mm) per organ and over all organs, mean ± standard error
over the test patients (a patient's value is first averaged over its runs, draws of X_tr x fine-tuning seeds; a
missed organ counts DSC 0 and has no HD95; an organ counts only in patients whose reference contours it), and the
seconds it took
to contour a test case (``seconds.json`` of each run; mean ± standard error over the test cases). Written as
``results.md`` (the paper's table layout), ``results.csv``, ``boxplots_n<size>.png`` and ``learning_curve.png``.
"""

from __future__ import annotations

import csv
import datetime
import json
import textwrap
from collections import defaultdict
from pathlib import Path

import numpy as np

from separeg.registry import PAPER_FINETUNE_EPOCHS, PAPER_PRETRAIN_ITERATIONS
from separeg.runtime.atomic import atomic_path
from separeg.sis.figures import SMALL_N_NOTE, box_or_points

__all__ = ["collect", "seconds_per_case", "summarise", "write_report"]

ALL = "All OARs"


def collect(cfg, out: Path) -> dict[tuple[str, int], dict[str, dict[str, list[tuple[float, float | None]]]]]:
    """``{(method, size): {organ: {patient: [(dsc, hd95), ...one per finished run (draw x seed)]}}}``."""
    results: dict = {}
    for method in cfg.methods:
        for size in cfg.train_sizes:
            for metrics in sorted((out / "runs" / method.name).glob(f"n{size}_d*/metrics.csv")):
                organs = results.setdefault((method.name, size), defaultdict(lambda: defaultdict(list)))
                with open(metrics, newline="", encoding="utf-8") as f:
                    for row in csv.DictReader(f):
                        if row["status"] not in ("ok", "missed"):
                            continue
                        dsc = float(row["dsc"]) if row["status"] == "ok" and row["dsc"] else 0.0
                        hd95 = float(row["hd95_mm"]) if row["status"] == "ok" and row["hd95_mm"] else None
                        organs[row["name"]][row["case"]].append((dsc, hd95))
    return results


def _mean_se(values: list[float]) -> tuple[float | None, float | None, int]:
    if not values:
        return None, None, 0
    array = np.asarray(values, dtype=float)
    se = float(array.std(ddof=1) / np.sqrt(len(array))) if len(array) > 1 else None
    return float(array.mean()), se, len(array)


def summarise(organs: dict[str, dict[str, list[tuple[float, float | None]]]]) -> dict[str, dict]:
    """Per organ and over all organs: ``{"dsc": (mean %, se %, n), "hd95": (mean, se, n), "dsc_values": [...]}``."""
    summary: dict[str, dict] = {}
    per_patient_dsc: dict[str, list[float]] = defaultdict(list)
    per_patient_hd: dict[str, list[float]] = defaultdict(list)
    for organ, patients in organs.items():
        dsc, hd = [], []
        for patient, draws in sorted(patients.items()):
            d = 100.0 * float(np.mean([x for x, _ in draws]))
            dsc.append(d)
            per_patient_dsc[patient].append(d)
            defined = [h for _, h in draws if h is not None]
            if defined:
                hd.append(float(np.mean(defined)))
                per_patient_hd[patient].append(hd[-1])
        summary[organ] = {"dsc": _mean_se(dsc), "hd95": _mean_se(hd), "dsc_values": dsc}
    overall = [float(np.mean(v)) for _, v in sorted(per_patient_dsc.items())]
    summary[ALL] = {"dsc": _mean_se(overall),
                    "hd95": _mean_se([float(np.mean(v)) for _, v in sorted(per_patient_hd.items())]),
                    "dsc_values": overall}
    return summary


def seconds_per_case(out: Path, method: str, size: int) -> tuple[float | None, float | None, int]:
    """Seconds to contour one test case (fine-tuned model or atlas): mean ± SE over the test cases of the finished
    draws (a case's seconds averaged over the draws); ``(None, None, 0)`` for runs without ``seconds.json``."""
    per_case: dict[str, list[float]] = defaultdict(list)
    for path in sorted((out / "runs" / method).glob(f"n{size}_d*/seconds.json")):
        if (path.parent / "metrics.csv").exists():
            for case, seconds in json.loads(path.read_text(encoding="utf-8")).items():
                per_case[case].append(float(seconds))
    return _mean_se([float(np.mean(v)) for _, v in sorted(per_case.items())])


def _cell(stat: tuple[float | None, float | None, int], digits: int = 1) -> str:
    mean, se, _ = stat
    if mean is None:
        return "–"
    return f"{mean:.{digits}f} ± {se:.{digits}f}" if se is not None else f"{mean:.{digits}f}"


def _device(out: Path) -> str:
    devices = sorted({json.loads(p.read_text(encoding="utf-8")).get("device", "?")
                      for p in (out / "runs").glob("*/*/run.json")})
    return ", ".join(devices) or "?"


def write_report(cfg, out: Path) -> Path:
    """Write ``results.md``, ``results.csv`` and the plots from the finished runs; returns ``results.md``."""
    from separeg.experiments.plan import plan_runs
    from separeg.rt.labels import load_label_table

    results = collect(cfg, out)
    summaries = {key: summarise(organs) for key, organs in results.items()}
    table = load_label_table(cfg.data / "labels.json")
    organ_order = [lb.tg263 or lb.name for lb in table] + [ALL]
    planned = defaultdict(int)
    for run in plan_runs(cfg):
        planned[(run.method.name, run.size)] += 1
    lines = [f"# {cfg.name}", "",
             f"Test patients: {len(cfg.test)}; validation: {len(cfg.validation)}; training pool (X_pre): "
             f"{len(cfg.train_pool)}. " + (
                 "Atlas methods only: X_tr are the atlases, nothing is trained (budget and encoder do not apply)"
                 if all(m.atlas is not None for m in cfg.methods) else
                 f"**{cfg.budget_text}** (paper: {PAPER_PRETRAIN_ITERATIONS:,} pretraining iterations, "
                 f"{PAPER_FINETUNE_EPOCHS} fine-tuning epochs); "
                 f"encoder {cfg.encoder}") + f"; device: {_device(out)}; written {datetime.date.today().isoformat()}.",
             f"Organ annotations hidden from training cases: {100 * cfg.hide_fraction:.0f} %." if cfg.hide_fraction
             else "", "DSC % and HD95 mm, mean ± standard error over test patients (each patient averaged over the "
             "runs: draws of X_tr x fine-tuning seeds).", ""]
    rows = [["method", "size", "organ", "n", "dsc_mean", "dsc_se", "hd95_mean", "hd95_se", "runs", "seconds_mean",
             "seconds_se"]]
    for size in sorted(cfg.train_sizes):
        methods = [m.name for m in cfg.methods if (m.name, size) in summaries]
        if not methods:
            continue
        done = ", ".join(f"{m} {len(list((out / 'runs' / m).glob(f'n{size}_d*/metrics.csv')))}/"
                         f"{planned[(m, size)]}" for m in methods)
        for metric, unit in (("dsc", "DSC %"), ("hd95", "HD95 mm")):
            lines += [f"## |X_tr| = {size}: {unit} (finished runs: {done})", "",
                      "| organ | " + " | ".join(methods) + " |", "|---" * (len(methods) + 1) + "|"]
            hidden = _hidden_counts(cfg, out, size, {lb.value: lb.tg263 or lb.name for lb in table})
            for organ in organ_order:
                cells = [_cell(summaries[(m, size)].get(organ, {}).get(metric, (None, None, 0))) for m in methods]
                n = max(summaries[(m, size)].get(organ, {}).get(metric, (None, None, 0))[2] for m in methods)
                note = f"; hidden in {hidden[organ]}/{size} training cases" if organ in hidden else ""
                lines.append(f"| {organ} (n={n}{note}) | " + " | ".join(cells) + " |")
            if metric == "dsc":
                seconds = [seconds_per_case(out, m, size) for m in methods]
                lines.append(f"| seconds per test case (n={max(s[2] for s in seconds)}) | "
                             + " | ".join(_cell(s) for s in seconds) + " |")
            lines.append("")
        for m in methods:
            seconds = seconds_per_case(out, m, size)
            for organ in organ_order:
                s = summaries[(m, size)].get(organ)
                if s:
                    rows.append([m, size, organ, s["dsc"][2], *s["dsc"][:2], *s["hd95"][:2], planned[(m, size)],
                                 *seconds[:2]])
    path = out / "results.md"
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(line for line in lines if line is not None) + "\n", encoding="utf-8")
    with atomic_path(out / "results.csv") as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows(rows)
    _plots(cfg, out, summaries, organ_order)
    return path


def _hidden_counts(cfg, out: Path, size: int, names: dict[int, str]) -> dict[str, int]:
    """Per organ, in how many of the first draw's training cases the partial-label protocol hid it."""
    if cfg.hide_fraction <= 0:
        return {}
    for method in cfg.methods:
        path = out / "runs" / method.name / f"n{size}_d0" / "run.json"
        if path.exists():
            hidden = json.loads(path.read_text(encoding="utf-8"))["hidden_organs"]
            return {name: sum(value in organs for organs in hidden.values()) for value, name in names.items()}
    return {}


def _plots(cfg, out: Path, summaries: dict, organ_order: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullLocator

    for size in sorted(cfg.train_sizes):
        methods = [m.name for m in cfg.methods if (m.name, size) in summaries]
        if not methods:
            continue
        fig, axes = plt.subplots(2, (len(organ_order) + 1) // 2, figsize=(3 * ((len(organ_order) + 1) // 2), 6),
                                 squeeze=False)
        small = False
        for ax, organ in zip(axes.flat, organ_order, strict=False):
            data = [summaries[(m, size)].get(organ, {}).get("dsc_values", []) for m in methods]
            small |= box_or_points(ax, data)
            ax.set_xlim(0.4, len(methods) + 0.6)
            ax.set_xticks(range(1, len(methods) + 1), methods, rotation=45, ha="right", fontsize=7)
            ax.set_title(organ, fontsize=9)
            ax.set_ylim(0, 100)
        for ax in list(axes.flat)[len(organ_order):]:
            ax.axis("off")
        note = f"; {SMALL_N_NOTE}" if small else ""
        fig.suptitle(f"{textwrap.shorten(cfg.name, 110)}\nDSC % per test patient, |X_tr| = {size} ({cfg.budget_text})"
                     f"{note}", fontsize=9)
        fig.tight_layout()
        with atomic_path(out / f"boxplots_n{size}.png") as tmp:
            fig.savefig(tmp, dpi=100)
        plt.close(fig)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    no_se = False
    for m in cfg.methods:
        points = [(size, summaries[(m.name, size)][ALL]["dsc"]) for size in sorted(cfg.train_sizes)
                  if (m.name, size) in summaries]
        if points:
            no_se |= any(p[1][1] is None for p in points)
            ax.errorbar([p[0] for p in points], [p[1][0] for p in points], yerr=[p[1][1] or 0 for p in points],
                        marker="o", capsize=3, label=m.name)
    ax.set_xscale("log")
    sizes = sorted(cfg.train_sizes)
    ax.set_xticks(sizes, [str(size) for size in sizes])  # the sizes themselves, no fractional ticks
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xlabel("|X_tr| (labelled training CTs)")
    ax.set_ylabel("DSC % (all OARs)")
    ax.set_title(textwrap.fill(f"{cfg.name} ({cfg.budget_text})" + ("; no error bar: one test patient" if no_se
                                                                      else "; error bars: SE over patients"), 70),
                 fontsize=7)
    ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(out / "learning_curve.png") as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
