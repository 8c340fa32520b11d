"""Perturb images to a timestep t and reconstruct them with the reverse process.

Three operations on a trained noise predictor ``eps_theta(x_t, t)`` with cumulative schedule
``alphas_cumprod`` (written a_t below):

- forward noising: ``x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps`` with fresh Gaussian ``eps``;
- deterministic DDIM inversion: from x0 (taken as the state at timestep 0) up to t in steps of
  ``stride`` timesteps (Song et al. 2021, eta = 0, run backwards);
- the DDIM reverse process from t down to timestep 0, in the same steps.

Both go through :func:`ddim_move`, one DDIM update between two timesteps. A reconstruction from
t costs ``t // stride`` network evaluations (NFE) each way.

Two comparison protocols from the FCRE literature use these:

- ``"x0"``: invert to t, run the reverse process back to timestep 0, compare with x0;
- ``"residual"``: invert to t, take one reverse step to t - stride and one inversion step back
  to t, compare the two states at t (the same-noise residual of SecMI, Duan et al. 2023).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
from diffusers import UNet2DModel
from tqdm.auto import tqdm

log = logging.getLogger(__name__)


def forward_noise(x0: torch.Tensor, t: int, alphas_cumprod: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(x_t, eps)``: x0 noised to timestep ``t`` with fresh noise ``eps``.

    Args:
        x0: images (N, C, H, W) in [-1, 1].
        t: timestep, 0 <= t < len(alphas_cumprod).
        alphas_cumprod: cumulative product of (1 - beta), shape (T,).
        generator: optional seeded generator for ``eps``.
    """
    eps = torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device)
    a_t = alphas_cumprod[t].to(x0.device, x0.dtype)
    return a_t.sqrt() * x0 + (1 - a_t).sqrt() * eps, eps


def ddim_move(x: torch.Tensor, eps: torch.Tensor, a_from: torch.Tensor, a_to: torch.Tensor) -> torch.Tensor:
    """Apply one deterministic DDIM update from cumulative alpha ``a_from`` to ``a_to``.

    1. predict x0 from the current state and the predicted noise;
    2. re-noise that prediction to ``a_to`` with the same noise.

    ``a_to < a_from`` is an inversion step (towards noise), ``a_to > a_from`` a reverse step.
    """
    x0_pred = (x - (1 - a_from).sqrt() * eps) / a_from.sqrt()
    return a_to.sqrt() * x0_pred + (1 - a_to).sqrt() * eps


def protocol_nfe(protocol: str, t: int, stride: int) -> int:
    """Return the network evaluations per image of one protocol at timestep t on its own.

    ``"x0"`` inverts and reverses (2 t / stride); ``"residual"`` inverts, then takes one reverse
    and one inversion step (t / stride + 2).
    """
    steps = t // stride
    if protocol == "x0":
        return 2 * steps
    if protocol == "residual":
        return steps + 2
    raise ValueError(f"unknown protocol {protocol!r}; choose 'x0' or 'residual'")


def _timestep_grid(t: int, stride: int) -> list[int]:
    if stride < 1:
        raise ValueError(f"stride must be a positive number of timesteps, got {stride}")
    if t < stride or t % stride:
        raise ValueError(f"timestep t={t} must be a positive multiple of stride={stride}")
    return list(range(0, t + 1, stride))


def predict_noise(unet: UNet2DModel, x: torch.Tensor, t: int) -> torch.Tensor:
    """Return the model's noise prediction ``eps_theta(x, t)`` for a batch at one timestep (1 NFE)."""
    timesteps = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
    return unet(x, timesteps).sample


def ddim_invert_trajectory(unet: UNet2DModel, x0: torch.Tensor, t: int, stride: int, alphas_cumprod: torch.Tensor) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
    """Deterministic DDIM inversion of ``x0`` up to timestep ``t``, keeping every step; ``t // stride`` NFE.

    Returns:
        states: ``{timestep: state}`` for every timestep of the grid 0, stride, ..., t;
        eps: ``{timestep: eps_theta(state, timestep)}`` for 0, stride, ..., t - stride, the
        predictions the inversion ran. Every tensor has the shape of ``x0``.
    """
    grid = _timestep_grid(t, stride)
    alphas = alphas_cumprod.to(x0.device, x0.dtype)
    states, predictions = {0: x0}, {}
    x = x0
    for t_from, t_to in zip(grid[:-1], grid[1:]):
        predictions[t_from] = predict_noise(unet, x, t_from)
        x = ddim_move(x, predictions[t_from], alphas[t_from], alphas[t_to])
        states[t_to] = x
    return states, predictions


