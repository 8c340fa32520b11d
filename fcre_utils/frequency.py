"""Frequency bands on a normalised radial grid, band-pass filtering and radial spectra.

Radius unit: the normalised radial frequency ``r = sqrt(fx**2 + fy**2) / 0.5`` with ``fx, fy``
in cycles per pixel, so r = 1 at the Nyquist frequency along an axis and r = sqrt(2) in the
corners of the spectrum. A band ``[low, high)`` keeps the frequencies with low <= r < high;
bands that share an edge partition the spectrum, and ``high > sqrt(2)`` keeps the corners.
"""

from __future__ import annotations

import numpy as np
import torch

MAX_RADIUS = float(np.sqrt(2.0))


def radial_grid(height: int, width: int) -> torch.Tensor:
    """Normalised radius of every FFT bin (unshifted layout), shape (height, width)."""
    fy = torch.fft.fftfreq(height, dtype=torch.float64)
    fx = torch.fft.fftfreq(width, dtype=torch.float64)
    return torch.sqrt(fy[:, None] ** 2 + fx[None, :] ** 2) / 0.5


def band_mask(height: int, width: int, low: float, high: float) -> torch.Tensor:
    """Boolean mask of the FFT bins with ``low <= r < high``, shape (height, width).

    ``low = 0`` gives a low-pass mask and ``high > sqrt(2)`` a high-pass mask.
    """
    if not 0.0 <= low < high:
        raise ValueError(f"band edges must satisfy 0 <= low < high, got low={low}, high={high}")
    radius = radial_grid(height, width)
    return (radius >= low) & (radius < high)


def bandpass(images: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """Keep only the band ``[low, high)`` of each image's spectrum.

    Args:
        images: real tensor (..., H, W).

    Returns:
        Real tensor of the same shape and dtype. The mask is symmetric under f -> -f, so the
        filtered spectrum stays Hermitian and the inverse FFT is real up to rounding.
    """
    mask = band_mask(images.shape[-2], images.shape[-1], low, high).to(images.device)
    spectrum = torch.fft.fft2(images.to(torch.float64))
    return torch.fft.ifft2(spectrum * mask).real.to(images.dtype)


def radial_profile(images: torch.Tensor, n_bins: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Radially averaged power spectrum of each image.

    Args:
        images: real tensor (N, C, H, W) or (N, H, W); channels are averaged.
        n_bins: number of equal-width rings over 0 <= r < sqrt(2).

    Returns:
        centres: ring centres in normalised radius, shape (n_bins,);
        power: mean |FFT|^2 / (H W) per image and ring, shape (N, n_bins); NaN for empty rings.
    """
    if images.ndim == 4:
        power_2d = torch.fft.fft2(images.to(torch.float64)).abs().square().mean(dim=1)
    else:
        power_2d = torch.fft.fft2(images.to(torch.float64)).abs().square()
    height, width = power_2d.shape[-2:]
    power_2d = power_2d / (height * width)

    edges = np.linspace(0.0, MAX_RADIUS + 1e-9, n_bins + 1)
    ring = np.digitize(radial_grid(height, width).numpy(), edges) - 1
    flat = power_2d.reshape(len(power_2d), -1).cpu().numpy()
    ring = ring.reshape(-1)

    power = np.full((len(flat), n_bins), np.nan)
    for index in range(n_bins):
        if (ring == index).any():
            power[:, index] = flat[:, ring == index].mean(axis=1)
    centres = (edges[:-1] + edges[1:]) / 2
    return centres, power
