"""``RUN_DIR/report.md`` of a pretraining run: loss curves per stage, cluster sizes, example regions per cluster.

A physicist should be able to see that the organ groups mean something: each row of ``clusters.png``
shows the regions nearest to one cluster centre, labelled with the group, its size and median HU. Loss axes say
what the loss is and which value is best (SimSiam: -1); runs of one or two steps are drawn as points on whole-step
ticks, not as degenerate lines.
"""

from __future__ import annotations

import json
import textwrap
from typing import TYPE_CHECKING

import numpy as np

from separeg.runtime.atomic import atomic_path
from separeg.runtime.events import Events
from separeg.runtime.training import load_checkpoint

if TYPE_CHECKING:
    from separeg.pretrain.rundir import RunDir

__all__ = ["write_report", "loss_curves", "loss_figure", "cluster_grid", "save_cluster_grid", "cluster_figure",
           "loss_meaning"]

_COSINE = "negative cosine similarity (-1 best)"
#: What each method's loss is and which value is best (losses in separeg.pretrain.ssl.losses).
METHOD_LOSSES = {"simsiam": _COSINE, "byol": _COSINE, "simclr": "NT-Xent cross-entropy (lower is better)",
                 "mocov3": "InfoNCE x 2 tau (lower is better)"}


def loss_meaning(stage: str, method: str = "simsiam", distill_loss: str = "both") -> str:
    """The y-axis label of a stage's loss: what it measures and which value is best."""
    if stage == "distill":
        return ("KL to the group teachers + negative cosine to the inter-organ model (-1 best)"
                if distill_loss == "both" else "KL to the group teachers (0 best)")
    return METHOD_LOSSES.get(method, "loss (lower is better)")


def loss_curves(histories: dict[str, list[float]], path, ylabels: dict[str, str] | None = None) -> None:
    """One panel per stage (intra-organ groups share one), raw loss and a moving average.

    Args:
        histories: stage -> loss per step.
        path: the PNG to write.
        ylabels: panel ("inter", "intra", "distill") -> y-axis label (:func:`loss_meaning`); default "loss".
    """
    _save_figure(loss_figure(histories, ylabels), path)


def _save_figure(fig, path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)


def loss_figure(histories: dict[str, list[float]], ylabels: dict[str, str] | None = None):
    """The figure of :func:`loss_curves` (matplotlib, not yet saved)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    panels: dict[str, dict[str, list[float]]] = {}
    for name, values in histories.items():
        panels.setdefault("intra" if name.startswith("intra") else name, {})[name] = values
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.2), squeeze=False)
    for ax, (panel, series) in zip(axes[0], panels.items(), strict=True):
        for name, values in series.items():
            steps = np.arange(1, len(values) + 1)
            label = name if len(series) > 1 else None
            if len(values) < 40:  # too few for a moving average: the steps themselves, as points
                ax.plot(steps, values, marker="o", linestyle="-" if len(values) > 2 else "none", label=label)
                continue
            window = max(1, len(values) // 20)
            smooth = np.convolve(values, np.ones(window) / window, mode="valid")
            ax.plot(steps, values, alpha=0.25)
            ax.plot(steps[window - 1:], smooth, label=label)
        longest = max(len(v) for v in series.values())
        ax.set_title(panel + (f" ({longest} step{'s' if longest != 1 else ''}: too few for a trend)"
                              if longest <= 2 else ""), fontsize=9)
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if longest <= 10:  # every step its own tick (MaxNLocator falls back to fractions below two integers)
            ax.set_xticks(range(1, longest + 1))
            ax.set_xlim(0.5, longest + 0.5)
        ax.set_ylabel(textwrap.fill((ylabels or {}).get(panel, "loss"), 36), fontsize=8)
        if len(series) > 1:
            ax.legend(fontsize=7)
    return fig


def cluster_grid(regions, assignments: np.ndarray, distance: np.ndarray, per_cluster: int = 10) -> np.ndarray:
    """RGB grid: a row per cluster, the ``per_cluster`` regions nearest its centre (uint8)."""
    rows = []
    size = regions.crop_size
    for k in range(int(assignments.max()) + 1):
        members = np.flatnonzero(assignments == k)
        chosen = members[np.argsort(distance[members])[:per_cluster]]
        tiles = np.zeros((per_cluster, size, size), np.float32)
        if len(chosen):
            tiles[: len(chosen)] = regions.crops(chosen)[:, 0].cpu().numpy()
        row = np.concatenate([np.pad(t, 2, constant_values=1.0) for t in tiles], axis=1)
        rows.append(row)
    grid = (np.clip(np.concatenate(rows, axis=0), 0, 1) * 255).astype(np.uint8)
    return np.repeat(grid[..., None], 3, axis=2)


def save_cluster_grid(grid: np.ndarray, row_labels: list[str], path) -> None:
    """``grid`` (:func:`cluster_grid`) as a PNG with each row labelled (group, regions, median HU) on the left."""
    _save_figure(cluster_figure(grid, row_labels), path)


def cluster_figure(grid: np.ndarray, row_labels: list[str]):
    """The figure of :func:`save_cluster_grid` (matplotlib, not yet saved)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = max(1, len(row_labels))
    height, width = grid.shape[:2]
    row_inches = 0.7
    fig, ax = plt.subplots(figsize=(2.2 + row_inches * rows * width / height, row_inches * rows + 0.6))
    ax.imshow(grid, interpolation="nearest")
    ax.set_yticks([(i + 0.5) * height / rows for i in range(rows)], row_labels, fontsize=8)
    ax.set_xticks([])
    ax.set_title("regions nearest each group's centre", fontsize=9)
    return fig


