"""Attack metrics on scikit-learn's ROC: AUC, attack success rate and TPR at a fixed FPR.

Conventions: members are the positive class (label 1), a higher score means "more likely a
member", and a threshold flags an image as a member when its score is at least the threshold.
The ROC keeps every threshold (no points dropped), so a TPR read at a fixed FPR is exact.

Two readings of one attack on the evaluation split:

- calibrated (:func:`calibrated_metrics`): the thresholds for the attack success rate and for
  1% and 0.1% FPR are chosen on the calibration split and applied unchanged to the evaluation
  split, as an attacker without evaluation labels would. The realised evaluation FPR is reported
  next to each TPR.
- oracle (``oracle_*`` columns): the same quantities read off the evaluation ROC itself, which
  tunes the threshold on the evaluation labels. Most published tables report this reading.

:func:`bootstrap_intervals` gives percentile 95% intervals by resampling members and
non-members of both splits independently (:func:`scipy.stats.bootstrap`).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy.stats import bootstrap
from sklearn.metrics import roc_auc_score, roc_curve

FPR_TARGETS = {"tpr_at_1pct_fpr": 0.01, "tpr_at_0_1pct_fpr": 0.001}
CALIBRATED = ("auc", "asr", "tpr_at_1pct_fpr", "tpr_at_0_1pct_fpr")  # metrics that get intervals


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
        bad = ~np.isfinite(scores)
        raise ValueError(
            f"{int(bad.sum())} scores are NaN or infinite (first at index {int(np.argmax(bad))}, value {scores[bad][0]}); "
            "check the attack's inputs for NaN pixels or a diverged model"
        )
    if labels.all() or not labels.any():
        raise ValueError(
            f"labels hold a single class ({int(labels.sum())} members, {int((~labels).sum())} non-members); "
            "metrics need both members and non-members"
        )
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


def threshold_at_fpr(labels: np.ndarray, scores: np.ndarray, target: float) -> float:
    """Return the lowest threshold that flags at most ``target`` of the non-members here.

    Only non-member scores set it, as in a test of the null hypothesis "not a member": with n
    non-members, k = floor(target n) of them may score at or above it, so it sits just above the
    (k+1)-th highest non-member score. Images tied with that score are never flagged, so a tie is
    not split.
    """
    labels, scores = _check(labels, scores)
    nonmembers = np.sort(scores[~labels])[::-1]
    allowed = int(np.floor(target * len(nonmembers) + 1e-9))
    if allowed >= len(nonmembers):
        return -np.inf
    return float(np.nextafter(nonmembers[allowed], np.inf))


def balanced_threshold(labels: np.ndarray, scores: np.ndarray) -> float:
    """Return the threshold with the best balanced accuracy on these labels (the ASR's threshold)."""
    fpr, tpr, thresholds = roc(labels, scores)
    return float(thresholds[np.argmax(tpr - fpr)])


def rates_at(labels: np.ndarray, scores: np.ndarray, threshold: float) -> tuple[float, float]:
    """Return (FPR, TPR) when every score at or above ``threshold`` is flagged as a member."""
    labels = np.asarray(labels, dtype=bool)
    flagged = np.asarray(scores) >= threshold
    return float(flagged[~labels].mean()), float(flagged[labels].mean())


def calibrated_metrics(calibration: tuple[np.ndarray, np.ndarray], evaluation: tuple[np.ndarray, np.ndarray]) -> dict[str, float]:
    """Evaluation metrics with every threshold chosen on the calibration split.

    Args:
        calibration, evaluation: ``(labels, scores)`` of each split, both classes present.

    Returns:
        ``auc``; ``asr`` (balanced accuracy at the calibration threshold); for each FPR target,
        ``tpr_at_1pct_fpr`` and ``fpr_at_1pct_threshold`` (the realised evaluation rates at the
        threshold of :func:`threshold_at_fpr` on the calibration split), and the same for 0.1%.
        With n calibration non-members a target below 1/n allows no false positive, so the
        threshold sits above the highest calibration non-member score.
    """
    cal_labels, cal_scores = _check(*calibration)
    labels, scores = _check(*evaluation)
    fpr, tpr = rates_at(labels, scores, balanced_threshold(cal_labels, cal_scores))
    result = {"auc": float(roc_auc_score(labels, scores)), "asr": (tpr + 1.0 - fpr) / 2.0}
    for name, target in FPR_TARGETS.items():
        fpr, tpr = rates_at(labels, scores, threshold_at_fpr(cal_labels, cal_scores, target))
        result[name] = tpr
        result[name.replace("tpr_at_", "fpr_at_").replace("_fpr", "_threshold")] = fpr
    return result


def oracle_metrics(labels: np.ndarray, scores: np.ndarray) -> dict[str, float]:
    """ASR and TPR at 1% and 0.1% FPR read off the evaluation ROC, prefixed ``oracle_``."""
    measured = attack_metrics(labels, scores)
    return {f"oracle_{name}": measured[name] for name in ("asr", *FPR_TARGETS)}


def bootstrap_intervals(
    calibration: tuple[np.ndarray, np.ndarray],
    evaluation: tuple[np.ndarray, np.ndarray],
    resamples: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap intervals of the calibrated AUC, ASR and TPRs.

    Members and non-members of each split are resampled independently, so every resample keeps
    the class sizes, and the thresholds are chosen again on each resampled calibration split:
    the intervals include the uncertainty of the threshold.

    Returns:
        ``{metric: (low, high)}`` for each name in :data:`CALIBRATED`.
    """
    if not isinstance(resamples, int) or resamples < 2:
        raise ValueError(f"resamples={resamples!r} must be an integer of at least 2; 1000 is usual")
    cal_labels, cal_scores = _check(*calibration)
    labels, scores = _check(*evaluation)
    samples = (cal_scores[cal_labels], cal_scores[~cal_labels], scores[labels], scores[~labels])
    sizes = dict(zip(("calibration members", "calibration non-members", "evaluation members", "evaluation non-members"), map(len, samples)))
    if min(sizes.values()) < 2:
        raise ValueError(f"bootstrap intervals need at least 2 images in each group, got {sizes}; enlarge the sets")

    def statistic(cal_members, cal_nonmembers, members, nonmembers):
        cal = (np.r_[np.ones(len(cal_members), bool), np.zeros(len(cal_nonmembers), bool)], np.r_[cal_members, cal_nonmembers])
        ev = (np.r_[np.ones(len(members), bool), np.zeros(len(nonmembers), bool)], np.r_[members, nonmembers])
        measured = calibrated_metrics(cal, ev)
        return np.array([measured[name] for name in CALIBRATED])

    result = bootstrap(samples, statistic, paired=False, vectorized=False, n_resamples=resamples,
                       confidence_level=confidence, method="percentile", random_state=np.random.default_rng(seed))
    low, high = result.confidence_interval
    return {name: (float(low[i]), float(high[i])) for i, name in enumerate(CALIBRATED)}


def attack_table(scores: pd.DataFrame, resamples: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Measure every attack of a score table: calibrated metrics with 95% intervals, oracle readings.

    Args:
        scores: tidy score table with columns ``attack``, ``setting``, ``nfe``, ``member``,
            ``split`` ("calibration" or "evaluation") and ``score``.
        resamples: bootstrap resamples per attack.
        seed: seed of the bootstrap.

    Returns:
        Columns attack, setting, nfe, then for each of auc, asr, tpr_at_1pct_fpr and
        tpr_at_0_1pct_fpr the value and its ``_low`` and ``_high`` interval ends, the realised
        evaluation FPR at each calibrated threshold, the ``oracle_*`` readings, n_members and
        n_nonmembers (evaluation split).
    """
    _check_score_table(scores)
    rows = []
    for (attack, setting, nfe), group in scores.groupby(["attack", "setting", "nfe"], sort=False):
        splits = {}
        for split in ("calibration", "evaluation"):
            part = group[group.split.to_numpy() == split]
            if part.empty:
                raise ValueError(f"attack {attack!r} has no scores on the {split} split; score every image of the manifest")
            splits[split] = (part.member.to_numpy(dtype=bool), part.score.to_numpy(dtype=np.float64))
        row = {"attack": attack, "setting": setting, "nfe": int(nfe)}
        try:
            measured = calibrated_metrics(splits["calibration"], splits["evaluation"])
            intervals = bootstrap_intervals(splits["calibration"], splits["evaluation"], resamples, seed)
        except ValueError as error:
            raise ValueError(f"attack {attack!r} ({setting}): {error}") from error
        for name in CALIBRATED:
            row.update({name: measured[name], f"{name}_low": intervals[name][0], f"{name}_high": intervals[name][1]})
        row.update({name: value for name, value in measured.items() if name.startswith("fpr_at_")})
        row.update(oracle_metrics(*splits["evaluation"]))
        labels = splits["evaluation"][0]
        row.update({"n_members": int(labels.sum()), "n_nonmembers": int((~labels).sum())})
        rows.append(row)
    return pd.DataFrame(rows)


def check_labels(table: pd.DataFrame, columns: tuple[str, ...], kind: str) -> None:
    """Raise ValueError unless ``table`` has ``columns``, a boolean ``member`` and known ``split`` values.

    Shared by the score table here and the manifest in :mod:`fcre_utils.suite`; ``kind`` names
    the table in the messages.
    """
    missing = [c for c in columns if c not in table]
    if missing:
        raise ValueError(f"the {kind} lacks columns {missing}; it needs {', '.join(columns)}")
    if table.member.dtype != bool:
        raise ValueError(f"{kind} column 'member' must be boolean, got {table.member.dtype}; map it to True/False first")
    splits = set(table.split)
    if not splits <= {"calibration", "evaluation"}:
        raise ValueError(f"{kind} split values {sorted(map(str, splits))} must be 'calibration' or 'evaluation'")


def _check_score_table(scores: pd.DataFrame) -> None:
    """Raise ValueError for a score table that :func:`attack_table` would misread."""
    check_labels(scores, ("attack", "setting", "nfe", "member", "split", "score"), "score table")
    if scores.empty:
        raise ValueError("the score table is empty; score some images first")
    keys = scores[["attack", "setting", "nfe"]]
    if keys.isna().any().any():
        raise ValueError(f"{int(keys.isna().any(axis=1).sum())} rows have no attack, setting or nfe; fill them in")


def format_table(table: pd.DataFrame) -> pd.DataFrame:
    """Return the attack table as text cells "value [low, high]" for display and markdown."""
    cells = pd.DataFrame({"attack": table.attack, "setting": table.setting, "NFE": table.nfe})
    labels = {"auc": "AUC", "asr": "ASR", "tpr_at_1pct_fpr": "TPR@1%FPR", "tpr_at_0_1pct_fpr": "TPR@0.1%FPR"}
    for name, label in labels.items():
        cells[label] = [f"{v:.3f} [{lo:.3f}, {hi:.3f}]" for v, lo, hi in zip(table[name], table[f"{name}_low"], table[f"{name}_high"])]
    cells["FPR at 1% / 0.1% threshold"] = [f"{a:.2%} / {b:.2%}" for a, b in zip(table.fpr_at_1pct_threshold, table.fpr_at_0_1pct_threshold)]
    cells["oracle TPR@1% / 0.1%FPR"] = [f"{a:.3f} / {b:.3f}" for a, b in zip(table.oracle_tpr_at_1pct_fpr, table.oracle_tpr_at_0_1pct_fpr)]
    return cells


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
