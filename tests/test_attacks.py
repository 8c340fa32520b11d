import numpy as np
import pytest
import torch
from skimage.metrics import structural_similarity

from fcre_utils import attacks, frequency, reconstruction


def test_ssim_matches_scikit_image():
    rng = np.random.default_rng(0)
    a = rng.uniform(-1, 1, (3, 1, 32, 32))
    b = np.clip(a + rng.normal(0, 0.2, a.shape), -1, 1)
    ours = attacks.ssim_scores(torch.from_numpy(a), torch.from_numpy(b))
    reference = [structural_similarity(a[i, 0], b[i, 0], data_range=2.0, gaussian_weights=True, sigma=1.5,
                                       use_sample_covariance=False) for i in range(3)]
    np.testing.assert_allclose(ours, reference, rtol=1e-10)


def test_identical_images_score_highest():
    images = torch.rand(2, 1, 32, 32) * 2 - 1
    np.testing.assert_allclose(attacks.ssim_scores(images, images), 1.0)
    np.testing.assert_allclose(attacks.l2_scores(images, images), 0.0)


def test_l2_is_negative_mse():
    a = torch.zeros(1, 1, 4, 4)
    b = torch.full((1, 1, 4, 4), 0.5)
    assert attacks.l2_scores(a, b)[0] == pytest.approx(-0.25)


def test_fcre_scores_use_band():
    rng = np.random.default_rng(1)
    original = torch.from_numpy(rng.normal(size=(3, 1, 32, 32)))
    recon = original + 0.1 * torch.from_numpy(rng.normal(size=(3, 1, 32, 32)))
    a, b = frequency.bandpass(original, 0.2, 0.6), frequency.bandpass(recon, 0.2, 0.6)
    expected_ssim = [structural_similarity(a[i, 0].numpy(), b[i, 0].numpy(), data_range=2.0, gaussian_weights=True,
                                           sigma=1.5, use_sample_covariance=False) for i in range(3)]
    expected_l2 = -((a - b) ** 2).mean(dim=(1, 2, 3)).numpy()
    np.testing.assert_allclose(attacks.fcre_scores(original, recon, 0.2, 0.6, "ssim"), expected_ssim, rtol=1e-10)
    np.testing.assert_allclose(attacks.fcre_scores(original, recon, 0.2, 0.6, "l2"), expected_l2, rtol=1e-10)
    combined = attacks.fcre_scores(original, recon, 0.2, 0.6, "l2_ssim", l2_weight=3.0)
    np.testing.assert_allclose(combined, np.array(expected_ssim) + 3.0 * expected_l2, rtol=1e-10)


def test_fcre_unknown_metric_rejected():
    images = torch.zeros(1, 1, 16, 16)
    with pytest.raises(ValueError, match="unknown FCRE metric 'l1'"):
        attacks.fcre_scores(images, images, 0.1, 0.5, "l1")


def test_balance_weight_equalises_spread():
    ssim = np.array([0.1, 0.2, 0.3])
    l2 = np.array([-10.0, -20.0, -30.0])
    weight = attacks.balance_l2_weight(ssim, l2)
    assert np.std(weight * l2) == pytest.approx(np.std(ssim))


def test_balance_weight_constant_l2_rejected():
    with pytest.raises(ValueError, match="constant"):
        attacks.balance_l2_weight(np.arange(3.0), np.zeros(3))


def test_naive_loss_formula(tiny_model):
    unet, scheduler, _, images = tiny_model
    x0 = images[:6]
    attack = attacks.NaiveLossAttack(t=50, draws=2, seed=3, batch_size=4)
    scores = attack.score(unet, scheduler.alphas_cumprod, x0)

    generator = torch.Generator().manual_seed(3)
    expected = np.zeros(6)
    with torch.no_grad():
        for begin in (0, 4):
            batch = x0[begin : begin + 4]
            for _ in range(2):
                eps = torch.randn(batch.shape, generator=generator)
                a = scheduler.alphas_cumprod[50]
                pred = unet(a.sqrt() * batch + (1 - a).sqrt() * eps, torch.full((len(batch),), 50)).sample
                expected[begin : begin + len(batch)] += ((pred - eps) ** 2).mean(dim=(1, 2, 3)).numpy() / 2
    np.testing.assert_allclose(scores, -expected, rtol=1e-5)
    assert attack.nfe == 2


