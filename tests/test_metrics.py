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
    with pytest.raises(ValueError, match="1 scores are NaN"):
        metrics.attack_metrics(np.array([1, 0, 1], bool), np.array([0.1, np.nan, 0.3]))


def test_length_mismatch_rejected():
    with pytest.raises(ValueError, match="equal length"):
        metrics.attack_metrics(np.array([1, 0], bool), np.array([0.1, 0.2, 0.3]))


def test_metrics_table_uses_one_split(separable):
    labels, scores = separable
    split = np.where(np.arange(len(labels)) % 4 == 0, "calibration", "evaluation")
    table = pd.DataFrame({"attack": "a", "setting": "s", "nfe": 3, "member": labels, "split": split, "score": scores})
    row = metrics.metrics_table(table, "evaluation").iloc[0]
    evaluation = split == "evaluation"
    assert row.auc == pytest.approx(roc_auc_score(labels[evaluation], scores[evaluation]))
    assert row.n_members + row.n_nonmembers == evaluation.sum()
    assert row.nfe == 3


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
