import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score, roc_curve

from fcre_utils import metrics


@pytest.fixture
def separable():
    rng = np.random.default_rng(0)
    labels = np.r_[np.ones(200, bool), np.zeros(1000, bool)]
    scores = np.r_[rng.normal(2, 1, 200), rng.normal(0, 1, 1000)]
    return labels, scores


def brute_force_tpr(labels, scores, target):
    best = 0.0
    for threshold in np.unique(scores):
        predicted = scores >= threshold
        fpr = predicted[~labels].mean()
        if fpr <= target:
            best = max(best, predicted[labels].mean())
    return best


def test_auc_matches_sklearn(separable):
    labels, scores = separable
    assert metrics.attack_metrics(labels, scores)["auc"] == pytest.approx(roc_auc_score(labels, scores))


def test_roc_keeps_every_threshold(separable):
    labels, scores = separable
    fpr, tpr, _ = metrics.roc(labels, scores)
    ref_fpr, ref_tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
    np.testing.assert_array_equal(fpr, ref_fpr)
    np.testing.assert_array_equal(tpr, ref_tpr)


@pytest.mark.parametrize("target", [0.001, 0.01, 0.1])
def test_tpr_matches_brute_force(separable, target):
    labels, scores = separable
    fpr, tpr, _ = metrics.roc(labels, scores)
    assert metrics.tpr_at_fpr(fpr, tpr, target) == pytest.approx(brute_force_tpr(labels, scores, target))


def test_tpr_never_exceeds_target_fpr():
    fpr = np.array([0.0, 0.004, 0.012, 0.5, 1.0])
    tpr = np.array([0.0, 0.3, 0.8, 0.9, 1.0])
    assert metrics.tpr_at_fpr(fpr, tpr, 0.01) == 0.3


def test_tpr_with_tied_scores():
    labels = np.array([1, 1, 0, 0, 0, 0], bool)
    scores = np.array([5.0, 3.0, 3.0, 1.0, 0.0, -1.0])
    fpr, tpr, _ = metrics.roc(labels, scores)
    assert metrics.tpr_at_fpr(fpr, tpr, 0.2) == 0.5
    assert metrics.tpr_at_fpr(fpr, tpr, 0.25) == 1.0


def test_tpr_without_point_below_target():
    labels = np.array([1, 0, 1, 0], bool)
    scores = np.array([1.0, 2.0, 0.5, 0.1])
    fpr, tpr, _ = metrics.roc(labels, scores)
    assert metrics.tpr_at_fpr(fpr, tpr, 0.01) == 0.0


def test_asr_is_best_balanced_accuracy(separable):
    labels, scores = separable
    best = max(((scores >= t)[labels].mean() + (scores < t)[~labels].mean()) / 2 for t in np.unique(scores))
    assert metrics.attack_metrics(labels, scores)["asr"] == pytest.approx(best)


def test_perfect_attack():
    labels = np.array([1, 1, 0, 0], bool)
    result = metrics.attack_metrics(labels, np.array([3.0, 2.0, 1.0, 0.0]))
    assert result["auc"] == 1.0
    assert result["asr"] == 1.0
    assert result["tpr_at_0_1pct_fpr"] == 1.0
    assert result["n_members"] == 2
    assert result["n_nonmembers"] == 2


def test_constant_scores_give_chance():
    labels = np.array([1, 1, 0, 0, 0], bool)
    result = metrics.attack_metrics(labels, np.zeros(5))
    assert result["auc"] == 0.5
    assert result["asr"] == 0.5
    assert result["tpr_at_1pct_fpr"] == 0.0


def test_single_class_rejected():
    with pytest.raises(ValueError, match="single class"):
        metrics.attack_metrics(np.ones(4, bool), np.arange(4.0))


def test_nan_scores_rejected():
    with pytest.raises(ValueError, match=r"1 scores are NaN or infinite \(first at index 1, value nan\)"):
        metrics.attack_metrics(np.array([1, 0, 1], bool), np.array([0.1, np.nan, 0.3]))


def test_length_mismatch_rejected():
    with pytest.raises(ValueError, match="equal length"):
        metrics.attack_metrics(np.array([1, 0], bool), np.array([0.1, 0.2, 0.3]))


def score_frame(labels, scores, split):
    return pd.DataFrame({"attack": "a", "setting": "s", "nfe": 3, "member": labels, "split": split, "score": scores})


def test_threshold_at_fpr_is_conservative():
    labels = np.array([1, 1, 1, 0, 0, 0, 0], bool)
    scores = np.array([9.0, 5.0, 2.0, 6.0, 3.0, 1.0, 0.0])
    strict = metrics.threshold_at_fpr(labels, scores, 0.2)  # no non-member may be flagged
    assert 6.0 < strict < 9.0
    assert metrics.rates_at(labels, scores, strict) == (0.0, pytest.approx(1 / 3))
    loose = metrics.threshold_at_fpr(labels, scores, 0.25)  # one of four non-members may be flagged
    assert 3.0 < loose < 5.0
    assert metrics.rates_at(labels, scores, loose) == (0.25, pytest.approx(2 / 3))


