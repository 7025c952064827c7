"""What a sweep leaves on its parent MLflow run: the trials table and the metric plot.

The plot puts the metric against lambda and against zeta (log axes, one panel each), with
fusion as the colour and the branch count as the marker, so all four swept quantities of
the paper's ablation are visible at once. Built on `matplotlib.figure.Figure` (Agg, no
pyplot state), like the run plots in `orchestration.plots`.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

LAMBDA_KEY = "model.attention_reg_weight"
ZETA_KEY = "train.weight_decay"
FUSION_KEY = "model.fusion"
TAPS_KEY = "model.taps"  # the trials table's column of each trial's inputs ("pool4+flow")
INPUTS_KEY = "model.inputs"  # the inputs' name in a space (TAPS_KEY, their old one, too)
FIGSIZE = (11.0, 4.5)
DPI = 100
FUSION_COLOURS = {"early": "tab:blue", "late": "tab:orange"}
BRANCH_MARKERS = {1: "o", 2: "s", 3: "^", 4: "D"}


def plot_metric_vs_lambda_zeta(trials: pd.DataFrame, metric: str, path: str | Path) -> Path:
    """Small multiples: `metric` vs lambda and vs zeta; colour = fusion, marker = branches.

    `trials` has one row per trial with the columns `metric`, LAMBDA_KEY, ZETA_KEY,
    FUSION_KEY and `branches` (the number of taps). Trials stopped early by ASHA are drawn
    hollow: their metric is from an earlier epoch than the others'.
    """
    fig = Figure(figsize=FIGSIZE, dpi=DPI)
    axes = fig.subplots(1, 2, sharey=True)
    stopped = trials["stopped_early"].astype(bool)
    for ax, key, label in ((axes[0], LAMBDA_KEY, "lambda (attention reg. weight)"),
                           (axes[1], ZETA_KEY, "zeta (weight decay)")):
        for (fusion, branches), group in trials.groupby([FUSION_KEY, "branches"]):
            colour = FUSION_COLOURS.get(str(fusion), "tab:gray")
            marker = BRANCH_MARKERS.get(int(branches), "x")
            for hollow, part in group.groupby(stopped[group.index]):
                ax.scatter(
                    part[key], part[metric], s=60, marker=marker, edgecolors=colour,
                    facecolors="none" if hollow else colour, linewidths=1.5,
                )
        ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel(metric)
    handles = [
        Line2D([], [], color=c, marker="o", linestyle="", label=f"{f} fusion")
        for f, c in FUSION_COLOURS.items()
    ] + [
        Line2D([], [], color="black", marker=m, linestyle="", label=f"{n} branch(es)")
        for n, m in BRANCH_MARKERS.items()
        if n in set(trials["branches"].astype(int))
    ] + [
        Line2D([], [], color="black", marker="o", markerfacecolor="none", linestyle="",
               label="stopped early (ASHA)"),
    ]
    axes[1].legend(handles=handles, loc="best", fontsize="small")
    fig.suptitle(f"{metric} of every trial (last reported epoch)")
    path = Path(path)
    fig.savefig(path, format="png")
    return path


def plot_epoch_curves(
    curves: dict[str, dict[str, list[tuple[int, float]]]], metrics: list[str], path: str | Path
) -> Path:
    """One panel per metric, one line per trial: the metric against the epoch (the paper's
    Figure 5 is the LSTM's loss this way, with and without the regularization).

    `curves` maps a trial's label (its swept values) to `{metric: [(epoch, value), ...]}`;
    a trial without a metric is left out of that panel.
    """
    fig = Figure(figsize=(FIGSIZE[0], 4.0 * len(metrics)), dpi=DPI)
    axes = fig.subplots(len(metrics), 1, sharex=True, squeeze=False)[:, 0]
    for ax, metric in zip(axes, metrics, strict=True):
        for label, trial in curves.items():
            points = sorted(trial.get(metric, []))
            if points:
                ax.plot(*zip(*points, strict=True), marker="o", markersize=3, label=label)
        ax.set_ylabel(metric)
        ax.grid(True, alpha=0.3)
    axes[-1].set_xlabel("epoch")
    axes[0].legend(loc="best", fontsize="x-small")
    fig.suptitle("every trial, epoch by epoch")
    path = Path(path)
    fig.savefig(path, format="png")
    return path
