"""Membership inference attacks: images in, one score per image out, higher means member.

Every attack has ``score(unet, alphas_cumprod, images)`` and declares its cost as ``nfe``, the
number of network evaluations per image. ``eps_theta(x, t)`` is the model's noise prediction and
``a_t`` the cumulative schedule.

- :class:`NaiveLossAttack`: the noise-prediction error ``|eps_theta(x_t, t) - eps|^2`` with
  fresh noise ``eps`` (Matsumoto et al. 2023), negated and averaged over ``draws``.
- :class:`SecMIAttack`: SecMI-stat (Duan et al. 2023). It inverts with DDIM to t in steps of k,
  then takes one reverse step to t - k and one inversion step back to t. The score is the
  negative squared error between the two states at t.
- :class:`PIAAttack`: PIA and PIAN (Kong et al. 2024). The model's own prediction at t = 0,
  ``eps_0 = eps_theta(x0, 0)``, is the noise that takes x0 to t; the score is the negative l4
  distance between ``eps_theta(x_t, t)`` and ``eps_0``. PIAN first rescales ``eps_0`` to the
  mean absolute value of a standard Gaussian.
- :class:`SimAAttack`: SimA (Rao et al. 2025), the negative l2 norm of ``eps_theta(x0, t)`` on
  the clean image.
- The frequency-filter variants (arXiv 2505.20955): ``cutoff`` on naive, SecMI and PIA low-passes
  both compared tensors (band ``[0, cutoff)``) before the distance.
- :class:`FCREAttack`: Frequency-Calibrated Reconstruction Error (Zhao et al. 2025). It perturbs
  the image to t by DDIM inversion and reconstructs it, with the ``"x0"`` or ``"residual"``
  protocol of :mod:`fcre_utils.reconstruction`. Then it keeps the band ``[low, high)`` of both
  images and scores their similarity: SSIM, negative mean squared error (L2), or SSIM plus a
  weighted negative L2.

The distance functions (:func:`naive_error`, :func:`secmi_error`, :func:`pia_distance`,
:func:`sima_norm`, :func:`fcre_scores`) are shared with :mod:`fcre_utils.suite`, which runs each
network pass once for all attacks that need it and scores cached reconstructions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from diffusers import UNet2DModel
from torchmetrics.functional.image import structural_similarity_index_measure

from .frequency import MAX_RADIUS, bandpass
from .models import check_images_fit
from .reconstruction import ddim_invert, ddim_reverse, forward_noise, predict_noise, protocol_nfe, residual_roundtrip

FCRE_METRICS = ("ssim", "l2", "l2_ssim")
PROTOCOLS = ("x0", "residual")
SSIM_DATA_RANGE = 2.0  # the width of the [-1, 1] pixel range, used for every SSIM here
SSIM_BORDER = 5  # half the Gaussian window: pixels closer to the border are left out
SSIM_CHUNK = 64  # images per SSIM call
GAUSSIAN_MEAN_ABS = math.sqrt(2 / math.pi)  # E|z| for z ~ N(0, 1)


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
    if min(a.shape[-2:]) <= 2 * SSIM_BORDER:
        raise ValueError(f"SSIM needs images larger than {2 * SSIM_BORDER} px a side, got {tuple(a.shape[-2:])}; use L2 for smaller images")
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
    if not 0.0 <= low < high or low >= MAX_RADIUS:
        raise ValueError(f"band [{low}, {high}) keeps no frequency; use 0 <= low < high and low < {MAX_RADIUS:.4f} (1 = Nyquist)")

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


def lowpass(images: torch.Tensor, cutoff: float | None) -> torch.Tensor:
    """Keep the band ``[0, cutoff)`` of each image, or return the images unchanged when ``cutoff`` is None.

    Filtered images come back on the CPU, because the float64 FFT is not available on Apple MPS.
    """
    return images if cutoff is None else bandpass(images.cpu(), 0.0, cutoff)


def _mean_power(difference: torch.Tensor, power: int) -> np.ndarray:
    # float64 on the CPU: MPS has no float64, and these per-image sums are cheap next to a network pass
    return difference.cpu().to(torch.float64).abs().pow(power).flatten(1).mean(dim=1).numpy()


def naive_error(eps: torch.Tensor, eps_pred: torch.Tensor, cutoff: float | None = None) -> np.ndarray:
    """Mean squared error between the true and the predicted noise per image, (N,)."""
    return _mean_power(lowpass(eps_pred, cutoff) - lowpass(eps, cutoff), 2)


def secmi_error(x_t: torch.Tensor, roundtrip: torch.Tensor, cutoff: float | None = None) -> np.ndarray:
    """Mean squared error between the inverted state at t and its round trip per image, (N,)."""
    return _mean_power(lowpass(roundtrip, cutoff) - lowpass(x_t, cutoff), 2)


def pia_distance(eps_0: torch.Tensor, eps_pred: torch.Tensor, cutoff: float | None = None) -> np.ndarray:
    """Mean fourth power of the difference (the l4 distance to the 4th) per image, (N,)."""
    return _mean_power(lowpass(eps_pred, cutoff) - lowpass(eps_0, cutoff), 4)


def gaussian_rescale(eps: torch.Tensor) -> torch.Tensor:
    """Scale each image's noise so its mean absolute value is that of N(0, 1), sqrt(2 / pi)."""
    mean_abs = eps.abs().flatten(1).mean(dim=1).clamp_min(torch.finfo(eps.dtype).tiny)
    return eps * (GAUSSIAN_MEAN_ABS / mean_abs).view(-1, *([1] * (eps.ndim - 1)))


