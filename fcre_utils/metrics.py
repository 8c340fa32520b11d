"""Attack metrics on scikit-learn's ROC: AUC, attack success rate and TPR at a fixed FPR.

Conventions: members are the positive class (label 1) and a higher score means "more likely a
member". The ROC keeps every threshold (no points dropped), so a TPR read at a fixed FPR is
exact.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score, roc_curve

FPR_TARGETS = {"tpr_at_1pct_fpr": 0.01, "tpr_at_0_1pct_fpr": 0.001}


def _check(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    labels = np.asarray(labels)
    if labels.dtype != bool:
        values = set(np.unique(labels).tolist()) if labels.dtype.kind in "iuf" else None
        if values is None or not values <= {0, 1}:
            raise ValueError(
                f"labels must be booleans or 0/1 (1 = member), got values {np.unique(labels)[:5].tolist()}"
            )
        labels = labels.astype(bool)
    scores = np.asarray(scores, dtype=np.float64)
    if labels.shape != scores.shape or labels.ndim != 1:
        raise ValueError(f"labels {labels.shape} and scores {scores.shape} must be 1-D of equal length")
    if not np.isfinite(scores).all():
        bad = int((~np.isfinite(scores)).sum())
        raise ValueError(f"{bad} scores are NaN or infinite; check the attack's inputs")
    if labels.all() or not labels.any():
        raise ValueError("labels hold a single class; metrics need both members and non-members")
    return labels, scores


def roc(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Full ROC curve, members positive.

    Returns:
        fpr, tpr, thresholds from :func:`sklearn.metrics.roc_curve` with every threshold kept.
    """
    labels, scores = _check(labels, scores)
    return roc_curve(labels, scores, drop_intermediate=False)


def tpr_at_fpr(fpr: np.ndarray, tpr: np.ndarray, target: float) -> float:
    """Return the largest TPR on the curve whose FPR does not exceed ``target``.

    Tied scores form one ROC point, so a tie is never split to reach the target. The curve
    always contains (0, 0), so a curve with no other point at or below the target gives 0.

    >>> tpr_at_fpr(np.array([0.0, 0.005, 0.02, 1.0]), np.array([0.0, 0.4, 0.9, 1.0]), 0.01)
    0.4
    """
    allowed = fpr <= target
    return float(tpr[allowed].max()) if allowed.any() else 0.0


def attack_success_rate(fpr: np.ndarray, tpr: np.ndarray) -> float:
    """Best balanced accuracy over all thresholds: max of (TPR + 1 - FPR) / 2."""
    return float(np.max((tpr + 1.0 - fpr) / 2.0))


def attack_metrics(labels: np.ndarray, scores: np.ndarray) -> dict[str, float]:
    """AUC, attack success rate, TPR at 1% and 0.1% FPR, and the set sizes.

    Args:
        labels: member flags (N,), both classes present.
        scores: attack scores (N,), finite, higher means member.
    """
    labels, scores = _check(labels, scores)
    fpr, tpr, _ = roc(labels, scores)
    result = {
        "auc": float(roc_auc_score(labels, scores)),
        "asr": attack_success_rate(fpr, tpr),
    }
    for name, target in FPR_TARGETS.items():
        result[name] = tpr_at_fpr(fpr, tpr, target)
    result["n_members"] = int(labels.sum())
    result["n_nonmembers"] = int((~labels).sum())
    return result


def metrics_table(scores: pd.DataFrame, split: str = "evaluation") -> pd.DataFrame:
    """Compute one row of :func:`attack_metrics` per attack from a tidy score table.

    Args:
        scores: columns ``attack``, ``setting``, ``nfe``, ``member``, ``split``, ``score``.
        split: which split to measure on.
    """
    rows = []
    chosen = scores[scores.split == split]
    for (attack, setting, nfe), group in chosen.groupby(["attack", "setting", "nfe"], sort=False):
        rows.append({"attack": attack, "setting": setting, **attack_metrics(group.member.to_numpy(), group.score.to_numpy()), "nfe": int(nfe)})
    return pd.DataFrame(rows)


def ring_auc(labels: np.ndarray, ring_errors: np.ndarray) -> np.ndarray:
    """AUC of each frequency ring's error energy used alone as a score (lower error: member).

    Args:
        labels: member flags (N,).
        ring_errors: error energy per image and ring (N, n_rings); NaN rings give NaN.

    Returns:
        AUC per ring, shape (n_rings,).
    """
    aucs = np.full(ring_errors.shape[1], np.nan)
    for ring in range(ring_errors.shape[1]):
        column = ring_errors[:, ring]
        if np.isfinite(column).all():
            aucs[ring] = roc_auc_score(np.asarray(labels, dtype=bool), -column)
    return aucs
