import numpy as np
import pandas as pd
import pytest
import torch

from fcre_utils import attacks, reconstruction, suite
from fcre_utils.presets import resolve_params
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
FCRE_ATTACKS = {f"fcre_{m}_{p}" for m in ("ssim", "l2", "l2_ssim") for p in ("x0", "residual")}


def test_selection_covers_grid():
    recon, manifest = fake_reconstructions()
    table = suite.select_fcre_settings(recon, manifest, [10, 20], BANDS, stride=10)
    assert len(table) == 2 * 2 * 2 * 3
    assert table.selected.sum() == 6
    assert set(table[table.selected].attack) == FCRE_ATTACKS


def test_selection_uses_calibration_only():
    recon, manifest = fake_reconstructions()
    before = suite.select_fcre_settings(recon, manifest, [10, 20], BANDS, stride=10)
    evaluation = torch.from_numpy(manifest.split.to_numpy() == "evaluation")
    for t in recon.x0_recon:
        recon.x0_recon[t][evaluation] = torch.randn_like(recon.x0_recon[t][evaluation])
        recon.x_t_roundtrip[t][evaluation] = torch.randn_like(recon.x_t_roundtrip[t][evaluation])
    after = suite.select_fcre_settings(recon, manifest, [10, 20], BANDS, stride=10)
    pd.testing.assert_frame_equal(before, after)


def test_selected_row_is_best_calibration_auc():
    recon, manifest = fake_reconstructions()
    table = suite.select_fcre_settings(recon, manifest, [10, 20], BANDS, stride=10)
    for attack, group in table.groupby("attack"):
        assert group[group.selected].auc.iloc[0] == group.auc.max(), attack


def test_selection_needs_both_classes():
    recon, manifest = fake_reconstructions()
    manifest.loc[manifest.member, "split"] = "evaluation"
    with pytest.raises(ValueError, match="calibration split has 0 members and 14 non-members but needs both"):
        suite.select_fcre_settings(recon, manifest, [10, 20], BANDS, stride=10)


def test_selection_rejects_uncached_timestep():
    recon, manifest = fake_reconstructions()
    with pytest.raises(ValueError, match=r"timesteps \[30\] are not in the cached reconstructions"):
        suite.select_fcre_settings(recon, manifest, [10, 30], BANDS, stride=10)


def test_scores_table_matches_direct_scoring():
    recon, manifest = fake_reconstructions()
    selection = suite.select_fcre_settings(recon, manifest, [20], [[0.0, 0.5]], stride=10)
    scores = suite.fcre_scores_table(recon, manifest, selection)
    ssim = scores[scores.attack == "fcre_ssim_x0"].score.to_numpy()
    np.testing.assert_allclose(ssim, attacks.fcre_scores(recon.x0, recon.x0_recon[20], 0.0, 0.5, "ssim"))
    assert set(scores[scores.attack.str.endswith("_x0")].nfe) == {4}
    assert set(scores[scores.attack.str.endswith("_residual")].nfe) == {4}
    assert len(scores) == 6 * len(manifest)


def test_l2_weight_fit_on_calibration():
    recon, manifest = fake_reconstructions()
    selection = suite.select_fcre_settings(recon, manifest, [10], [[0.0, 0.5]], stride=10)
    scores = suite.fcre_scores_table(recon, manifest, selection)
    calibration = (manifest.split == "calibration").to_numpy()
    original, reconstruction = suite.protocol_pair(recon, "residual", 10)
    ssim = attacks.fcre_scores(original, reconstruction, 0.0, 0.5, "ssim")
    l2 = attacks.fcre_scores(original, reconstruction, 0.0, 0.5, "l2")
    weight = attacks.balance_l2_weight(ssim[calibration], l2[calibration])
    combined = scores[scores.attack == "fcre_l2_ssim_residual"].score.to_numpy()
    np.testing.assert_allclose(combined, ssim + weight * l2)


def test_protocol_nfe():
    assert suite.protocol_nfe("x0", 100, 10) == 20
    assert suite.protocol_nfe("residual", 100, 10) == 12