def test_threshold_ignores_member_scores():
    labels = np.array([1, 1, 0, 0, 0], bool)
    first = metrics.threshold_at_fpr(labels, np.array([9.0, 8.0, 2.0, 1.0, 0.0]), 0.01)
    second = metrics.threshold_at_fpr(labels, np.array([2.5, -4.0, 2.0, 1.0, 0.0]), 0.01)
    assert first == second


def test_threshold_without_point_below_target():
    labels = np.array([1, 0, 1, 0], bool)
    scores = np.array([1.0, 2.0, 0.5, 0.1])  # the top score is a non-member
    threshold = metrics.threshold_at_fpr(labels, scores, 0.01)
    assert threshold > 2.0
    assert metrics.rates_at(labels, scores, threshold) == (0.0, 0.0)


def test_threshold_never_splits_tie():
    labels = np.array([1, 1, 0, 0, 0, 0], bool)
    scores = np.array([5.0, 3.0, 3.0, 1.0, 0.0, -1.0])  # a member and a non-member tie at 3
    threshold = metrics.threshold_at_fpr(labels, scores, 0.2)
    assert metrics.rates_at(labels, scores, threshold) == (0.0, 0.5)


def test_threshold_at_full_fpr_flags_everything():
    labels = np.array([1, 0, 0], bool)
    assert metrics.threshold_at_fpr(labels, np.array([0.0, 1.0, 2.0]), 1.0) == -np.inf


def test_calibrated_thresholds_come_from_calibration():
    calibration = (np.array([1, 1, 0, 0, 0, 0], bool), np.array([4.0, 3.0, 2.0, 1.0, 0.0, -1.0]))
    # on evaluation data alone a threshold of 10 would be perfect; calibration puts it just above 2
    evaluation = (np.array([1, 1, 0, 0], bool), np.array([11.0, 10.0, 5.0, 1.5]))
    result = metrics.calibrated_metrics(calibration, evaluation)
    assert result["tpr_at_1pct_fpr"] == 1.0
    assert result["fpr_at_1pct_threshold"] == 0.5
    assert result["asr"] == 0.75
    assert result["auc"] == 1.0


def test_oracle_reads_evaluation_roc():
    calibration = (np.array([1, 1, 0, 0, 0, 0], bool), np.array([4.0, 3.0, 2.0, 1.0, 0.0, -1.0]))
    evaluation = (np.array([1, 1, 0, 0], bool), np.array([11.0, 10.0, 5.0, 1.5]))
    table = metrics.attack_table(pd.concat([
        score_frame(*calibration, "calibration"), score_frame(*evaluation, "evaluation")]), resamples=20)
    assert table.oracle_tpr_at_1pct_fpr.iloc[0] == 1.0
    assert table.oracle_asr.iloc[0] == 1.0
    assert table.tpr_at_1pct_fpr.iloc[0] == 1.0
    assert table.fpr_at_1pct_threshold.iloc[0] == 0.5


def test_table_values_lie_on_plotted_roc(separable):
    labels, scores = separable
    split = np.where(np.arange(len(labels)) % 4 == 0, "calibration", "evaluation")
    row = metrics.attack_table(score_frame(labels, scores, split), resamples=50).iloc[0]
    evaluation = split == "evaluation"
    fpr, tpr, _ = metrics.roc(labels[evaluation], scores[evaluation])
    for name, target in metrics.FPR_TARGETS.items():
        assert row[f"oracle_{name}"] == metrics.tpr_at_fpr(fpr, tpr, target)
        point = (row[name.replace("tpr_at_", "fpr_at_").replace("_fpr", "_threshold")], row[name])
        assert np.any((fpr == point[0]) & (tpr == point[1])), name


def test_attack_table_uses_evaluation_sizes(separable):
    labels, scores = separable
    split = np.where(np.arange(len(labels)) % 4 == 0, "calibration", "evaluation")
    row = metrics.attack_table(score_frame(labels, scores, split), resamples=50).iloc[0]
    evaluation = split == "evaluation"
    assert row.auc == pytest.approx(roc_auc_score(labels[evaluation], scores[evaluation]))
    assert row.n_members + row.n_nonmembers == evaluation.sum()
    assert row.nfe == 3


def test_attack_table_needs_calibration_scores(separable):
    labels, scores = separable
    with pytest.raises(ValueError, match="attack 'a' has no scores on the calibration split"):
        metrics.attack_table(score_frame(labels, scores, "evaluation"), resamples=20)


