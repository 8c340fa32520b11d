"""Ablations of FCRE: band edges, timestep, DDIM steps, error metric, training length, member-set size.

Each function returns a tidy table with one row per setting. AUC is measured on the evaluation
split with a 95% bootstrap interval; TPR at 1% FPR uses the threshold chosen on the calibration
split, as in notebook 04. Ablations that read cached reconstructions run no network; the others
reconstruct only at the one timestep they need.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .analysis import auc, auc_interval, metric_scores
from .attacks import band_similarity
from .metrics import calibrated_metrics
from .models import build_scheduler, build_unet, load_model
from .presets import Params
from .reconstruction import Reconstructions, protocol_nfe, reconstruct
from .training import train_ddpm

log = logging.getLogger(__name__)


def _splits(manifest: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    calibration = manifest.split.to_numpy() == "calibration"
    return calibration, ~calibration, manifest.member.to_numpy(dtype=bool)


def score_rows(manifest: pd.DataFrame, scores: dict[str, np.ndarray], resamples: int, seed: int, column: str = "setting") -> pd.DataFrame:
    """AUC with interval and calibrated TPR@1%FPR for named scores of every manifest image.

    Args:
        manifest: columns ``member`` and ``split``, one row per image.
        scores: name -> scores (N,) in manifest order, higher meaning member.
        column: name of the column holding the score names.
    """
    calibration, evaluation, labels = _splits(manifest)
    rows = []
    for name, values in scores.items():
        value, low, high = auc_interval(labels[evaluation], values[evaluation], resamples, seed)
        tpr = calibrated_metrics((labels[calibration], values[calibration]), (labels[evaluation], values[evaluation]))["tpr_at_1pct_fpr"]
        rows.append({column: name, "auc": value, "auc_low": low, "auc_high": high, "tpr_at_1pct_fpr": tpr})
    return pd.DataFrame(rows)


def band_grid(recon: Reconstructions, manifest: pd.DataFrame, t: int, edges: list[float]) -> pd.DataFrame:
    """AUC and calibrated TPR@1%FPR of FCRE L2 and SSIM for every band ``[low, high)`` of ``edges``.

    Returns:
        One row per (low, high, metric) with low < high: auc, tpr_at_1pct_fpr.
    """
    calibration, evaluation, labels = _splits(manifest)
    rows = []
    for i, low in enumerate(edges):
        for high in edges[i + 1 :]:
            ssim, l2 = band_similarity(recon.x0, recon.x0_recon[t], low, high)
            for metric, values in (("L2", l2), ("SSIM", ssim)):
                tpr = calibrated_metrics((labels[calibration], values[calibration]), (labels[evaluation], values[evaluation]))["tpr_at_1pct_fpr"]
                rows.append({"low": low, "high": high, "metric": metric, "auc": auc(labels[evaluation], values[evaluation]), "tpr_at_1pct_fpr": tpr})
    return pd.DataFrame(rows)


def by_timestep(recon: Reconstructions, manifest: pd.DataFrame, band: tuple[float, float], resamples: int, seed: int) -> pd.DataFrame:
    """FCRE L2 and SSIM in ``band`` at every cached timestep t."""
    calibration, _, _ = _splits(manifest)
    tables = []
    for t in sorted(recon.x0_recon):
        scores = metric_scores(recon.x0, recon.x0_recon[t], *band, calibration)
        tables.append(score_rows(manifest, {m: scores[m] for m in ("L2", "SSIM")}, resamples, seed, "metric").assign(t=t))
    return pd.concat(tables, ignore_index=True)


def by_metric(recon: Reconstructions, manifest: pd.DataFrame, t: int, band: tuple[float, float], resamples: int, seed: int) -> pd.DataFrame:
    """L1, L2, SSIM and L2+SSIM in ``band`` at t."""
    calibration, _, _ = _splits(manifest)
    return score_rows(manifest, metric_scores(recon.x0, recon.x0_recon[t], *band, calibration), resamples, seed, "metric")


def _x0_scores(unet, alphas_cumprod: torch.Tensor, images: torch.Tensor, t: int, stride: int, band: tuple[float, float],
               params: Params) -> dict[str, np.ndarray]:
    """Reconstruct at t with one stride and return FCRE L2 in ``band`` and the full-band L2."""
    recon = reconstruct(unet, images, [t], stride, alphas_cumprod, params.score_batch_size, progress=False)
    return {"FCRE L2": band_similarity(recon.x0, recon.x0_recon[t], *band)[1],
            "raw L2": -(recon.x0_recon[t] - recon.x0).to(torch.float64).square().flatten(1).mean(1).numpy()}


def by_stride(unet, alphas_cumprod: torch.Tensor, images: torch.Tensor, manifest: pd.DataFrame, t: int, band: tuple[float, float],
              strides: list[int], params: Params) -> pd.DataFrame:
    """FCRE L2 in ``band`` at t with each DDIM stride (fewer steps: larger stride)."""
    tables = []
    for stride in sorted(set(strides), reverse=True):
        scores = _x0_scores(unet, alphas_cumprod, images, t, stride, band, params)
        table = score_rows(manifest, scores, params.bootstrap_resamples, params.seed, "score")
        tables.append(table.assign(stride=stride, steps=t // stride, nfe=protocol_nfe("x0", t, stride)))
        log.info("stride %d: FCRE L2 AUC %.3f", stride, table.auc.iloc[0])
    return pd.concat(tables, ignore_index=True)


def along_training(snapshots: dict[int, Path], images: torch.Tensor, manifest: pd.DataFrame, t: int, band: tuple[float, float],
                   params: Params) -> pd.DataFrame:
    """FCRE L2 in ``band`` and the raw error at t for each weight snapshot taken during training."""
    if not snapshots:
        raise ValueError("no weight snapshots to attack; train with history_every > 0 (notebook 01 keeps them in checkpoints/model)")
    tables = []
    for epoch, folder in sorted(snapshots.items()):
        unet, scheduler = load_model(folder)
        scores = _x0_scores(unet, scheduler.alphas_cumprod, images, t, params.ddim_stride, band, params)
        tables.append(score_rows(manifest, scores, params.bootstrap_resamples, params.seed, "score").assign(epoch=epoch))
    return pd.concat(tables, ignore_index=True)


def by_member_count(images: torch.Tensor, manifest: pd.DataFrame, sizes: list[int], t: int, band: tuple[float, float], params: Params,
                    model_root: str | Path) -> pd.DataFrame:
    """Train one model per member-set size on the first members of each split, then attack it.

    Each model trains like the run's model (same preset, seed and epochs) on ``size`` members:
    the first of each split in manifest order, in the proportion of the splits. It is attacked on
    those members against every non-member, with the manifest's calibration and evaluation splits. Models are saved under
    ``model_root/members-<size>`` and a rerun continues or reuses them.
    """
    members = np.flatnonzero(manifest.member.to_numpy(dtype=bool))
    nonmembers = np.flatnonzero(~manifest.member.to_numpy(dtype=bool))
    tables = []
    for size in sorted(set(sizes)):
        if not 2 <= size <= len(members):
            raise ValueError(f"member-set size {size} must be in [2, {len(members)}] (the run's members)")
        calibration = members[manifest.split.to_numpy()[members] == "calibration"]
        evaluation = members[manifest.split.to_numpy()[members] == "evaluation"]
        n_calibration = min(max(1, round(size * len(calibration) / len(members))), size - 1)
        chosen = np.sort(np.r_[calibration[:n_calibration], evaluation[: size - n_calibration]])
        subset = manifest.iloc[np.r_[chosen, nonmembers]].reset_index(drop=True)
        unet = build_unet(params, in_channels=images.shape[1])
        model, _ = train_ddpm(unet, build_scheduler(params), images[chosen], params, Path(model_root) / f"members-{size:05d}", resume=True)
        scores = _x0_scores(model, build_scheduler(params).alphas_cumprod, images[np.r_[chosen, nonmembers]], t, params.ddim_stride, band, params)
        tables.append(score_rows(subset, scores, params.bootstrap_resamples, params.seed, "score").assign(members=size))
    return pd.concat(tables, ignore_index=True)