def test_fcre_attack_matches_cached_scoring(tiny_model):
    unet, scheduler, _, images = tiny_model
    x0 = images[:5]
    recon = reconstruction.reconstruct(unet, x0, [40], 20, scheduler.alphas_cumprod, progress=False)
    for protocol, pair in (("x0", (recon.x0, recon.x0_recon[40])), ("residual", (recon.x_t[40], recon.x_t_roundtrip[40]))):
        attack = attacks.FCREAttack(t=40, stride=20, protocol=protocol, low=0.1, high=0.7, metric="ssim", batch_size=3)
        expected = attacks.fcre_scores(*pair, 0.1, 0.7, "ssim")
        np.testing.assert_allclose(attack.score(unet, scheduler.alphas_cumprod, x0), expected, rtol=1e-5, atol=1e-7)


def test_fcre_nfe_declared():
    assert attacks.FCREAttack(t=100, stride=10, protocol="x0").nfe == 20
    assert attacks.FCREAttack(t=100, stride=10, protocol="residual").nfe == 12


def test_ssim_chunks_match_scikit_image():
    rng = np.random.default_rng(2)
    count = attacks.SSIM_CHUNK + 6
    a = rng.uniform(-1, 1, (count, 1, 16, 16))
    b = np.clip(a + rng.normal(0, 0.3, a.shape), -1, 1)
    ours = attacks.ssim_scores(torch.from_numpy(a), torch.from_numpy(b))
    reference = [structural_similarity(a[i, 0], b[i, 0], data_range=2.0, gaussian_weights=True, sigma=1.5,
                                       use_sample_covariance=False) for i in range(count)]
    assert ours.shape == (count,)
    np.testing.assert_allclose(ours, reference, rtol=1e-10)


def numpy_lowpass(x: np.ndarray, cutoff: float) -> np.ndarray:
    """Reference low-pass with numpy: keep frequencies of normalised radius below ``cutoff``."""
    fy = np.fft.fftfreq(x.shape[-2])[:, None] / 0.5
    fx = np.fft.fftfreq(x.shape[-1])[None, :] / 0.5
    mask = np.sqrt(fy**2 + fx**2) < cutoff
    return np.fft.ifft2(np.fft.fft2(x) * mask).real


def eps_of(unet, x, t):
    with torch.no_grad():
        return unet(x, torch.full((len(x),), t)).sample


def test_secmi_formula(tiny_model):
    unet, scheduler, _, images = tiny_model
    x0 = images[:4]
    a = scheduler.alphas_cumprod

    def move(x, t_from, t_to):
        eps = eps_of(unet, x, t_from)
        return a[t_to].sqrt() * (x - (1 - a[t_from]).sqrt() * eps) / a[t_from].sqrt() + (1 - a[t_to]).sqrt() * eps

    x_t = move(move(x0, 0, 20), 20, 40)  # DDIM inversion with k = 20
    roundtrip = move(move(x_t, 40, 20), 20, 40)
    expected = -((x_t - roundtrip) ** 2).mean(dim=(1, 2, 3)).numpy()
    attack = attacks.SecMIAttack(t=40, stride=20, batch_size=3)
    np.testing.assert_allclose(attack.score(unet, a, x0), expected, rtol=1e-4)
    assert attack.nfe == 4

    filtered = attacks.SecMIAttack(t=40, stride=20, cutoff=0.5)
    difference = numpy_lowpass(x_t.double().numpy(), 0.5) - numpy_lowpass(roundtrip.double().numpy(), 0.5)
    np.testing.assert_allclose(filtered.score(unet, a, x0), -(difference**2).mean(axis=(1, 2, 3)), rtol=1e-4)
    assert filtered.name == "secmi_stat_lowpass"


@pytest.mark.parametrize("normalized", [False, True])
def test_pia_formula(tiny_model, normalized):
    unet, scheduler, _, images = tiny_model
    x0 = images[:5]
    a = scheduler.alphas_cumprod[30]
    eps_0 = eps_of(unet, x0, 0).double().numpy()
    if normalized:
        eps_0 = eps_0 / np.abs(eps_0).mean(axis=(1, 2, 3), keepdims=True) * np.sqrt(2 / np.pi)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * torch.from_numpy(eps_0).float()
    prediction = eps_of(unet, x_t, 30).double().numpy()
    expected = -((prediction - eps_0) ** 4).mean(axis=(1, 2, 3))

    attack = attacks.PIAAttack(t=30, normalized=normalized, batch_size=2)
    np.testing.assert_allclose(attack.score(unet, scheduler.alphas_cumprod, x0), expected, rtol=1e-4)
    assert attack.name == ("pian" if normalized else "pia")
    assert attack.nfe == 2


def test_pian_noise_has_gaussian_magnitude():
    eps = torch.randn(3, 1, 8, 8) * torch.tensor([0.1, 1.0, 5.0]).view(3, 1, 1, 1)
    rescaled = attacks.gaussian_rescale(eps)
    np.testing.assert_allclose(rescaled.abs().mean(dim=(1, 2, 3)).numpy(), np.sqrt(2 / np.pi), rtol=1e-6)