def test_unknown_protocol_rejected():
    recon, _ = fake_reconstructions()
    with pytest.raises(ValueError, match="unknown protocol 'both'"):
        suite.protocol_pair(recon, "both", 10)


def test_rank_ignores_evaluation_rows():
    labels = np.array([True, True, False, False])
    rows = np.array([True, False, True, False, True, False, True, False])
    good = suite.Candidate("a", "good", 1, 10, np.nan, np.nan, np.array([3.0, 0, 3, 0, 1, 9, 0, 9]))
    poor = suite.Candidate("a", "poor", 1, 20, np.nan, np.nan, np.array([0.0, 9, 1, 9, 3, 0, 2, 0]))
    table = suite.rank_candidates([good, poor], labels, rows)
    assert table.set_index("setting").selected.to_dict() == {"good": True, "poor": False}


def test_rank_breaks_ties_by_nfe():
    labels = np.array([True, False])
    costly = suite.Candidate("a", "costly", 8, 10, np.nan, np.nan, np.array([1.0, 0.0]))
    cheap = suite.Candidate("a", "cheap", 2, 20, np.nan, np.nan, np.array([1.0, 0.0]))
    table = suite.rank_candidates([costly, cheap], labels)
    assert table.set_index("setting").selected.to_dict() == {"costly": False, "cheap": True}


@pytest.fixture(scope="module")
def suite_inputs(tiny_model):
    unet, scheduler, _, images = tiny_model
    n = len(images)
    manifest = pd.DataFrame({
        "image_id": np.arange(n),
        "member": np.arange(n) % 3 == 0,
        "split": np.where(np.arange(n) % 2 == 0, "calibration", "evaluation"),
    })
    params = resolve_params("smoke", {"timesteps": [20, 40], "ddim_stride": 20, "naive_draws": 2, "seed": 4,
                                      "lowpass_cutoffs": [0.5], "score_batch_size": 7})
    recon = reconstruction.reconstruct(unet, images, params.timesteps, params.ddim_stride, scheduler.alphas_cumprod,
                                       batch_size=7, progress=False)
    result = suite.run_suite(unet, scheduler.alphas_cumprod, images, manifest, params, recon)
    return unet, scheduler, images, manifest, params, recon, result


def chosen_scores(result, attack):
    part = result.scores[result.scores.attack == attack]
    return part.setting.iloc[0], part.score.to_numpy()


def chosen_t(result, attack):
    selected = result.selection[result.selection.selected].set_index("attack")
    return int(selected.loc[attack, "t"])


@pytest.mark.parametrize("attack_name, build", [
    ("naive_loss", lambda t, p: attacks.NaiveLossAttack(t=t, draws=2, seed=4, batch_size=7)),
    ("naive_loss_lowpass", lambda t, p: attacks.NaiveLossAttack(t=t, draws=2, seed=4, cutoff=0.5, batch_size=7)),
    ("secmi_stat", lambda t, p: attacks.SecMIAttack(t=t, stride=20, batch_size=7)),
    ("secmi_stat_lowpass", lambda t, p: attacks.SecMIAttack(t=t, stride=20, cutoff=0.5, batch_size=7)),
    ("pia", lambda t, p: attacks.PIAAttack(t=t, batch_size=7)),
    ("pia_lowpass", lambda t, p: attacks.PIAAttack(t=t, cutoff=0.5, batch_size=7)),
    ("pian", lambda t, p: attacks.PIAAttack(t=t, normalized=True, batch_size=7)),
    ("sima", lambda t, p: attacks.SimAAttack(t=t, batch_size=7)),
])
def test_suite_matches_attack_classes(suite_inputs, attack_name, build):
    unet, scheduler, images, _, params, _, result = suite_inputs
    t = chosen_t(result, attack_name)
    attack = build(t, params)
    _, scores = chosen_scores(result, attack_name)
    np.testing.assert_allclose(scores, attack.score(unet, scheduler.alphas_cumprod, images), rtol=1e-5, atol=1e-9)
    assert set(result.scores[result.scores.attack == attack_name].nfe) == {attack.nfe}


