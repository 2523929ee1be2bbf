"""``RUN_DIR/report.md`` of a pretraining run: loss curves per stage, cluster sizes, example regions per cluster.

A physicist should be able to see that the organ groups mean something: each row of ``clusters.png``
shows the regions nearest to one cluster centre, with the group's size and median HU.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .atomic import atomic_path
from .events import Events
from .figures import save_png
from .training import load_checkpoint

if TYPE_CHECKING:
    from .rundir import RunDir

__all__ = ["write_report", "loss_curves", "cluster_grid"]


def loss_curves(histories: dict[str, list[float]], path) -> None:
    """One panel per stage (intra-organ groups share one), raw loss and a moving average."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels: dict[str, dict[str, list[float]]] = {}
    for name, values in histories.items():
        panels.setdefault("intra" if name.startswith("intra") else name, {})[name] = values
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.2), squeeze=False)
    for ax, (panel, series) in zip(axes[0], panels.items(), strict=True):
        for name, values in series.items():
            steps = np.arange(1, len(values) + 1)
            window = max(1, len(values) // 20)
            smooth = np.convolve(values, np.ones(window) / window, mode="valid")
            ax.plot(steps, values, alpha=0.25)
            ax.plot(steps[window - 1:], smooth, label=name if len(series) > 1 else None)
        ax.set_title(panel)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        if len(series) > 1:
            ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)


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


def write_report(run: RunDir, events: Events, regions=None) -> None:
    """Write ``loss_curves.png``, ``clusters.png`` and ``report.md`` into the run directory."""
    order = {"inter": 0, "distill": 2}  # pipeline order; intra groups in between
    paths = sorted(run.checkpoints.glob("*.pt"), key=lambda p: (order.get(p.stem, 1), p.stem))
    histories = {p.stem: load_checkpoint(p)["losses"] for p in paths}
    lines = ["# SepaReg pretraining report", ""]
    if histories:
        loss_curves(histories, run.root / "loss_curves.png")
        lines += ["## Losses", "", "| stage | steps | first 10 % | last 10 % |", "|---|---|---|---|"]
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
        for k, n in enumerate(counts):
            hu = float(np.median(mean_hu[assignments == k])) if n else float("nan")
            lines.append(f"| {k} | {n} | {100 * n / max(counts.sum(), 1):.1f} % | {hu:.0f} |")
        if regions is not None:
            save_png(cluster_grid(regions, assignments, distance), run.root / "clusters.png")
            lines += ["", "Each row: the regions nearest to one group's centre (group 0 at the top).", "",
                      "![clusters](clusters.png)", ""]
    if run.encoder.exists():
        lines += ["## Output", "", f"Encoder bundle: `{run.encoder.name}` (load it with "
                  "`separeg finetune --init`).", ""]
    with atomic_path(run.root / "report.md") as tmp:
        tmp.write_text("\n".join(lines), encoding="utf-8")
    events.log(f"report written to {run.root / 'report.md'}", stage="export")
