"""Score a run's images with every attack, choosing FCRE's settings on the calibration split.

FCRE has settings an attacker would tune: the protocol (``"x0"`` or ``"residual"``), the
timestep t and the band. :func:`select_fcre_settings` measures every combination on the
calibration split only, from cached reconstructions. It keeps the best per metric (highest AUC,
then highest TPR at 1% and at 0.1% FPR, then fewest NFE), and the evaluation split is scored once with that
choice.
"""

from __future__ import annotations

import itertools
import logging

import numpy as np
import pandas as pd
import torch

from .attacks import FCRE_METRICS, PROTOCOLS, balance_l2_weight, band_similarity
from .metrics import attack_metrics
from .reconstruction import Reconstructions, protocol_nfe

log = logging.getLogger(__name__)


def protocol_pair(recon: Reconstructions, protocol: str, t: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the two tensors a protocol compares at timestep t: (original, reconstruction)."""
    if protocol == "x0":
        return recon.x0, recon.x0_recon[t]
    if protocol == "residual":
        return recon.x_t[t], recon.x_t_roundtrip[t]
    raise ValueError(f"unknown protocol {protocol!r}; choose one of {PROTOCOLS}")


def fcre_all_metrics(original: torch.Tensor, reconstruction: torch.Tensor, band: tuple[float, float], fit: np.ndarray) -> tuple[dict[str, np.ndarray], float]:
    """SSIM, L2 and L2+SSIM scores for one band; the L2 weight is fit on the rows ``fit``.

    Returns:
        ``{metric: scores (N,)}`` and the L2 weight used by ``"l2_ssim"``.
    """
    ssim, l2 = band_similarity(original, reconstruction, *band)
    weight = balance_l2_weight(ssim[fit], l2[fit])
    return {"ssim": ssim, "l2": l2, "l2_ssim": ssim + weight * l2}, weight


def select_fcre_settings(recon: Reconstructions, manifest: pd.DataFrame, bands: list[list[float]], stride: int) -> pd.DataFrame:
    """Measure every (protocol, t, band, metric) on the calibration split.

    Args:
        recon: reconstructions of the manifest's images, in manifest order.
        manifest: columns ``member`` and ``split``.
        bands: candidate ``[low, high]`` bands.
        stride: DDIM stride the reconstructions used.

    Returns:
        One row per combination: protocol, t, low, high, metric, l2_weight, nfe, the calibration
        metrics (auc, asr, tpr_at_1pct_fpr, tpr_at_0_1pct_fpr) and ``selected`` (the best row of
        each metric).
    """
    calibration = manifest.split.to_numpy() == "calibration"
    labels = manifest.member.to_numpy()[calibration]
    if labels.all() or not labels.any():
        raise ValueError("the calibration split needs members and non-members; raise calibration_fraction")

    rows = []
    for protocol, t, band in itertools.product(PROTOCOLS, sorted(recon.x0_recon), bands):
        original, reconstruction = protocol_pair(recon, protocol, t)
        scores, weight = fcre_all_metrics(original[calibration], reconstruction[calibration], tuple(band), np.ones(len(labels), bool))
        for metric in FCRE_METRICS:
            measured = attack_metrics(labels, scores[metric])
            rows.append({"protocol": protocol, "t": t, "low": band[0], "high": band[1], "metric": metric,
                         "l2_weight": weight if metric == "l2_ssim" else np.nan,
                         "nfe": protocol_nfe(protocol, t, stride), **measured})

    table = pd.DataFrame(rows)
    ranked = table.sort_values(["auc", "tpr_at_1pct_fpr", "tpr_at_0_1pct_fpr", "nfe"], ascending=[False, False, False, True])
    best = ranked.groupby("metric", sort=False).head(1).index
    table["selected"] = table.index.isin(best)
    log.info("compared %d FCRE settings on %d calibration images", len(table), len(labels))
    return table


def fixed_fcre_settings(protocol: str, t: int, band: tuple[float, float], stride: int) -> pd.DataFrame:
    """Build the table of :func:`select_fcre_settings` for one setting chosen by hand."""
    rows = [{"protocol": protocol, "t": t, "low": band[0], "high": band[1], "metric": metric,
             "l2_weight": np.nan, "nfe": protocol_nfe(protocol, t, stride), "selected": True} for metric in FCRE_METRICS]
    return pd.DataFrame(rows)


def fcre_scores_table(recon: Reconstructions, manifest: pd.DataFrame, settings: pd.DataFrame) -> pd.DataFrame:
    """Score every image with each selected FCRE setting; L2 weights come from calibration.

    Returns:
        A tidy score table: image_id, member, split, attack, setting, nfe, score.
    """
    calibration = manifest.split.to_numpy() == "calibration"
    tables = []
    for row in settings[settings.selected].itertuples():
        original, reconstruction = protocol_pair(recon, row.protocol, row.t)
        scores, _ = fcre_all_metrics(original, reconstruction, (row.low, row.high), calibration)
        setting = f"{row.protocol} t={row.t} band=[{row.low:g}, {row.high:g})"
        tables.append(score_table(manifest, f"fcre_{row.metric}", setting, row.nfe, scores[row.metric]))
    return pd.concat(tables, ignore_index=True)


def score_table(manifest: pd.DataFrame, attack: str, setting: str, nfe: int, scores: np.ndarray) -> pd.DataFrame:
    """Tidy rows for one attack: image_id, member, split, attack, setting, nfe, score."""
    return pd.DataFrame({
        "image_id": manifest.image_id.to_numpy(),
        "member": manifest.member.to_numpy(),
        "split": manifest.split.to_numpy(),
        "attack": attack,
        "setting": setting,
        "nfe": nfe,
        "score": scores,
    })
