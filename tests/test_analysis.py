import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats
from sklearn.metrics import roc_auc_score

from fcre_utils import analysis, attacks, frequency


def image_pairs(n=40, seed=0):
    generator = torch.Generator().manual_seed(seed)
    original = torch.rand(n, 1, 16, 16, generator=generator, dtype=torch.float64) * 2 - 1
    return original, original + 0.2 * torch.randn(n, 1, 16, 16, generator=generator, dtype=torch.float64)


def test_rings_partition_the_spectrum():
    edges = analysis.ring_edges(0.1)
    assert edges[0][0] == 0.0
    assert edges[-1][1] > frequency.MAX_RADIUS
    assert all(a[1] == pytest.approx(b[0]) for a, b in zip(edges, edges[1:]))
    masks = torch.stack([frequency.band_mask(12, 12, low, high) for low, high in edges])
    assert (masks.sum(dim=0) == 1).all()


@pytest.mark.parametrize("band", [(0.0, 0.3), (0.3, 0.8), (0.5, 1.5), (0.0, 1.5)])
def test_ring_energies_add_up_to_band_l2(band):
    original, reconstruction = image_pairs()
    edges = analysis.ring_edges(0.1)
    energies = analysis.ring_energies(original, reconstruction, edges)
    expected = attacks.l2_scores(frequency.bandpass(original, *band), frequency.bandpass(reconstruction, *band))
    np.testing.assert_allclose(analysis.band_l2_from_rings(energies, edges, *band), expected, rtol=1e-9, atol=1e-12)


def test_band_between_ring_edges_is_rejected():
    original, reconstruction = image_pairs()
    edges = analysis.ring_edges(0.1)
    energies = analysis.ring_energies(original, reconstruction, edges)
    with pytest.raises(ValueError, match=r"band \[0.05, 0.3\) does not start and end on ring edges \(0, 0.1, 0.2"):
        analysis.band_l2_from_rings(energies, edges, 0.05, 0.3)


def test_auc_matches_scikit_learn_and_interval_covers_it():
    rng = np.random.default_rng(1)
    labels = np.r_[np.ones(30, bool), np.zeros(50, bool)]
    scores = rng.normal(size=80) + 0.8 * labels
    value, low, high = analysis.auc_interval(labels, scores, resamples=500, seed=0)
    assert value == pytest.approx(roc_auc_score(labels, scores))
    assert low < value < high
    assert (low, high) == analysis.auc_interval(labels, scores, resamples=500, seed=0)[1:]


def test_auc_interval_rejects_one_class_and_nan():
    with pytest.raises(ValueError, match="1 members and 0 non-members|members and non-members"):
        analysis.auc_interval(np.array([True]), np.array([0.3]))
    with pytest.raises(ValueError, match="score 1 is not finite"):
        analysis.auc_interval(np.array([True, False]), np.array([0.3, np.nan]))


def test_high_frequency_share_orders_smooth_and_noisy_images():
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(4, 1, 32, 32, generator=generator)
    smooth = torch.nn.functional.avg_pool2d(noise, 7, 1, 3)
    share_noise, share_smooth = analysis.high_frequency_share(noise), analysis.high_frequency_share(smooth)
    assert ((share_noise > 0.5) & (share_smooth < 0.2)).all()
    with pytest.raises(ValueError, match="image 0 is constant"):
        analysis.high_frequency_share(torch.zeros(1, 1, 8, 8))


def test_correlation_table_matches_spearman_per_group():
    rng = np.random.default_rng(2)
    difficulty = rng.uniform(size=60)
    table = pd.DataFrame({"member": np.arange(60) < 20, "difficulty": difficulty,
                          "score": -difficulty + 0.1 * rng.normal(size=60), "noise": rng.normal(size=60)})
    result = analysis.correlation_table(table, ["score", "noise"], ["difficulty"], resamples=200)
    members = result[(result.group == "members") & (result.score == "score")].iloc[0]
    assert members.rho == pytest.approx(stats.spearmanr(table.score[:20], table.difficulty[:20]).statistic)
    assert members.rho_low < members.rho < members.rho_high < -0.5
    noise = result[(result.group == "non-members") & (result.score == "noise")].iloc[0]
    assert noise.rho_low < 0 < noise.rho_high