def pia_start(x0: torch.Tensor, eps_0: torch.Tensor, t: int, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Return ``sqrt(a_t) x0 + sqrt(1 - a_t) eps_0``: x0 moved to t along the model's own noise."""
    a_t = alphas_cumprod[t].to(x0.device, x0.dtype)
    return a_t.sqrt() * x0 + (1 - a_t).sqrt() * eps_0


def sima_norm(eps_pred: torch.Tensor) -> np.ndarray:
    """l2 norm of each image's predicted noise, (N,)."""
    return eps_pred.cpu().to(torch.float64).flatten(1).norm(dim=1).numpy()


def lowpass_name(attack: str, cutoff: float | None) -> str:
    """Return the table name of ``attack``, with ``_lowpass`` when a cutoff filters it."""
    return attack if cutoff is None else f"{attack}_lowpass"


PIXEL_TOLERANCE = 1e-3  # model inputs are in [-1, 1], and rounding this far beyond the ends is accepted


def check_attack_inputs(unet: UNet2DModel, alphas_cumprod: torch.Tensor, images: torch.Tensor, t: int, batch_size: int) -> None:
    """Raise ValueError or TypeError unless ``images`` and ``t`` suit ``unet``.

    Without these checks, some inputs give a bare torch error and others a silently wrong score.
    The checks cover the tensor type, shape, size and channel count, pixels outside [-1, 1]
    (such as 0..255), NaN pixels, an empty batch and a timestep outside the schedule.
    """
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images must be a torch.Tensor (N, C, H, W), got {type(images).__name__}; convert with torch.from_numpy")
    if images.ndim != 4:
        raise ValueError(f"images must have shape (N, C, H, W), got {tuple(images.shape)}; add the channel axis with images.unsqueeze(1)")
    if len(images) == 0:
        raise ValueError("no images to score; pass at least one image")
    if images.dtype != torch.float32:
        raise TypeError(f"images must be float32 in [-1, 1], got {images.dtype}; convert with fcre_utils.data.to_model_tensor or .float()")
    check_images_fit(unet, images)
    if not torch.isfinite(images).all():
        raise ValueError(f"{int((~torch.isfinite(images)).sum())} pixel values are NaN or infinite; replace them or remove those images")
    low, high = float(images.min()), float(images.max())
    if low < -1 - PIXEL_TOLERANCE or high > 1 + PIXEL_TOLERANCE:
        raise ValueError(f"pixel values span [{low:g}, {high:g}] but the model expects [-1, 1]; rescale them, e.g. x / 127.5 - 1 for 0..255")
    if not 0 <= t < len(alphas_cumprod):
        raise ValueError(f"timestep t={t} is outside the schedule's 0..{len(alphas_cumprod) - 1}; choose a t in that range")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be at least 1")


def _batches(images: torch.Tensor, batch_size: int, device: torch.device):
    for begin in range(0, len(images), batch_size):
        yield images[begin : begin + batch_size].to(device)


@dataclass
class NaiveLossAttack:
    """Negative noise-prediction error at timestep ``t``, averaged over ``draws`` noise draws.

    ``cutoff`` low-passes the true and predicted noise first (the frequency-filter variant).
    """

    t: int = 100
    draws: int = 1
    seed: int = 0
    cutoff: float | None = None
    batch_size: int = 256

    @property
    def name(self) -> str:
        return lowpass_name("naive_loss", self.cutoff)

    @property
    def nfe(self) -> int:
        return self.draws

    def score(self, unet: UNet2DModel, alphas_cumprod: torch.Tensor, images: torch.Tensor) -> np.ndarray:
        """Return one score per image (N,); the noise is seeded, so scores are repeatable."""
        check_attack_inputs(unet, alphas_cumprod, images, self.t, self.batch_size)
        if self.draws < 1:
            raise ValueError(f"draws={self.draws} must be at least 1")
        device = next(unet.parameters()).device
        generator = torch.Generator().manual_seed(self.seed)
        errors = []
        with torch.inference_mode():
            for x0 in _batches(images, self.batch_size, device):
                total = np.zeros(len(x0))
                for _ in range(self.draws):
                    x_t, eps = forward_noise(x0, self.t, alphas_cumprod, generator)
                    total += naive_error(eps, predict_noise(unet, x_t, self.t), self.cutoff)
                errors.append(total / self.draws)
        return -np.concatenate(errors)


@dataclass
class SecMIAttack:
    """SecMI-stat: negative error between the DDIM-inverted state at ``t`` and its round trip."""

    t: int = 100
    stride: int = 10
    cutoff: float | None = None
    batch_size: int = 256

    @property
    def name(self) -> str:
        return lowpass_name("secmi_stat", self.cutoff)

    @property
    def nfe(self) -> int:
        return protocol_nfe("residual", self.t, self.stride)

    def score(self, unet: UNet2DModel, alphas_cumprod: torch.Tensor, images: torch.Tensor) -> np.ndarray:
        """Return one score per image (N,)."""
        check_attack_inputs(unet, alphas_cumprod, images, self.t, self.batch_size)
        device = next(unet.parameters()).device
        errors = []
        with torch.inference_mode():
            for x0 in _batches(images, self.batch_size, device):
                x_t = ddim_invert(unet, x0, self.t, self.stride, alphas_cumprod)[self.t]
                roundtrip = residual_roundtrip(unet, x_t, self.t, self.stride, alphas_cumprod)
                errors.append(secmi_error(x_t, roundtrip, self.cutoff))
        return -np.concatenate(errors)


@dataclass
class PIAAttack:
    """PIA (``normalized=False``) or PIAN (``normalized=True``) at timestep ``t``; 2 NFE."""

    t: int = 200
    normalized: bool = False
    cutoff: float | None = None
    batch_size: int = 256

    @property
    def name(self) -> str:
        return lowpass_name("pian" if self.normalized else "pia", self.cutoff)

    @property
    def nfe(self) -> int:
        return 2

    def score(self, unet: UNet2DModel, alphas_cumprod: torch.Tensor, images: torch.Tensor) -> np.ndarray:
        """Return one score per image (N,)."""
        check_attack_inputs(unet, alphas_cumprod, images, self.t, self.batch_size)
        device = next(unet.parameters()).device
        distances = []
        with torch.inference_mode():
            for x0 in _batches(images, self.batch_size, device):
                eps_0 = predict_noise(unet, x0, 0)
                if self.normalized:
                    eps_0 = gaussian_rescale(eps_0)
                eps_pred = predict_noise(unet, pia_start(x0, eps_0, self.t, alphas_cumprod), self.t)
                distances.append(pia_distance(eps_0, eps_pred, self.cutoff))
        return -np.concatenate(distances)


@dataclass
class SimAAttack:
    """SimA: negative l2 norm of the noise predicted for the clean image at timestep ``t``; 1 NFE."""

    t: int = 100
    batch_size: int = 256
    name: str = "sima"

    @property
    def nfe(self) -> int:
        return 1

    def score(self, unet: UNet2DModel, alphas_cumprod: torch.Tensor, images: torch.Tensor) -> np.ndarray:
        """Return one score per image (N,); ``alphas_cumprod`` only bounds ``t``."""
        check_attack_inputs(unet, alphas_cumprod, images, self.t, self.batch_size)
        device = next(unet.parameters()).device
        with torch.inference_mode():
            norms = [sima_norm(predict_noise(unet, x0, self.t)) for x0 in _batches(images, self.batch_size, device)]
        return -np.concatenate(norms)


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
        return f"fcre_{self.metric}_{self.protocol}"

    @property
    def nfe(self) -> int:
        return protocol_nfe(self.protocol, self.t, self.stride)

    def score(self, unet: UNet2DModel, alphas_cumprod: torch.Tensor, images: torch.Tensor) -> np.ndarray:
        """Return one score per image (N,)."""
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"unknown protocol {self.protocol!r}; choose one of {PROTOCOLS}")
        check_attack_inputs(unet, alphas_cumprod, images, self.t, self.batch_size)
        device = next(unet.parameters()).device
        scores = []
        with torch.inference_mode():
            for x0 in _batches(images, self.batch_size, device):
                x_t = ddim_invert(unet, x0, self.t, self.stride, alphas_cumprod)[self.t]
                if self.protocol == "x0":
                    original = x0
                    reconstruction = ddim_reverse(unet, x_t, self.t, self.stride, alphas_cumprod)[-1]
                else:
                    original = x_t
                    reconstruction = residual_roundtrip(unet, x_t, self.t, self.stride, alphas_cumprod)
                scores.append(fcre_scores(original.cpu(), reconstruction.cpu(), self.low, self.high, self.metric, self.l2_weight))
        return np.concatenate(scores)