def test_suite_lists_every_attack(suite_inputs):
    *_, result = suite_inputs
    expected = {"naive_loss", "naive_loss_lowpass", "secmi_stat", "secmi_stat_lowpass", "pia", "pia_lowpass", "pian", "sima"}
    assert set(result.scores.attack) == expected | FCRE_ATTACKS
    assert result.selection.groupby("attack").selected.sum().eq(1).all()


def test_suite_shares_network_passes(suite_inputs):
    *_, params, recon, result = suite_inputs
    # per t: the naive draws, PIA, PIAN and SimA; eps_theta(x0, 0) comes from the inversion
    assert result.baseline_passes == len(params.timesteps) * (params.naive_draws + 2 + 1)
    # The inversion to 40 takes two passes and the reverse process from 40 two more, the second
    # of which serves the round trip. From 20, the reverse step reuses the inversion's prediction
    # at x_20, and the round trip needs one pass at timestep 0.
    assert result.reconstruction_passes == 2 + 2 + 1


def test_suite_fixed_settings(suite_inputs):
    unet, scheduler, images, manifest, params, recon, _ = suite_inputs
    fixed = resolve_params("smoke", {"timesteps": [20, 40], "ddim_stride": 20, "select_on_calibration": False,
                                     "naive_t": 20, "secmi_t": 40, "pia_t": 30, "sima_t": 10, "fcre_t": 20})
    result = suite.run_suite(unet, scheduler.alphas_cumprod, images, manifest, fixed, recon)
    assert len(result.selection) == 8 + 6
    settings = result.selection.set_index("attack").t.to_dict()
    for attack, t in {"naive_loss": 20, "secmi_stat": 40, "pia": 30, "sima": 10, "fcre_ssim_x0": 20}.items():
        assert settings[attack] == t, attack


def test_suite_rejects_misaligned_images(suite_inputs):
    unet, scheduler, images, manifest, params, recon, _ = suite_inputs
    with pytest.raises(ValueError, match="23 images for a manifest of 24 rows"):
        suite.run_suite(unet, scheduler.alphas_cumprod, images[:-1], manifest, params, recon)


def table_row(**values):
    base = {"attack": "a", "setting": "s", "nfe": 1, "auc": 0.5, "auc_low": 0.4, "auc_high": 0.6,
            "tpr_at_0_1pct_fpr": 0.0, "tpr_at_0_1pct_fpr_low": 0.0, "tpr_at_0_1pct_fpr_high": 0.0, "tpr_at_1pct_fpr": 0.0}
    return {**base, **values}


def test_control_outliers():
    table = pd.DataFrame([table_row(attack="fine"), table_row(attack="leaky", auc=0.8, auc_low=0.7, auc_high=0.9),
                          table_row(attack="inverted", auc=0.2, auc_low=0.1, auc_high=0.3)])
    assert list(suite.control_outliers(table).attack) == ["leaky", "inverted"]


def test_summarise_names_best_and_worst():
    table = pd.DataFrame([table_row(attack="strong", auc=0.99, tpr_at_0_1pct_fpr=0.8), table_row(attack="weak")])
    text = suite.summarise(table)
    assert text.startswith("At the calibrated 0.1% FPR threshold, strong")
    assert "The weakest, weak, finds 0.0%" in text


def test_summarise_names_ties():
    table = pd.DataFrame([table_row(attack="costly", nfe=20, auc=1.0, tpr_at_0_1pct_fpr=1.0),
                          table_row(attack="cheap", nfe=2, auc=1.0, tpr_at_0_1pct_fpr=1.0), table_row(attack="weak")])
    text = suite.summarise(table)
    assert text.startswith("At the calibrated 0.1% FPR threshold, cheap")
    assert "costly find as many, so this split cannot rank them." in text


def test_suite_table_order(suite_inputs):
    *_, result = suite_inputs
    order = list(dict.fromkeys(result.scores.attack))
    assert order[:8] == list(suite.BASELINES)


