import numpy as np
import pytest
import torch

from fcre_utils import frequency


def numpy_radius(height, width):
    fy = np.fft.fftfreq(height)[:, None]
    fx = np.fft.fftfreq(width)[None, :]
    return np.hypot(fy, fx) / 0.5


@pytest.mark.parametrize("shape", [(32, 32), (28, 28), (16, 24)])
def test_grid_matches_numpy(shape):
    np.testing.assert_allclose(frequency.radial_grid(*shape).numpy(), numpy_radius(*shape))


def test_grid_nyquist_is_one():
    grid = frequency.radial_grid(32, 32)
    assert grid[16, 0] == pytest.approx(1.0)
    assert grid[0, 16] == pytest.approx(1.0)
    assert grid[16, 16] == pytest.approx(np.sqrt(2))


def test_mask_matches_numpy():
    radius = numpy_radius(32, 32)
    expected = (radius >= 0.15) & (radius < 0.85)
    np.testing.assert_array_equal(frequency.band_mask(32, 32, 0.15, 0.85).numpy(), expected)


def test_complementary_masks_partition():
    low = frequency.band_mask(32, 32, 0.0, 0.3)
    mid = frequency.band_mask(32, 32, 0.3, 0.7)
    high = frequency.band_mask(32, 32, 0.7, 1.5)
    total = low.int() + mid.int() + high.int()
    assert (total == 1).all()


def test_complementary_bands_sum_to_image():
    images = torch.randn(4, 1, 32, 32, dtype=torch.float64)
    parts = [frequency.bandpass(images, a, b) for a, b in [(0.0, 0.2), (0.2, 0.6), (0.6, 2.0)]]
    torch.testing.assert_close(sum(parts), images)


def test_bandpass_matches_numpy():
    images = torch.randn(2, 1, 28, 28, dtype=torch.float64)
    mask = (numpy_radius(28, 28) >= 0.15) & (numpy_radius(28, 28) < 0.85)
    expected = np.fft.ifft2(np.fft.fft2(images.numpy()) * mask).real
    np.testing.assert_allclose(frequency.bandpass(images, 0.15, 0.85).numpy(), expected, atol=1e-12)


def test_lowpass_of_constant_keeps_it():
    images = torch.full((1, 1, 16, 16), 0.3)
    torch.testing.assert_close(frequency.bandpass(images, 0.0, 0.1), images)
    assert frequency.bandpass(images, 0.1, 1.5).abs().max() < 1e-6


def test_bandpass_keeps_shape_and_dtype():
    images = torch.randn(3, 1, 32, 32)
    filtered = frequency.bandpass(images, 0.2, 0.5)
    assert filtered.shape == images.shape
    assert filtered.dtype == torch.float32


@pytest.mark.parametrize("low, high", [(0.5, 0.5), (0.6, 0.2), (-0.1, 0.5)])
def test_invalid_band_rejected(low, high):
    with pytest.raises(ValueError, match="band edges"):
        frequency.band_mask(8, 8, low, high)


def test_radial_profile_parseval():
    images = torch.randn(3, 1, 32, 32, dtype=torch.float64)
    centres, power = frequency.radial_profile(images, n_bins=8)
    counts = np.bincount(np.digitize(numpy_radius(32, 32), np.linspace(0, np.sqrt(2) + 1e-9, 9)).ravel() - 1, minlength=8)
    total = (power * counts).sum(axis=1)
    np.testing.assert_allclose(total, images.square().sum(dim=(1, 2, 3)).numpy(), rtol=1e-10)
    assert centres.shape == (8,)


def test_radial_profile_of_pure_tone():
    y, x = np.mgrid[0:32, 0:32]
    tone = torch.from_numpy(np.cos(2 * np.pi * 8 * x / 32))[None, None]
    centres, power = frequency.radial_profile(tone, n_bins=16)
    assert abs(centres[np.nanargmax(power[0])] - 0.5) < 0.1