def test_bootstrap_intervals_contain_estimate(separable):
    labels, scores = separable
    calibration = (labels[::2], scores[::2])
    evaluation = (labels[1::2], scores[1::2])
    intervals = metrics.bootstrap_intervals(calibration, evaluation, resamples=200, seed=1)
    point = metrics.calibrated_metrics(calibration, evaluation)
    for name in metrics.CALIBRATED:
        low, high = intervals[name]
        assert low <= point[name] <= high, name
        assert low < high, name


def test_bootstrap_auc_interval_matches_delong(separable):
    labels, scores = separable
    low, high = metrics.bootstrap_intervals((labels, scores), (labels, scores), resamples=400, seed=0)["auc"]
    # DeLong's variance: the AUC's placement values of each class, variance over its size
    members, nonmembers = scores[labels], scores[~labels]
    wins = (members[:, None] > nonmembers[None, :]) + 0.5 * (members[:, None] == nonmembers[None, :])
    variance = wins.mean(axis=1).var(ddof=1) / len(members) + wins.mean(axis=0).var(ddof=1) / len(nonmembers)
    assert (high - low) == pytest.approx(2 * 1.96 * np.sqrt(variance), rel=0.2)


def test_bootstrap_is_seeded(separable):
    labels, scores = separable
    first = metrics.bootstrap_intervals((labels, scores), (labels, scores), resamples=50, seed=3)
    second = metrics.bootstrap_intervals((labels, scores), (labels, scores), resamples=50, seed=3)
    assert first == second


def test_bootstrap_perfect_attack():
    labels = np.r_[np.ones(10, bool), np.zeros(30, bool)]
    scores = np.r_[np.arange(10) + 100.0, np.arange(30.0)]
    intervals = metrics.bootstrap_intervals((labels, scores), (labels, scores), resamples=50)
    assert intervals["auc"] == pytest.approx((1.0, 1.0))
    assert intervals["tpr_at_0_1pct_fpr"] == pytest.approx((1.0, 1.0))


def test_bootstrap_needs_resamples(separable):
    labels, scores = separable
    with pytest.raises(ValueError, match="resamples=1 must be an integer of at least 2"):
        metrics.bootstrap_intervals((labels, scores), (labels, scores), resamples=1)


def test_format_table_shows_intervals(separable):
    labels, scores = separable
    split = np.where(np.arange(len(labels)) % 4 == 0, "calibration", "evaluation")
    table = metrics.attack_table(score_frame(labels, scores, split), resamples=50)
    shown = metrics.format_table(table)
    row = table.iloc[0]
    assert shown["AUC"].iloc[0] == f"{row.auc:.3f} [{row.auc_low:.3f}, {row.auc_high:.3f}]"
    assert list(shown.columns[:4]) == ["attack", "setting", "NFE", "AUC"]


def test_ring_auc_orientation():
    labels = np.array([1, 1, 0, 0], bool)
    errors = np.array([[0.1, 5.0], [0.2, 6.0], [0.9, 1.0], [0.8, 2.0]])
    np.testing.assert_allclose(metrics.ring_auc(labels, errors), [1.0, 0.0])


@pytest.mark.parametrize("labels", [np.array(["a", "b", "a"]), np.array([0, 1, 2])])
def test_invalid_labels_rejected(labels):
    with pytest.raises(ValueError, match="booleans or 0/1"):
        metrics.attack_metrics(labels, np.array([0.1, 0.2, 0.3]))


def test_integer_labels_accepted():
    result = metrics.attack_metrics(np.array([1, 0, 1, 0]), np.array([0.9, 0.1, 0.8, 0.2]))
    assert result["auc"] == 1.0


@pytest.mark.parametrize("change, message", [
    (lambda t: t.drop(columns="score"), r"lacks columns \['score'\]"),
    (lambda t: t.assign(member=t.member.map({True: "yes", False: "no"})), "column 'member' must be boolean"),
    (lambda t: t.assign(split="validation"), r"split values \['validation'\]"),
    (lambda t: t.assign(setting=None), "rows have no attack, setting or nfe"),
    (lambda t: t.iloc[:0], "the score table is empty"),
])
def test_attack_table_input_checked(separable, change, message):
    labels, scores = separable
    split = np.where(np.arange(len(labels)) % 4 == 0, "calibration", "evaluation")
    with pytest.raises(ValueError, match=message):
        metrics.attack_table(change(score_frame(labels, scores, split)), resamples=10)


def test_attack_table_names_attack_in_error(separable):
    labels, scores = separable
    split = np.where(np.arange(len(labels)) % 4 == 0, "calibration", "evaluation")
    scores = scores.copy()
    scores[5] = np.nan
    with pytest.raises(ValueError, match=r"attack 'a' \(s\): 1 scores are NaN"):
        metrics.attack_table(score_frame(labels, scores, split), resamples=10)


def test_bootstrap_needs_two_per_group():
    labels = np.array([True, False, False])
    with pytest.raises(ValueError, match="at least 2 images in each group"):
        metrics.bootstrap_intervals((labels, np.arange(3.0)), (labels, np.arange(3.0)), resamples=10)