@pytest.mark.parametrize("column, values, message", [
    ("split", ["cal", "eval"], r"split values \['cal', 'eval'\] must be 'calibration' or 'evaluation'"),
    ("member", ["yes", "no"], "column 'member' must be boolean"),
])
def test_manifest_labels_checked(column, values, message):
    _, manifest = fake_reconstructions()
    manifest[column] = [values[i % 2] for i in range(len(manifest))]
    with pytest.raises(ValueError, match=message):
        suite.calibration_labels(manifest)


def test_suite_rejects_unscaled_images(suite_inputs):
    unet, scheduler, images, manifest, params, recon, _ = suite_inputs
    with pytest.raises(ValueError, match=r"pixel values span \[0, 2\d\d\] but the model expects \[-1, 1\]"):
        suite.run_suite(unet, scheduler.alphas_cumprod, (images + 1) * 127.5, manifest, params, recon)


def reference_of(recon, scale=0.3, seed=5):
    """Reconstructions by a model that saw none of the images: every image has the large error."""
    generator = torch.Generator().manual_seed(seed)
    smooth = torch.nn.functional.avg_pool2d(torch.randn(recon.x0.shape, generator=generator, dtype=torch.float64), 3, 1, 1)
    x0_recon = {t: recon.x0 + scale * smooth * t / 10 for t in recon.x0_recon}
    return Reconstructions(x0=recon.x0, x_t=recon.x_t, x_t_roundtrip=recon.x_t_roundtrip, x0_recon=x0_recon, nfe=recon.nfe)


def test_reference_candidates_subtract_the_reference_score():
    recon, manifest = fake_reconstructions()
    reference = reference_of(recon)
    rows = np.ones(len(manifest), bool)
    candidates = suite.reference_candidates(recon, reference, rows, [10, 20], BANDS, stride=10)
    assert len(candidates) == 2 * 2 * 2 and {c.attack for c in candidates} == {"fcre_ssim_calibrated", "fcre_l2_calibrated"}
    chosen = next(c for c in candidates if c.attack == "fcre_l2_calibrated" and c.t == 20 and c.high == 1.5)
    target = attacks.fcre_scores(recon.x0, recon.x0_recon[20], 0.5, 1.5, "l2")
    baseline = attacks.fcre_scores(reference.x0, reference.x0_recon[20], 0.5, 1.5, "l2")
    np.testing.assert_allclose(chosen.scores, target - baseline)
    assert chosen.nfe == 2 * reconstruction.protocol_nfe("x0", 20, 10)


def test_reference_must_reconstruct_the_same_images():
    recon, manifest = fake_reconstructions()
    other = reference_of(recon)
    other.x0 = other.x0 + 1
    with pytest.raises(ValueError, match="reference reconstructions are of other images"):
        suite.reference_candidates(recon, other, np.ones(len(manifest), bool), [10], BANDS, stride=10)
    missing = reference_of(recon)
    del missing.x0_recon[20]
    with pytest.raises(ValueError, match=r"timesteps \[20\] are not in the reference"):
        suite.reference_candidates(recon, missing, np.ones(len(manifest), bool), [10, 20], BANDS, stride=10)


def test_suite_adds_calibrated_attacks_with_a_reference(suite_inputs):
    unet, scheduler, images, manifest, params, recon, plain = suite_inputs
    reference = reference_of(recon)
    result = suite.run_suite(unet, scheduler.alphas_cumprod, images, manifest, params, recon, reference)
    assert set(result.scores.attack) == set(plain.scores.attack) | {"fcre_ssim_calibrated", "fcre_l2_calibrated"}
    row = result.selection[result.selection.selected].set_index("attack").loc["fcre_l2_calibrated"]
    _, scores = chosen_scores(result, "fcre_l2_calibrated")
    target = attacks.fcre_scores(recon.x0, recon.x0_recon[row.t], row.low, row.high, "l2")
    baseline = attacks.fcre_scores(reference.x0, reference.x0_recon[row.t], row.low, row.high, "l2")
    np.testing.assert_allclose(scores, target - baseline)
    pd.testing.assert_frame_equal(result.scores[result.scores.attack == "sima"].reset_index(drop=True),
                                  plain.scores[plain.scores.attack == "sima"].reset_index(drop=True))