def _run_settings(run: RunDir) -> tuple[str, str]:
    """``(method, distill_loss)`` from the run's ``config.json`` (the defaults when it cannot be read)."""
    try:
        data = json.loads(run.config.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "simsiam", "both"

    def find(node, key):
        if isinstance(node, dict):
            if isinstance(node.get(key), str):
                return node[key]
            return next((v for v in (find(c, key) for c in node.values()) if v), None)
        return None

    return find(data, "method") or "simsiam", find(data, "distill_loss") or "both"


def write_report(run: RunDir, events: Events, regions=None) -> None:
    """Write ``loss_curves.png``, ``clusters.png`` and ``report.md`` into the run directory."""
    order = {"inter": 0, "distill": 2}  # pipeline order; intra groups in between
    paths = sorted(run.checkpoints.glob("*.pt"), key=lambda p: (order.get(p.stem, 1), p.stem))
    histories = {p.stem: load_checkpoint(p)["losses"] for p in paths}
    lines = ["# SepaReg pretraining report", ""]
    method, distill_loss = _run_settings(run)
    if histories:
        ylabels = {panel: loss_meaning(panel, method, distill_loss) for panel in ("inter", "intra", "distill")}
        loss_curves(histories, run.root / "loss_curves.png", ylabels)
        lines += ["## Losses", "", f"Method {method}: inter and intra losses are {loss_meaning('inter', method)}; "
                  f"distillation: {loss_meaning('distill', method, distill_loss)}.", "",
                  "| stage | steps | first 10 % | last 10 % |", "|---|---|---|---|"]
        for name, values in histories.items():
            tenth = max(1, len(values) // 10)
            lines.append(f"| {name} | {len(values)} | {np.mean(values[:tenth]):.4f} | {np.mean(values[-tenth:]):.4f} |")
        lines += ["", "![loss curves](loss_curves.png)", ""]
    if run.clusters.exists():
        with np.load(run.clusters) as data:
            assignments, counts, mean_hu, distance = (data["assignments"], data["counts"], data["mean_hu"],
                                                      data["distance"])
        lines += ["## Organ groups (k-means on inter-organ projections)", "",
                  "| group | regions | share | median HU of regions |", "|---|---|---|---|"]
        row_labels = []
        for k, n in enumerate(counts):
            hu = f"{float(np.median(mean_hu[assignments == k])):.0f}" if n else "none (empty group)"
            lines.append(f"| {k} | {n} | {100 * n / max(counts.sum(), 1):.1f} % | {hu} |")
            row_labels.append(f"group {k}: {n} regions\nmedian {hu} HU" if n else f"group {k}: empty")
        if regions is not None:
            save_cluster_grid(cluster_grid(regions, assignments, distance), row_labels, run.root / "clusters.png")
            lines += ["", "Each row: the regions nearest to one group's centre (group 0 at the top).", "",
                      "![clusters](clusters.png)", ""]
    diagnostics = run.root / "diagnostics.json"
    if diagnostics.exists():
        from separeg.pretrain.diagnostics import diagnostics_markdown

        lines += diagnostics_markdown(json.loads(diagnostics.read_text(encoding="utf-8")))
    if run.encoder.exists():
        lines += ["## Output", "", f"Encoder bundle: `{run.encoder.name}` (load it with "
                  "`separeg finetune --init`).", ""]
    with atomic_path(run.root / "report.md") as tmp:
        tmp.write_text("\n".join(lines), encoding="utf-8")
    events.log(f"report written to {run.root / 'report.md'}", stage="export")