def test_pia_lowpass_formula(tiny_model):
    unet, scheduler, _, images = tiny_model
    x0 = images[:3]
    a = scheduler.alphas_cumprod[30]
    eps_0 = eps_of(unet, x0, 0)
    prediction = eps_of(unet, a.sqrt() * x0 + (1 - a).sqrt() * eps_0, 30)
    difference = numpy_lowpass(prediction.double().numpy(), 0.25) - numpy_lowpass(eps_0.double().numpy(), 0.25)
    attack = attacks.PIAAttack(t=30, cutoff=0.25)
    np.testing.assert_allclose(attack.score(unet, scheduler.alphas_cumprod, x0), -(difference**4).mean(axis=(1, 2, 3)), rtol=1e-4)


def test_sima_formula(tiny_model):
    unet, scheduler, _, images = tiny_model
    x0 = images[:5]
    expected = -np.linalg.norm(eps_of(unet, x0, 25).double().numpy().reshape(5, -1), axis=1)
    attack = attacks.SimAAttack(t=25, batch_size=2)
    np.testing.assert_allclose(attack.score(unet, scheduler.alphas_cumprod, x0), expected, rtol=1e-5)
    assert attack.nfe == 1


def test_naive_lowpass_formula(tiny_model):
    unet, scheduler, _, images = tiny_model
    x0 = images[:4]
    generator = torch.Generator().manual_seed(5)
    noise = torch.randn(x0.shape, generator=generator)
    a = scheduler.alphas_cumprod[50]
    prediction = eps_of(unet, a.sqrt() * x0 + (1 - a).sqrt() * noise, 50)
    difference = numpy_lowpass(prediction.double().numpy(), 0.5) - numpy_lowpass(noise.double().numpy(), 0.5)
    attack = attacks.NaiveLossAttack(t=50, draws=1, seed=5, cutoff=0.5)
    np.testing.assert_allclose(attack.score(unet, scheduler.alphas_cumprod, x0), -(difference**2).mean(axis=(1, 2, 3)), rtol=1e-4)
    assert attack.name == "naive_loss_lowpass"


def test_lowpass_above_corner_keeps_image():
    images = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    torch.testing.assert_close(attacks.lowpass(images, 1.5), images)
    assert attacks.lowpass(images, None) is images


@pytest.mark.parametrize("images, error, message", [
    (torch.zeros(2, 1, 28, 28), ValueError, "the model expects 32x32 px images"),
    (torch.zeros(2, 3, 32, 32), ValueError, "the model expects 1-channel images"),
    (torch.full((2, 1, 32, 32), 255.0), ValueError, r"pixel values span \[255, 255\]"),
    (torch.zeros(2, 32, 32), ValueError, r"must have shape \(N, C, H, W\)"),
    (torch.zeros(0, 1, 32, 32), ValueError, "no images to score"),
    (torch.zeros(2, 1, 32, 32, dtype=torch.float64), TypeError, "must be float32"),
    (np.zeros((2, 1, 32, 32), np.float32), TypeError, "must be a torch.Tensor"),
    (torch.full((2, 1, 32, 32), float("nan")), ValueError, "NaN or infinite"),
])
def test_attack_inputs_checked(tiny_model, images, error, message):
    unet, scheduler, _, _ = tiny_model
    with pytest.raises(error, match=message):
        attacks.PIAAttack(t=10).score(unet, scheduler.alphas_cumprod, images)


@pytest.mark.parametrize("attack", [attacks.PIAAttack(t=1000), attacks.SimAAttack(t=-1), attacks.NaiveLossAttack(t=5000)])
def test_attack_timestep_checked(tiny_model, attack):
    unet, scheduler, _, images = tiny_model
    with pytest.raises(ValueError, match=f"timestep t={attack.t} is outside the schedule"):
        attack.score(unet, scheduler.alphas_cumprod, images[:2])


def test_naive_draws_checked(tiny_model):
    unet, scheduler, _, images = tiny_model
    with pytest.raises(ValueError, match="draws=0 must be at least 1"):
        attacks.NaiveLossAttack(t=10, draws=0).score(unet, scheduler.alphas_cumprod, images[:2])


def test_ssim_small_images_rejected():
    images = torch.zeros(2, 1, 8, 8)
    with pytest.raises(ValueError, match=r"SSIM needs images larger than 10 px a side, got \(8, 8\)"):
        attacks.ssim_scores(images, images)


def test_fcre_empty_band_rejected():
    images = torch.zeros(2, 1, 16, 16)
    with pytest.raises(ValueError, match=r"band \[1.5, 2.0\) keeps no frequency"):
        attacks.fcre_scores(images, images, 1.5, 2.0, "l2")