def ddim_invert(unet: UNet2DModel, x0: torch.Tensor, t: int, stride: int, alphas_cumprod: torch.Tensor, keep: tuple[int, ...] = ()) -> dict[int, torch.Tensor]:
    """Deterministic DDIM inversion of ``x0`` up to timestep ``t``; ``t // stride`` NFE.

    Returns:
        ``{timestep: state}`` for ``t`` and every timestep of ``keep`` on the grid
        0, stride, ..., t; each state has the shape of ``x0``.
    """
    states, _ = ddim_invert_trajectory(unet, x0, t, stride, alphas_cumprod)
    return {step: state for step, state in states.items() if step in keep or step == t}


def ddim_reverse_trajectory(unet: UNet2DModel, x_t: torch.Tensor, t: int, stride: int, alphas_cumprod: torch.Tensor,
                            eps_t: torch.Tensor | None = None) -> tuple[list[torch.Tensor], dict[int, torch.Tensor]]:
    """DDIM reverse process from timestep ``t`` down to 0; ``t // stride`` NFE, one less with ``eps_t``.

    Args:
        eps_t: ``eps_theta(x_t, t)`` when the caller already has it, such as an inversion that
            passed through ``x_t`` on its way to a larger timestep; computed when None.

    Returns:
        states: the states at timesteps t - stride, t - 2 stride, ..., 0, in that order;
        eps: ``{timestep: eps_theta(state, timestep)}`` for t, t - stride, ..., stride, the
        prediction that moved each state one step down.
    """
    grid = _timestep_grid(t, stride)
    alphas = alphas_cumprod.to(x_t.device, x_t.dtype)
    states, predictions = [], {}
    x = x_t
    for t_from, t_to in zip(grid[:0:-1], grid[-2::-1]):
        predictions[t_from] = eps_t if t_from == t and eps_t is not None else predict_noise(unet, x, t_from)
        x = ddim_move(x, predictions[t_from], alphas[t_from], alphas[t_to])
        states.append(x)
    return states, predictions


def ddim_reverse(unet: UNet2DModel, x_t: torch.Tensor, t: int, stride: int, alphas_cumprod: torch.Tensor) -> list[torch.Tensor]:
    """DDIM reverse process from timestep ``t`` down to 0; ``t // stride`` NFE.

    Returns:
        The states at timesteps t - stride, t - 2 stride, ..., 0, in that order.
    """
    states, _ = ddim_reverse_trajectory(unet, x_t, t, stride, alphas_cumprod)
    return states


@dataclass
class Reconstructions:
    """Reconstructions of a batch of images at several timesteps.

    Every tensor has shape (N, C, H, W); dicts are keyed by timestep t.
    """

    x0: torch.Tensor  # the originals
    x_t: dict[int, torch.Tensor]  # DDIM inversion of x0 to t
    x_t_roundtrip: dict[int, torch.Tensor]  # x_t after one reverse and one inversion step
    x0_recon: dict[int, torch.Tensor]  # DDIM reverse process from x_t back to timestep 0
    nfe: dict[int, int]  # network evaluations per image to reconstruct at t alone
    eps_0: torch.Tensor | None = None  # eps_theta(x0, 0), the inversion's first prediction; None in older caches

    def to_dict(self) -> dict:
        """Plain dict of tensors and ints, loadable with ``torch.load(weights_only=True)``."""
        return {"x0": self.x0, "x_t": self.x_t, "x_t_roundtrip": self.x_t_roundtrip, "x0_recon": self.x0_recon, "nfe": self.nfe, "eps_0": self.eps_0}

    @classmethod
    def from_dict(cls, values: dict) -> "Reconstructions":
        return cls(**values)


