"""Figures shared by the notebooks, all with one look, saved as PNG into the run directory."""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib

if not os.environ.get("DISPLAY") and "ipykernel" not in str(matplotlib.get_backend()).lower():
    matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
import torch

sns.set_theme(style="whitegrid", context="notebook")
MEMBER_COLOURS = {True: "#c0392b", False: "#2471a3"}
MEMBER_NAMES = {True: "member", False: "non-member"}


def save_figure(fig: plt.Figure, run_dir: str | os.PathLike, name: str) -> Path:
    """Save ``fig`` as ``run_dir/figures/<name>.png`` (150 dpi) and return the path.

    Raises:
        FileExistsError: the figure exists already; figures of a run are never overwritten.
    """
    folder = Path(run_dir) / "figures"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.png"
    if path.exists():
        raise FileExistsError(
            f"{str(path)!r} already exists and is kept; run the notebook on a new run directory"
        )
    temporary = folder / f".{name}.tmp.png"
    fig.savefig(temporary, dpi=150, bbox_inches="tight")
    os.replace(temporary, path)
    return path


def _as_image(x: torch.Tensor) -> np.ndarray:
    return x.detach().cpu().float().squeeze(0).numpy()


def image_grid(rows: dict[str, torch.Tensor], n: int = 8, symmetric: set[str] | None = None) -> plt.Figure:
    """Draw one row per entry of ``rows``: its first ``n`` images (N, 1, H, W).

    Rows named in ``symmetric`` (errors, filtered images, noisy states) use a symmetric colour
    scale around 0; the others show [-1, 1] in grayscale.
    """
    symmetric = symmetric or set()
    n = min(n, *(len(v) for v in rows.values()))
    fig, axes = plt.subplots(len(rows), n, figsize=(1.3 * n, 1.4 * len(rows)), squeeze=False)
    for r, (label, images) in enumerate(rows.items()):
        for c in range(n):
            ax = axes[r, c]
            image = _as_image(images[c])
            if label in symmetric:
                limit = float(np.abs(image).max()) or 1.0
                ax.imshow(image, cmap="RdBu_r", vmin=-limit, vmax=limit)
            else:
                ax.imshow(image, cmap="gray", vmin=-1, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[r, 0].set_ylabel(label, rotation=0, ha="right", va="center", fontsize=9)
    fig.tight_layout()
    return fig


def loss_curve(log: pd.DataFrame) -> plt.Figure:
    """Training loss per epoch (log scale) with a 5% rolling mean."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    window = max(1, len(log) // 20)
    ax.plot(log.epoch, log.loss, alpha=0.35, label="epoch mean")
    ax.plot(log.epoch, log.loss.rolling(window, min_periods=1).mean(), label=f"rolling mean ({window} epochs)")
    ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel("noise-prediction MSE")
    ax.legend()
    fig.tight_layout()
    return fig


def spectra(centres: np.ndarray, curves: dict[str, np.ndarray]) -> plt.Figure:
    """Radially averaged power spectra: mean over images per curve (N, n_bins), log y."""
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for label, power in curves.items():
        ax.plot(centres, np.nanmean(power, axis=0), marker="o", ms=3, label=label)
    ax.axvline(1.0, color="grey", lw=0.8, ls=":")
    ax.set_yscale("log")
    ax.set_xlabel("normalised radius (1 = Nyquist)")
    ax.set_ylabel("power")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def ring_comparison(centres: np.ndarray, member: np.ndarray, nonmember: np.ndarray, auc: np.ndarray, band: tuple[float, float]) -> plt.Figure:
    """Error energy per ring for members and non-members (median, quartiles) and per-ring AUC."""
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(6.5, 6), sharex=True)
    for is_member, values in ((True, member), (False, nonmember)):
        colour = MEMBER_COLOURS[is_member]
        q1, median, q3 = np.nanpercentile(values, [25, 50, 75], axis=0)
        top.plot(centres, median, color=colour, marker="o", ms=3, label=MEMBER_NAMES[is_member])
        top.fill_between(centres, q1, q3, color=colour, alpha=0.2)
    top.set_yscale("log")
    top.set_ylabel("reconstruction error energy")
    top.legend()

    bottom.plot(centres, auc, marker="o", ms=3, color="black")
    bottom.axhline(0.5, color="grey", lw=0.8, ls=":")
    bottom.set_ylabel("AUC of the ring's error")
    bottom.set_xlabel("normalised radius (1 = Nyquist)")
    for ax in (top, bottom):
        ax.axvspan(*band, color="gold", alpha=0.15, lw=0)
    fig.tight_layout()
    return fig


def roc_curves(curves: dict[str, tuple[np.ndarray, np.ndarray]], points: dict[str, tuple[float, float]] | None = None) -> plt.Figure:
    """ROC curves on log-log axes; ``curves`` maps a label to (fpr, tpr).

    ``points`` maps a label to one (fpr, tpr) operating point, drawn as a dot on its curve (the
    calibrated 1% FPR threshold in notebook 04). Rates of 0 are drawn at the axis floor.
    """
    fig, ax = plt.subplots(figsize=(7, 6))
    colours = sns.color_palette("tab20", len(curves))
    for colour, (label, (fpr, tpr)) in zip(colours, curves.items()):
        ax.step(np.clip(fpr, 1e-4, 1), np.clip(tpr, 1e-3, 1), where="post", label=label, color=colour, lw=1.2)
        if points and label in points:
            ax.plot(*np.clip(points[label], [1e-4, 1e-3], 1), "o", color=colour, ms=5)
    ax.plot([1e-4, 1], [1e-4, 1], color="grey", lw=0.8, ls=":", label="chance")
    for target in (0.01, 0.001):
        ax.axvline(target, color="grey", lw=0.6, ls="--")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(1e-4, 1)
    ax.set_ylim(1e-3, 1.05)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.legend(fontsize=7, loc="lower right", ncol=2)
    fig.tight_layout()
    return fig


def score_histograms(scores: pd.DataFrame, columns: int = 4) -> plt.Figure:
    """Member and non-member score histograms, one panel per attack (tidy score table)."""
    attacks = list(dict.fromkeys(scores.attack))
    n_rows = -(-len(attacks) // columns)
    fig, axes = plt.subplots(n_rows, columns, figsize=(3.4 * columns, 2.8 * n_rows), squeeze=False)
    for ax, attack in zip(axes.flat, attacks):
        part = scores[scores.attack == attack]
        bins = np.histogram_bin_edges(part.score, bins=40)  # shared, so the two classes compare bar by bar
        for is_member in (False, True):
            values = part.score[part.member == is_member]
            ax.hist(values, bins=bins, density=True, alpha=0.55, color=MEMBER_COLOURS[is_member], label=MEMBER_NAMES[is_member])
        ax.set_title(attack, fontsize=9)
        ax.tick_params(labelsize=7)
    for ax in axes.flat[len(attacks):]:
        ax.set_visible(False)
    for ax in axes[-1]:
        ax.set_xlabel("score (higher: member)", fontsize=8)
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    return fig


def error_boxplot(errors: pd.DataFrame) -> plt.Figure:
    """Reconstruction MSE per timestep t for members and non-members (log y).

    Args:
        errors: columns ``t``, ``member`` and ``reconstruction MSE``.
    """
    fig, ax = plt.subplots(figsize=(6, 3.8))
    data = errors.assign(membership=errors.member.map(MEMBER_NAMES))
    palette = {MEMBER_NAMES[k]: v for k, v in MEMBER_COLOURS.items()}
    sns.boxplot(data=data, x="t", y="reconstruction MSE", hue="membership", palette=palette, ax=ax, fliersize=1.5)
    ax.set_yscale("log")
    ax.set_xlabel("timestep t")
    fig.tight_layout()
    return fig


def auc_by_band(table: pd.DataFrame, band: tuple[float, float] | None = None) -> plt.Figure:
    """AUC of each narrow ring used alone, against the ring's centre, one line per metric.

    Args:
        table: columns ``centre``, ``metric``, ``auc``, ``auc_low`` and ``auc_high`` (one row per ring).
        band: a band to shade, such as the one chosen on the calibration split.
    """
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    for metric, part in table.groupby("metric", sort=False):
        line = ax.plot(part.centre, part.auc, marker="o", ms=3, label=metric)[0]
        ax.fill_between(part.centre, part.auc_low, part.auc_high, color=line.get_color(), alpha=0.2, lw=0)
    ax.axhline(0.5, color="grey", lw=0.8, ls=":")
    ax.axvline(1.0, color="grey", lw=0.8, ls=":")
    if band is not None:
        ax.axvspan(band[0], min(band[1], 1.45), color="gold", alpha=0.15, lw=0, label="chosen band")
    ax.set_xlabel("ring centre, normalised radius (1 = Nyquist)")
    ax.set_ylabel("AUC of the ring alone")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def interval_points(table: pd.DataFrame, x: str, y: str = "auc", hue: str | None = None, reference: float | None = 0.5,
                    xlabel: str | None = None, ylabel: str = "AUC", log_x: bool = False) -> plt.Figure:
    """Plot a value with its 95% interval (columns ``<y>_low``, ``<y>_high``) against ``x``, one line per ``hue``.

    Numeric ``x`` gives lines, text ``x`` gives points side by side with error bars.
    """
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    groups = table.groupby(hue, sort=False) if hue else [(None, table)]
    numeric = pd.api.types.is_numeric_dtype(table[x])
    labels = list(dict.fromkeys(table[x]))
    width = 0.8 / max(1, len(groups) if hue else 1)
    for index, (name, part) in enumerate(groups):
        errors = np.vstack([part[y] - part[f"{y}_low"], part[f"{y}_high"] - part[y]])
        if numeric:
            positions = part[x].to_numpy(float)
        else:
            positions = np.array([labels.index(v) for v in part[x]]) + (index - (len(groups) - 1) / 2) * width
        ax.errorbar(positions, part[y], yerr=errors, marker="o", ms=4, capsize=3, ls="-" if numeric else "none", label=name)
    if not numeric:
        ax.set_xticks(range(len(labels)), labels, fontsize=8)
    if log_x:
        ax.set_xscale("log")
    if reference is not None:
        ax.axhline(reference, color="grey", lw=0.8, ls=":")
    ax.set_xlabel(xlabel or x)
    ax.set_ylabel(ylabel)
    if hue:
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def band_heatmaps(table: pd.DataFrame, values: dict[str, str]) -> plt.Figure:
    """Heatmaps over (low edge, high edge), one panel per metric and value.

    Args:
        table: columns ``low``, ``high``, ``metric`` and the columns named in ``values``.
        values: column name -> label, e.g. ``{"auc": "AUC", "tpr_at_1pct_fpr": "TPR@1%FPR"}``.
    """
    metrics = list(dict.fromkeys(table.metric))
    fig, axes = plt.subplots(len(values), len(metrics), figsize=(4.6 * len(metrics), 3.9 * len(values)), squeeze=False)
    for r, (column, label) in enumerate(values.items()):
        for c, metric in enumerate(metrics):
            grid = table[table.metric == metric].pivot(index="high", columns="low", values=column).sort_index(ascending=False)
            # AUC below 0.5 (the band ranks members as non-members) gets its own colours
            colours = {"cmap": "RdBu_r", "center": 0.5} if column == "auc" else {"cmap": "viridis"}
            sns.heatmap(grid, ax=axes[r, c], vmin=0, vmax=1, annot=grid.shape[1] <= 12, fmt=".2f", annot_kws={"fontsize": 6},
                        cbar_kws={"label": label}, **colours)
            axes[r, c].set_title(f"{metric}: {label}", fontsize=10)
            axes[r, c].set_xlabel("low edge")
            axes[r, c].set_ylabel("high edge")
    fig.tight_layout()
    return fig


def difficulty_scatter(table: pd.DataFrame, scores: list[str], measures: list[str]) -> plt.Figure:
    """Plot each score against each difficulty measure, members and non-members coloured (one row per score)."""
    fig, axes = plt.subplots(len(scores), len(measures), figsize=(3.6 * len(measures), 2.9 * len(scores)), squeeze=False)
    for r, score in enumerate(scores):
        for c, measure in enumerate(measures):
            ax = axes[r, c]
            for is_member in (False, True):
                part = table[table.member == is_member]
                ax.scatter(part[measure], part[score], s=4, alpha=0.5, color=MEMBER_COLOURS[is_member], label=MEMBER_NAMES[is_member])
            ax.set_xlabel(measure, fontsize=8)
            ax.set_ylabel(score, fontsize=8)
            ax.tick_params(labelsize=7)
    axes[0, 0].legend(fontsize=7, markerscale=3)
    fig.tight_layout()
    return fig
