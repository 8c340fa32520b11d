"""Frequency analysis of the membership signal, and the dependence of scores on image difficulty.

The error energy of one frequency ring is the mean squared error between the ring's band of the
original and of the reconstruction. By Parseval's theorem the rings add up: the L2 error of any
band made of whole rings is the sum of its rings' energies, so AUCs of many bands come from one
FFT per image (:func:`ring_energies`, :func:`band_l2_from_rings`).

Difficulty is a property of an image, not of membership: an image with much fine texture is
reconstructed worse by any model. Two measures are used here, the share of the image's power at
high frequency and the reconstruction error of a reference model that never saw the image.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from scipy import stats

from .attacks import balance_l2_weight, band_similarity
from .frequency import MAX_RADIUS, bandpass, radial_grid
from .presets import Params
from .reconstruction import Reconstructions
from .suite import select_fcre_settings, suite_candidates

FULL_BAND_HIGH = 1.5  # a band's high edge above sqrt(2) keeps the corners of the spectrum


def ring_edges(width: float, top: float = FULL_BAND_HIGH) -> list[tuple[float, float]]:
    """Consecutive rings ``[low, low + width)`` from 0 until they cover the spectrum's corners.

    The last ring's high edge is ``top`` (above sqrt(2)), so the rings partition every FFT bin.
    """
    if not 0.0 < width < MAX_RADIUS:
        raise ValueError(f"ring width {width} must be in (0, {MAX_RADIUS:.4f}) (normalised radius, 1 = Nyquist)")
    lows = np.arange(0.0, MAX_RADIUS, width)
    edges = [(round(float(low), 6), round(float(low + width), 6)) for low in lows]
    edges[-1] = (edges[-1][0], top)
    return edges


def ring_energies(original: torch.Tensor, reconstruction: torch.Tensor, edges: list[tuple[float, float]]) -> np.ndarray:
    """Mean squared error of each ring's band between two image sets.

    Args:
        original, reconstruction: tensors (N, C, H, W).
        edges: ``(low, high)`` rings; see :func:`ring_edges`.

    Returns:
        float64 array (N, n_rings): for each ring, the MSE between the ring-filtered images,
        equal to ``-l2_scores(bandpass(original), bandpass(reconstruction))`` for that band.
    """
    if original.shape != reconstruction.shape:
        raise ValueError(f"original {tuple(original.shape)} and reconstruction {tuple(reconstruction.shape)} differ in shape")
    height, width = original.shape[-2:]
    spectrum = torch.fft.fft2((reconstruction - original).to(torch.float64))
    power = spectrum.abs().square().mean(dim=1) / float(height * width) ** 2  # (N, H, W), channel mean
    radius = radial_grid(height, width)
    columns = [power[:, (radius >= low) & (radius < high)].sum(dim=1) for low, high in edges]
    return torch.stack(columns, dim=1).cpu().numpy()


def band_l2_from_rings(energies: np.ndarray, edges: list[tuple[float, float]], low: float, high: float) -> np.ndarray:
    """L2 score (negative MSE) of the band ``[low, high)`` from ring energies; its edges must be ring edges."""
    starts = np.array([e[0] for e in edges])
    ends = np.array([e[1] for e in edges])
    inside = (starts >= low - 1e-9) & (ends <= high + 1e-9)
    if not inside.any() or not np.isclose(starts[inside].min(), low) or not np.isclose(min(ends[inside].max(), high), high):
        boundaries = ", ".join(f"{b:g}" for b in sorted(set(starts) | set(ends)))
        raise ValueError(f"band [{low:g}, {high:g}) does not start and end on ring edges ({boundaries}); choose edges from that list")
    return -energies[:, inside].sum(axis=1)


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC with higher scores meaning member (the Mann-Whitney U statistic, scaled)."""
    labels = np.asarray(labels, dtype=bool)
    return float(_auc(np.asarray(scores)[labels], np.asarray(scores)[~labels], axis=-1))


def _auc(members: np.ndarray, nonmembers: np.ndarray, axis: int = -1) -> np.ndarray:
    u = stats.mannwhitneyu(members, nonmembers, axis=axis, method="asymptotic").statistic
    return u / (members.shape[axis] * nonmembers.shape[axis])


def auc_interval(labels: np.ndarray, scores: np.ndarray, resamples: int = 1000, seed: int = 0) -> tuple[float, float, float]:
    """AUC and its 95% percentile bootstrap interval, members and non-members resampled separately.

    Raises:
        ValueError: one class is missing or a score is not finite.
    """
    labels = np.asarray(labels, dtype=bool)
    scores = np.asarray(scores, dtype=float)
    if labels.all() or not labels.any():
        raise ValueError(f"AUC needs members and non-members; got {int(labels.sum())} members and {int((~labels).sum())} non-members")
    if not np.isfinite(scores).all():
        raise ValueError(f"score {int(np.flatnonzero(~np.isfinite(scores))[0])} is not finite; remove or fix that image")
    interval = stats.bootstrap(
        (scores[labels], scores[~labels]), _auc, vectorized=True, n_resamples=resamples, method="percentile",
        rng=np.random.default_rng(seed),
    ).confidence_interval
    return auc(labels, scores), float(interval.low), float(interval.high)


