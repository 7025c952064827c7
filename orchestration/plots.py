"""PNG plots for a run: confusion matrix, loss curves, attention overlays (paper Figure 6).

Figures are built with `matplotlib.figure.Figure` and saved as PNG, which always renders
with Agg; pyplot is never imported: no global figure state and no GUI backend, so plotting
is safe inside Ray workers and threads and needs no display. Figure sizes are fixed by the
constants below (no tight bbox), so an image's pixel size is known in advance.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

DPI = 100
LOSS_FIGSIZE = (10.0, 4.0)
CONFUSION_CELL_INCHES = 0.4
CONFUSION_MIN_INCHES = 5.0
CONFUSION_MAX_INCHES = 20.0  # 101 UCF classes would be 40 in otherwise
CONFUSION_ANNOTATE_MAX_CLASSES = 20  # beyond this the counts are unreadable
ATTENTION_CELL_INCHES = 1.5
ATTENTION_TITLE_INCHES = 0.5
ATTENTION_ALPHA = 0.5


def confusion_figsize(num_classes: int) -> float:
    """Side in inches of the (square) confusion matrix figure for C classes."""
    side = CONFUSION_CELL_INCHES * num_classes + 2.0
    return float(min(max(side, CONFUSION_MIN_INCHES), CONFUSION_MAX_INCHES))


def plot_confusion_matrix(cm: np.ndarray, class_names: Sequence[str], path: str | Path) -> Path:
    """Save a [C, C] confusion matrix (rows = true, columns = predicted) as a PNG."""
    cm = np.asarray(cm)
    c = len(class_names)
    if cm.shape != (c, c):
        raise ValueError(f"confusion matrix must be ({c}, {c}), got {cm.shape}")
    side = confusion_figsize(c)
    fig = Figure(figsize=(side, side), dpi=DPI)
    ax = fig.subplots()
    image = ax.imshow(cm, cmap="Blues", interpolation="nearest")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    ticks = np.arange(c)
    font = max(4.0, min(9.0, 200.0 / max(c, 1)))
    ax.set_xticks(ticks, labels=list(class_names), rotation=90, fontsize=font)
    ax.set_yticks(ticks, labels=list(class_names), fontsize=font)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("video confusion matrix (vote)")
    if c <= CONFUSION_ANNOTATE_MAX_CLASSES:
        threshold = cm.max() / 2 if cm.size else 0
        for (i, j), count in np.ndenumerate(cm):
            color = "white" if count > threshold else "black"
            ax.text(j, i, str(count), ha="center", va="center", color=color, fontsize=font)
    fig.subplots_adjust(left=0.2, bottom=0.2, right=0.86, top=0.92)
    return _save(fig, path)


def _series(history: Sequence[dict[str, float]], key: str) -> tuple[list[float], list[float]]:
    """(epochs, values) of one metric over the rows that report a finite value for it."""
    xs, ys = [], []
    for index, row in enumerate(history):
        value = row.get(key)
        if value is None or not math.isfinite(float(value)):
            continue
        xs.append(float(row.get("epoch", index + 1)))
        ys.append(float(value))
    return xs, ys


def plot_loss_curves(
    history: Sequence[dict[str, float]],
    losses: Sequence[str],
    accuracies: Sequence[str],
    path: str | Path,
) -> Path:
    """Save `loss_curves_figure` as a PNG at `path`."""
    return _save(loss_curves_figure(history, losses, accuracies), path)


def loss_curves_figure(
    history: Sequence[dict[str, float]], losses: Sequence[str], accuracies: Sequence[str]
) -> Figure:
    """Per-epoch curves: the `losses` left, the `accuracies` right (each key that `history`
    has), one colour per series: a few a user reads, not every metric logged
    (`metrics.PLOTTED_ACCURACIES`; MLflow charts the rest)."""
    logged = {k for row in history for k in row}
    losses = [k for k in losses if k in logged]
    accuracies = [k for k in accuracies if k in logged]
    fig = Figure(figsize=LOSS_FIGSIZE, dpi=DPI)
    loss_ax, acc_ax = fig.subplots(1, 2)
    for ax, panel_keys, title in (
        (loss_ax, losses, "losses"),
        (acc_ax, accuracies, "accuracy"),
    ):
        for key in panel_keys:
            xs, ys = _series(history, key)
            ax.plot(xs, ys, marker="o", markersize=3, label=key)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if panel_keys:
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "nothing logged", ha="center", va="center", transform=ax.transAxes)
    # Loss terms differ by orders of magnitude (lambda = 1000 on the attention term); a
    # zero term (e.g. lambda = 0) rules out a log axis.
    loss_values = [y for k in losses for y in _series(history, k)[1]]
    if loss_values and min(loss_values) > 0:
        loss_ax.set_yscale("log")
    acc_ax.set_ylim(0.0, 1.0)
    fig.subplots_adjust(left=0.07, right=0.98, bottom=0.13, top=0.9, wspace=0.2)
    return fig


def upsample_attention(maps: np.ndarray, size: int) -> np.ndarray:
    """Bilinearly upsample flat K*K attention maps [..., K*K] to [..., size, size].

    Same sampling as `torch.nn.functional.interpolate(mode="bilinear",
    align_corners=False)`: each output pixel center maps back into the K x K grid.
    """
    maps = np.asarray(maps, dtype=np.float64)
    k = math.isqrt(maps.shape[-1])
    if k * k != maps.shape[-1]:
        raise ValueError(f"attention maps must be flat squares (K*K), got {maps.shape[-1]}")
    weights = _bilinear_weights(k, size)
    grid = maps.reshape(*maps.shape[:-1], k, k)
    return np.einsum("yi,...ij,xj->...yx", weights, grid, weights)


def _bilinear_weights(k: int, size: int) -> np.ndarray:
    """[size, k] interpolation matrix along one axis (half-pixel centers, edges clamped)."""
    source = np.clip((np.arange(size) + 0.5) * (k / size) - 0.5, 0.0, k - 1)
    low = np.floor(source).astype(int)
    high = np.minimum(low + 1, k - 1)
    frac = source - low
    weights = np.zeros((size, k))
    weights[np.arange(size), low] += 1.0 - frac
    weights[np.arange(size), high] += frac
    return weights


def frame_indices(num_frames: int, max_frames: int) -> np.ndarray:
    """Up to max_frames frame indices spread evenly over the clip (first and last kept)."""
    if num_frames <= max_frames:
        return np.arange(num_frames)
    return np.unique(np.linspace(0, num_frames - 1, max_frames).round().astype(int))


def plot_attention_overlay(
    frames: np.ndarray,
    attention: np.ndarray,
    path: str | Path,
    title: str,
    max_frames: int = 8,
) -> Path:
    """Save a paper-Figure-6 grid: one row per attention input, one column per shown frame.

    Args:
        frames: uint8 [T, S, S, 3] the clip's frames.
        attention: float [M, T, K*K] attention weights of each of the M inputs at each step.
        path: where the PNG goes.
        title: figure title (e.g. video name, true and predicted class).
        max_frames: at most this many frames (columns), spread over the clip.
    """
    frames = np.asarray(frames)
    attention = np.asarray(attention)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be [T, S, S, 3], got {frames.shape}")
    if attention.ndim != 3 or attention.shape[1] != frames.shape[0]:
        raise ValueError(f"attention must be [M, T={frames.shape[0]}, K*K], got {attention.shape}")
    shown = frame_indices(frames.shape[0], max_frames)
    heat = upsample_attention(attention[:, shown], frames.shape[1])
    rows, cols = attention.shape[0], len(shown)
    height = rows * ATTENTION_CELL_INCHES + ATTENTION_TITLE_INCHES
    fig = Figure(figsize=(cols * ATTENTION_CELL_INCHES, height), dpi=DPI)
    axes = fig.subplots(rows, cols, squeeze=False)
    for m in range(rows):
        # One color scale per input row, so the rows' frames compare with each other.
        vmax = float(heat[m].max()) or 1.0
        for col, t in enumerate(shown):
            ax = axes[m, col]
            ax.imshow(frames[t])
            ax.imshow(heat[m, col], cmap="jet", alpha=ATTENTION_ALPHA, vmin=0.0, vmax=vmax)
            ax.set_xticks([])
            ax.set_yticks([])
            if m == 0:
                ax.set_title(f"t={t + 1}", fontsize=8)
            if col == 0:
                ax.set_ylabel(f"input {m + 1}", fontsize=8)
    fig.suptitle(title, fontsize=10)
    top = 1.0 - ATTENTION_TITLE_INCHES / height
    fig.subplots_adjust(left=0.04, right=0.99, bottom=0.01, top=top, wspace=0.04, hspace=0.04)
    return _save(fig, path)


def _save(fig: Figure, path: str | Path) -> Path:
    """Write the figure as PNG (creating the folder) and return its path."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=DPI, format="png")
    return out
