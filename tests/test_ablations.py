import numpy as np
import pandas as pd
import pytest
import torch

from fcre_utils import ablations, analysis, attacks, models, reconstruction, training, widgets
from fcre_utils.presets import resolve_params
from test_suite import fake_reconstructions


def test_score_rows_use_evaluation_auc_and_calibrated_threshold():
    recon, manifest = fake_reconstructions()
    scores = attacks.fcre_scores(recon.x0, recon.x0_recon[10], 0.0, 0.5, "l2")
    table = ablations.score_rows(manifest, {"l2": scores}, resamples=100, seed=0)
    evaluation = manifest.split.to_numpy() == "evaluation"
    row = table.iloc[0]
    assert row.auc == pytest.approx(analysis.auc(manifest.member.to_numpy()[evaluation], scores[evaluation]))
    assert row.auc_low <= row.auc <= row.auc_high
    assert 0.0 <= row.tpr_at_1pct_fpr <= 1.0


def test_band_grid_covers_every_band_of_the_edges():
    recon, manifest = fake_reconstructions()
    grid = ablations.band_grid(recon, manifest, 10, [0.0, 0.5, 1.0, 1.5])
    assert len(grid) == 6 * 2
    assert (grid.low < grid.high).all()
    evaluation = manifest.split.to_numpy() == "evaluation"
    l2 = attacks.fcre_scores(recon.x0, recon.x0_recon[10], 0.5, 1.5, "l2")
    cell = grid[(grid.low == 0.5) & (grid.high == 1.5) & (grid.metric == "L2")].iloc[0]
    assert cell.auc == pytest.approx(analysis.auc(manifest.member.to_numpy()[evaluation], l2[evaluation]))


def test_timestep_and_metric_tables():
    recon, manifest = fake_reconstructions()
    by_t = ablations.by_timestep(recon, manifest, (0.0, 0.5), resamples=50, seed=0)
    assert set(by_t.t) == {10, 20}
    assert set(by_t.metric) == {"L2", "SSIM"}
    by_metric = ablations.by_metric(recon, manifest, 20, (0.0, 0.5), resamples=50, seed=0)
    assert list(by_metric.metric) == ["L1", "L2", "SSIM", "L2+SSIM"]
    # members have the smaller error in this synthetic set, so every metric separates them
    assert (by_metric.auc > 0.9).all()


@pytest.fixture(scope="module")
def small_run(tiny_model):
    unet, scheduler, model_dir, images = tiny_model
    manifest = pd.DataFrame({"image_id": np.arange(len(images)), "member": np.arange(len(images)) < 12,
                             "split": np.where(np.arange(len(images)) % 2 == 0, "calibration", "evaluation")})
    params = resolve_params("smoke", {"bootstrap_resamples": 20, "epochs": 2})
    return unet, scheduler, model_dir, images, manifest, params


def test_stride_ablation_matches_direct_reconstruction(small_run):
    unet, scheduler, _, images, manifest, params = small_run
    table = ablations.by_stride(unet, scheduler.alphas_cumprod, images, manifest, 20, (0.0, 0.5), [10, 20], params)
    assert list(table.stride.unique()) == [20, 10]
    assert list(table.nfe.unique()) == [2, 4]
    recon = reconstruction.reconstruct(unet, images, [20], 10, scheduler.alphas_cumprod, 8, progress=False)
    expected = attacks.fcre_scores(recon.x0, recon.x0_recon[20], 0.0, 0.5, "l2")
    evaluation = manifest.split.to_numpy() == "evaluation"
    row = table[(table.stride == 10) & (table.score == "FCRE L2")].iloc[0]
    assert row.auc == pytest.approx(analysis.auc(manifest.member.to_numpy()[evaluation], expected[evaluation]))


def test_training_length_reads_every_snapshot(small_run, tmp_path):
    *_, images, manifest, params = small_run
    unet = models.build_unet(params)
    training.train_ddpm(unet, models.build_scheduler(params), images[:12], params, tmp_path / "model", history_dir=tmp_path / "history")
    table = ablations.along_training(training.list_snapshots(tmp_path / "history"), images, manifest, 20, (0.0, 0.5), params)
    assert sorted(table.epoch.unique()) == [1, 2]
    with pytest.raises(ValueError, match="no weight snapshots"):
        ablations.along_training({}, images, manifest, 20, (0.0, 0.5), params)


def test_member_count_trains_per_size(small_run, tmp_path):
    *_, images, manifest, params = small_run
    table = ablations.by_member_count(images, manifest, [4], 20, (0.0, 0.5), params, tmp_path)
    assert list(table.members.unique()) == [4]
    assert (tmp_path / "members-00004" / "unet").is_dir()
    again = ablations.by_member_count(images, manifest, [4], 20, (0.0, 0.5), params, tmp_path)  # reuses the trained model
    pd.testing.assert_frame_equal(table, again)
    with pytest.raises(ValueError, match="member-set size 40 must be in"):
        ablations.by_member_count(images, manifest, [40], 20, (0.0, 0.5), params, tmp_path)


def test_band_explorer_auc_and_figure():
    recon, manifest = fake_reconstructions()
    edges = analysis.ring_edges(0.25)
    energies = analysis.ring_energies(recon.x0, recon.x0_recon[10], edges)
    labels = manifest.member.to_numpy()
    explorer = widgets.BandExplorer(recon.x0[:4], recon.x0_recon[10][:4], energies, edges, labels)
    assert explorer.snap(0.1, 0.6) == (0.0, 0.5)
    expected = analysis.auc(labels, attacks.fcre_scores(recon.x0, recon.x0_recon[10], 0.0, 0.5, "l2"))
    assert explorer.band_auc(0.0, 0.5) == pytest.approx(expected)
    fig = explorer.figure(0.0, 0.5)
    assert "L2 AUC" in fig._suptitle.get_text()
    assert len(fig.axes) == 4 * 4
    assert explorer.widget(0.0, 0.5).children[0].value == (0.0, 0.5)
    with pytest.raises(ValueError, match="one label per scored image"):
        widgets.BandExplorer(recon.x0[:4], recon.x0_recon[10][:4], energies, edges, labels[:-1])
