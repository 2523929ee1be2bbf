"""Plots and reports a physicist can read: loss axes say what is best, one- or two-step runs are points on whole-step
ticks, cluster rows are labelled with size and median HU, and n = 1 is said, never shown as "± n/a" or as a box."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from separeg.pretrain.report import cluster_figure, loss_figure, loss_meaning  # noqa: E402
from separeg.sis.figures import MIN_BOX, box_or_points  # noqa: E402


def test_loss_axes_say_what_is_best() -> None:
    assert "-1 best" in loss_meaning("inter", "simsiam") and "-1 best" in loss_meaning("intra", "byol")
    assert "lower is better" in loss_meaning("inter", "simclr")
    assert "0 best" in loss_meaning("distill", "simsiam", "intra")
    assert "-1 best" in loss_meaning("distill", "simsiam", "both")


def test_one_or_two_steps_are_points_on_whole_step_ticks() -> None:
    ylabels = {p: loss_meaning(p, "simsiam") for p in ("inter", "intra", "distill")}
    fig = loss_figure({"inter": [-0.2, -0.5], "intra_0": [-0.1], "distill": list(np.linspace(1, 0, 200))}, ylabels)
    inter, intra, distill = fig.axes
    for ax in (inter, intra):
        ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
        assert ticks and all(float(t).is_integer() for t in ticks), ticks  # before: 1.0, 1.2, 1.4 ...
        assert "too few for a trend" in ax.get_title()
        assert all(line.get_marker() == "o" for line in ax.get_lines())  # points, not a flat or 2-point line
        assert "-1 best" in ax.get_ylabel().replace("\n", " ")
    assert len(distill.get_lines()) == 2  # a long run: raw and moving average
    plt.close(fig)


def test_cluster_rows_are_labelled_with_size_and_median_hu() -> None:
    grid = np.zeros((3 * 20, 10 * 20, 3), np.uint8)
    labels = ["group 0: 12 regions\nmedian 35 HU", "group 1: 3 regions\nmedian -800 HU", "group 2: empty"]
    fig = cluster_figure(grid, labels)
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == labels
    plt.close(fig)


def test_fewer_than_three_values_are_points_not_boxes() -> None:
    fig, ax = plt.subplots()
    small = box_or_points(ax, [[55.0], [40.0, 60.0, 70.0, 65.0], []])
    assert small and MIN_BOX == 3
    boxes = [line for line in ax.get_lines() if line.get_marker() != "o"]  # whiskers, medians of the one box
    points = [line for line in ax.get_lines() if line.get_marker() == "o" and list(line.get_xdata()) == [1]]
    assert boxes and points and list(points[0].get_ydata()) == [55.0]
    plt.close(fig)
