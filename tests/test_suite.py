import numpy as np
import pandas as pd
import pytest
import torch

from fcre_utils import attacks, suite
from fcre_utils.reconstruction import Reconstructions


def fake_reconstructions(n_members=12, n_nonmembers=28, seed=0):
    """Reconstructions where members have a smaller low-frequency error than non-members."""
    generator = torch.Generator().manual_seed(seed)
    n = n_members + n_nonmembers
    x0 = torch.rand(n, 1, 16, 16, generator=generator, dtype=torch.float64) * 2 - 1
    scale = torch.cat([torch.full((n_members,), 0.05), torch.full((n_nonmembers,), 0.3)]).double().view(-1, 1, 1, 1)
    smooth = torch.nn.functional.avg_pool2d(torch.randn(n, 1, 16, 16, generator=generator, dtype=torch.float64), 3, 1, 1)
    recon = {t: x0 + scale * smooth * t / 10 for t in (10, 20)}
    x_t = {t: x0 * 0.9 for t in (10, 20)}
    roundtrip = {t: x_t[t] + scale * smooth for t in (10, 20)}
    manifest = pd.DataFrame({
        "image_id": np.arange(n),
        "member": np.r_[np.ones(n_members, bool), np.zeros(n_nonmembers, bool)],
        "split": np.where(np.arange(n) % 2 == 0, "calibration", "evaluation"),
    })
    return Reconstructions(x0=x0, x_t=x_t, x_t_roundtrip=roundtrip, x0_recon=recon, nfe={10: 3, 20: 5}), manifest


BANDS = [[0.0, 0.5], [0.5, 1.5]]


def test_selection_covers_grid():
    recon, manifest = fake_reconstructions()
    table = suite.select_fcre_settings(recon, manifest, BANDS, stride=10)
    assert len(table) == 2 * 2 * 2 * 3
    assert table.selected.sum() == 3
    assert set(table[table.selected].metric) == {"ssim", "l2", "l2_ssim"}


def test_selection_uses_calibration_only():
    recon, manifest = fake_reconstructions()
    before = suite.select_fcre_settings(recon, manifest, BANDS, stride=10)
    evaluation = torch.from_numpy(manifest.split.to_numpy() == "evaluation")
    for t in recon.x0_recon:
        recon.x0_recon[t][evaluation] = torch.randn_like(recon.x0_recon[t][evaluation])
        recon.x_t_roundtrip[t][evaluation] = torch.randn_like(recon.x_t_roundtrip[t][evaluation])
    after = suite.select_fcre_settings(recon, manifest, BANDS, stride=10)
    pd.testing.assert_frame_equal(before, after)


def test_selected_row_is_best_calibration_auc():
    recon, manifest = fake_reconstructions()
    table = suite.select_fcre_settings(recon, manifest, BANDS, stride=10)
    for metric, group in table.groupby("metric"):
        assert group[group.selected].auc.iloc[0] == group.auc.max()


def test_selection_needs_both_classes():
    recon, manifest = fake_reconstructions()
    manifest.loc[manifest.member, "split"] = "evaluation"
    with pytest.raises(ValueError, match="calibration split needs members and non-members"):
        suite.select_fcre_settings(recon, manifest, BANDS, stride=10)


def test_scores_table_matches_direct_scoring():
    recon, manifest = fake_reconstructions()
    settings = suite.fixed_fcre_settings("x0", 20, (0.0, 0.5), stride=10)
    scores = suite.fcre_scores_table(recon, manifest, settings)
    ssim = scores[scores.attack == "fcre_ssim"].score.to_numpy()
    np.testing.assert_allclose(ssim, attacks.fcre_scores(recon.x0, recon.x0_recon[20], 0.0, 0.5, "ssim"))
    assert set(scores.nfe) == {4}
    assert len(scores) == 3 * len(manifest)


def test_l2_weight_fit_on_calibration():
    recon, manifest = fake_reconstructions()
    settings = suite.fixed_fcre_settings("residual", 10, (0.0, 0.5), stride=10)
    scores = suite.fcre_scores_table(recon, manifest, settings)
    calibration = (manifest.split == "calibration").to_numpy()
    original, reconstruction = suite.protocol_pair(recon, "residual", 10)
    ssim = attacks.fcre_scores(original, reconstruction, 0.0, 0.5, "ssim")
    l2 = attacks.fcre_scores(original, reconstruction, 0.0, 0.5, "l2")
    weight = attacks.balance_l2_weight(ssim[calibration], l2[calibration])
    combined = scores[scores.attack == "fcre_l2_ssim"].score.to_numpy()
    np.testing.assert_allclose(combined, ssim + weight * l2)


def test_protocol_nfe():
    assert suite.protocol_nfe("x0", 100, 10) == 20
    assert suite.protocol_nfe("residual", 100, 10) == 12


def test_unknown_protocol_rejected():
    recon, _ = fake_reconstructions()
    with pytest.raises(ValueError, match="unknown protocol 'both'"):
        suite.protocol_pair(recon, "both", 10)