def ring_auc_table(labels: np.ndarray, scores: dict[tuple[float, float], dict[str, np.ndarray]], resamples: int, seed: int) -> pd.DataFrame:
    """AUC with intervals of each band's scores.

    Args:
        labels: member flags (N,).
        scores: ``{(low, high): {metric: scores (N,)}}``, higher meaning member.

    Returns:
        One row per band and metric: low, high, centre, metric, auc, auc_low, auc_high.
    """
    rows = []
    for (low, high), by_metric in scores.items():
        for metric, values in by_metric.items():
            value, lower, upper = auc_interval(labels, values, resamples, seed)
            rows.append({"low": low, "high": high, "centre": (low + min(high, MAX_RADIUS)) / 2, "metric": metric,
                         "auc": value, "auc_low": lower, "auc_high": upper})
    return pd.DataFrame(rows)


def high_frequency_share(images: torch.Tensor, cutoff: float = 0.5) -> np.ndarray:
    """Share of each image's power (mean removed) at normalised radius >= ``cutoff``.

    A difficulty measure: fine texture and sharp edges, which diffusion models reconstruct worst.
    Returns float64 (N,) in [0, 1]; a constant image raises ValueError.
    """
    height, width = images.shape[-2:]
    power = torch.fft.fft2(images.to(torch.float64)).abs().square().mean(dim=1)
    power[:, 0, 0] = 0.0  # the mean brightness is not texture
    total = power.flatten(1).sum(dim=1)
    if (total == 0).any():
        raise ValueError(f"image {int(torch.nonzero(total == 0)[0])} is constant, so it has no texture to measure; remove it")
    high = power[:, radial_grid(height, width) >= cutoff].sum(dim=1)
    return (high / total).cpu().numpy()


def correlation_table(table: pd.DataFrame, scores: list[str], measures: list[str], resamples: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Spearman correlation of each score with each difficulty measure, per membership group.

    Args:
        table: one row per image with a boolean ``member`` column and the named columns.
        scores, measures: columns to correlate, scores oriented as the attacks orient them.

    Returns:
        One row per (group, score, measure): rho and its 95% percentile bootstrap interval
        (images resampled in pairs).
    """
    rows = []
    for member, group in table.groupby("member", sort=False):
        for score in scores:
            for measure in measures:
                x, y = group[score].to_numpy(float), group[measure].to_numpy(float)
                rho = stats.spearmanr(x, y).statistic
                interval = stats.bootstrap(
                    (x, y), lambda a, b: stats.spearmanr(a, b).statistic, paired=True, vectorized=False,
                    n_resamples=resamples, method="percentile", rng=np.random.default_rng(seed),
                ).confidence_interval
                rows.append({"group": "members" if member else "non-members", "score": score, "measure": measure,
                             "rho": float(rho), "rho_low": float(interval.low), "rho_high": float(interval.high)})
    return pd.DataFrame(rows)


def chosen_setting(recon: Reconstructions, manifest: pd.DataFrame, params: Params, attack: str = "fcre_l2_x0") -> tuple[int, tuple[float, float]]:
    """Return the t and band that notebook 04 chooses for one FCRE attack on the calibration split.

    Without ``select_on_calibration`` these are ``fcre_t`` and ``(band_low, band_high)``.
    """
    _, _, timesteps, bands = suite_candidates(params)
    table = select_fcre_settings(recon, manifest, timesteps, bands, params.ddim_stride)
    row = table[table.selected].set_index("attack").loc[attack]
    return int(row.t), (float(row.low), float(row.high))


def metric_scores(original: torch.Tensor, reconstruction: torch.Tensor, low: float, high: float, fit: np.ndarray) -> dict[str, np.ndarray]:
    """Score the band ``[low, high)`` with L1, L2, SSIM and L2+SSIM, higher meaning member.

    The L2 weight of L2+SSIM is fit on the rows ``fit`` (the calibration split).
    """
    ssim, l2 = band_similarity(original, reconstruction, low, high)
    l1 = -(bandpass(original, low, high) - bandpass(reconstruction, low, high)).to(torch.float64).abs().flatten(1).mean(dim=1).cpu().numpy()
    return {"L1": l1, "L2": l2, "SSIM": ssim, "L2+SSIM": ssim + balance_l2_weight(ssim[fit], l2[fit]) * l2}
