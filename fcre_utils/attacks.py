"""Membership inference attacks: images in, one score per image out, higher means member.

Every attack declares its cost as NFE, the number of network evaluations per image.

- :class:`NaiveLossAttack`: the noise-prediction error at timestep t with fresh noise
  (Matsumoto et al. 2023), negated; NFE = draws.
- :class:`FCREAttack`: Frequency-Calibrated Reconstruction Error (Zhao et al. 2025). It perturbs
  the image to t by DDIM inversion and reconstructs it, with the ``"x0"`` or ``"residual"``
  protocol of :mod:`fcre_utils.reconstruction`. Then it keeps the band ``[low, high)`` of both
  images and scores their similarity: SSIM, negative mean squared error (L2), or SSIM plus a
  weighted negative L2.

The scoring functions (:func:`fcre_scores`, :func:`ssim_scores`, :func:`l2_scores`) work on
cached reconstructions as well, so settings can be compared without running the network again.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from diffusers import UNet2DModel
from torchmetrics.functional.image import structural_similarity_index_measure

from .frequency import bandpass
from .reconstruction import ddim_invert, ddim_reverse, ddim_step, forward_noise, protocol_nfe

FCRE_METRICS = ("ssim", "l2", "l2_ssim")
PROTOCOLS = ("x0", "residual")
SSIM_DATA_RANGE = 2.0  # the width of the [-1, 1] pixel range, used for every SSIM here
SSIM_BORDER = 5  # half the Gaussian window: pixels closer to the border are left out
SSIM_CHUNK = 64  # images per SSIM call


def ssim_scores(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    """Mean SSIM between each pair of images, as scikit-image computes it.

    Gaussian window (sigma 1.5, 11 px), population covariances, and the mean taken over the
    pixels at least 5 px from the border (the window never leaves the image there).

    Args:
        a, b: tensors (N, C, H, W), H and W at least 11.

    Returns:
        float64 array (N,); 1 means identical. The constants use a data range of 2 (pixels in
        [-1, 1]) for band-passed images too, so a band with little energy scores near 1.
    """
    # Chunks bound the memory. A float64 convolution on the CPU unfolds every 11x11 window of the
    # five SSIM inputs: 5 x 121 x 32 x 32 doubles, about 5 MB per 32x32 image, 7.6 GB for 1,528.
    scores = []
    for begin in range(0, len(a), SSIM_CHUNK):
        _, full = structural_similarity_index_measure(
            a[begin : begin + SSIM_CHUNK].to(torch.float64), b[begin : begin + SSIM_CHUNK].to(torch.float64),
            gaussian_kernel=True, sigma=1.5, kernel_size=11, data_range=SSIM_DATA_RANGE, return_full_image=True,
        )
        inner = full[..., SSIM_BORDER:-SSIM_BORDER, SSIM_BORDER:-SSIM_BORDER]
        scores.append(inner.flatten(1).mean(dim=1).cpu().numpy())
    return np.concatenate(scores)


def l2_scores(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    """Negative mean squared error between each pair of images, shape (N,); 0 means identical."""
    return -(a - b).to(torch.float64).square().flatten(1).mean(dim=1).cpu().numpy()


def fcre_scores(original: torch.Tensor, reconstruction: torch.Tensor, low: float, high: float, metric: str, l2_weight: float = 1.0) -> np.ndarray:
    """FCRE score of each image: similarity of the band-passed original and reconstruction.

    Args:
        original, reconstruction: tensors (N, C, H, W) compared at the same timestep.
        low, high: band edges in normalised radius (1 = Nyquist).
        metric: ``"ssim"``, ``"l2"`` or ``"l2_ssim"`` (SSIM + ``l2_weight`` * negative MSE).

    Returns:
        float64 array (N,), higher means more likely a member.
    """
    if metric not in FCRE_METRICS:
        raise ValueError(f"unknown FCRE metric {metric!r}; choose one of {FCRE_METRICS}")

    ssim, l2 = band_similarity(original, reconstruction, low, high)
    if metric == "ssim":
        return ssim
    if metric == "l2":
        return l2
    return ssim + l2_weight * l2


def band_similarity(original: torch.Tensor, reconstruction: torch.Tensor, low: float, high: float) -> tuple[np.ndarray, np.ndarray]:
    """Compute SSIM and negative MSE between the band ``[low, high)`` of two image sets.

    Returns:
        ssim, l2: float64 arrays (N,), higher means more similar.
    """
    a = bandpass(original, low, high)
    b = bandpass(reconstruction, low, high)
    return ssim_scores(a, b), l2_scores(a, b)


def balance_l2_weight(ssim: np.ndarray, l2: np.ndarray) -> float:
    """Weight that gives the L2 term the same spread as the SSIM term (ratio of std devs).

    Fit it on calibration scores only.
    """
    spread = float(np.std(l2))
    if spread == 0.0 or not np.isfinite(spread):
        raise ValueError("L2 scores are constant; cannot balance them against SSIM")
    return float(np.std(ssim)) / spread


@dataclass
class NaiveLossAttack:
    """Negative noise-prediction error at timestep ``t``, averaged over ``draws`` noise draws."""

    t: int = 100
    draws: int = 1
    seed: int = 0
    batch_size: int = 256
    name: str = "naive_loss"

    @property
    def nfe(self) -> int:
        return self.draws

    def score(self, unet: UNet2DModel, alphas_cumprod: torch.Tensor, images: torch.Tensor) -> np.ndarray:
        """Return one score per image (N,); the noise is seeded, so scores are repeatable."""
        device = next(unet.parameters()).device
        generator = torch.Generator().manual_seed(self.seed)
        errors = np.zeros(len(images))

        with torch.inference_mode():
            for begin in range(0, len(images), self.batch_size):
                x0 = images[begin : begin + self.batch_size].to(device)
                timesteps = torch.full((len(x0),), self.t, device=device, dtype=torch.long)
                for _ in range(self.draws):
                    x_t, eps = forward_noise(x0, self.t, alphas_cumprod, generator)
                    eps_pred = unet(x_t, timesteps).sample
                    error = (eps_pred - eps).square().flatten(1).mean(dim=1)
                    errors[begin : begin + len(x0)] += error.double().cpu().numpy() / self.draws

        return -errors


@dataclass
class FCREAttack:
    """FCRE at timestep ``t`` with DDIM stride ``stride``, band ``[low, high)`` and ``metric``."""

    t: int = 100
    stride: int = 10
    protocol: str = "x0"
    low: float = 0.15
    high: float = 0.85
    metric: str = "ssim"
    l2_weight: float = 1.0
    batch_size: int = 256

    @property
    def name(self) -> str:
        return f"fcre_{self.metric}"

    @property
    def nfe(self) -> int:
        return protocol_nfe(self.protocol, self.t, self.stride)

    def score(self, unet: UNet2DModel, alphas_cumprod: torch.Tensor, images: torch.Tensor) -> np.ndarray:
        """Return one score per image (N,)."""
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"unknown protocol {self.protocol!r}; choose one of {PROTOCOLS}")

        device = next(unet.parameters()).device
        scores = []
        with torch.inference_mode():
            for begin in range(0, len(images), self.batch_size):
                x0 = images[begin : begin + self.batch_size].to(device)
                x_t = ddim_invert(unet, x0, self.t, self.stride, alphas_cumprod)[self.t]
                if self.protocol == "x0":
                    original = x0
                    reconstruction = ddim_reverse(unet, x_t, self.t, self.stride, alphas_cumprod)[-1]
                else:
                    original = x_t
                    previous = ddim_step(unet, x_t, self.t, self.t - self.stride, alphas_cumprod)
                    reconstruction = ddim_step(unet, previous, self.t - self.stride, self.t, alphas_cumprod)
                scores.append(fcre_scores(original.cpu(), reconstruction.cpu(), self.low, self.high, self.metric, self.l2_weight))
        return np.concatenate(scores)