def reconstruct(
    unet: UNet2DModel,
    x0: torch.Tensor,
    timesteps: list[int],
    stride: int,
    alphas_cumprod: torch.Tensor,
    batch_size: int = 256,
    progress: bool = True,
) -> Reconstructions:
    """Invert ``x0`` once to the largest t, then reconstruct from every t in ``timesteps``.

    The inversion trajectory is shared by all timesteps and both protocols, and so is the reverse
    process: the residual protocol's round trip takes the first reverse step and steps back up
    with the prediction of the second. Below the largest t, the first reverse step reuses the
    inversion's prediction at x_t. The network runs :func:`reconstruction_passes` times per image.

    Args:
        unet: noise predictor; run in eval mode under ``torch.inference_mode()``.
        x0: images (N, C, H, W) in [-1, 1], on any device.
        timesteps: timesteps t, each a positive multiple of ``stride``.
        stride: timesteps per DDIM step.
        alphas_cumprod: cumulative schedule, shape (T,).
        batch_size: images per network call.
        progress: show a progress bar over batches.
    """
    if len(x0) == 0:
        raise ValueError("no images to reconstruct")
    timesteps = sorted(set(int(t) for t in timesteps))
    for t in timesteps:
        _timestep_grid(t, stride)
    if timesteps[-1] >= len(alphas_cumprod):
        raise ValueError(f"timestep {timesteps[-1]} is beyond the schedule's {len(alphas_cumprod)} steps")

    device = next(unet.parameters()).device
    unet.eval()
    parts = {"x_t": {t: [] for t in timesteps}, "x_t_roundtrip": {t: [] for t in timesteps}, "x0_recon": {t: [] for t in timesteps}}
    eps_0 = []
    start = time.perf_counter()

    with torch.inference_mode():
        for begin in tqdm(range(0, len(x0), batch_size), desc="reconstructing", disable=not progress):
            batch = x0[begin : begin + batch_size].to(device)
            inverted, predictions = ddim_invert_trajectory(unet, batch, timesteps[-1], stride, alphas_cumprod)
            eps_0.append(predictions[0].cpu())

            for t in timesteps:
                x_t = inverted[t]
                reverse_states, reverse_eps = ddim_reverse_trajectory(unet, x_t, t, stride, alphas_cumprod, eps_t=predictions.get(t))
                roundtrip = ddim_step(unet, reverse_states[0], t - stride, t, alphas_cumprod, eps=reverse_eps.get(t - stride))
                parts["x_t"][t].append(x_t.cpu())
                parts["x_t_roundtrip"][t].append(roundtrip.cpu())
                parts["x0_recon"][t].append(reverse_states[-1].cpu())

    log.info("reconstructed %d images at t=%s (stride %d) in %.1f s", len(x0), timesteps, stride, time.perf_counter() - start)
    joined = {name: {t: torch.cat(chunks) for t, chunks in by_t.items()} for name, by_t in parts.items()}
    nfe = {t: reconstruction_passes([t], stride) for t in timesteps}
    return Reconstructions(x0=x0.cpu(), nfe=nfe, eps_0=torch.cat(eps_0), **joined)


def reconstruction_passes(timesteps: list[int], stride: int) -> int:
    """Return the network passes per image that :func:`reconstruct` runs for ``timesteps``.

    The inversion to the largest t takes ``max(t) / stride`` passes and each t then ``t / stride``
    reverse passes, less the one at x_t that the inversion ran for every t below the largest.
    The round trip's step back up reuses the second reverse pass, except at t = stride, where
    the reverse process has no second pass.
    """
    timesteps = sorted(set(timesteps))
    reverse = sum(t // stride for t in timesteps) - (len(timesteps) - 1)
    return timesteps[-1] // stride + reverse + timesteps.count(stride)


def residual_roundtrip(unet: UNet2DModel, x_t: torch.Tensor, t: int, stride: int, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Take one reverse step from t to t - stride and one inversion step back to t (2 NFE)."""
    previous = ddim_step(unet, x_t, t, t - stride, alphas_cumprod)
    return ddim_step(unet, previous, t - stride, t, alphas_cumprod)


def ddim_step(unet: UNet2DModel, x: torch.Tensor, t_from: int, t_to: int, alphas_cumprod: torch.Tensor, eps: torch.Tensor | None = None) -> torch.Tensor:
    """Take one DDIM step from timestep ``t_from`` to ``t_to``, in either direction.

    1 NFE, or none when ``eps``, the prediction ``eps_theta(x, t_from)``, is given.
    """
    alphas = alphas_cumprod.to(x.device, x.dtype)
    if eps is None:
        eps = predict_noise(unet, x, t_from)
    return ddim_move(x, eps, alphas[t_from], alphas[t_to])
