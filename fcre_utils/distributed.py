"""Split the network passes of scoring across processes, with the results of one process.

Under ``accelerate launch`` every process runs the same code. Each process takes a contiguous run
of whole batches (accelerate's ``split_between_processes`` over the batch indices), runs the
network on its shard, and the shards are gathered back in process order, which is manifest order.
A shard starts a batch and the naive attack skips the noise of the images before it, so every
image meets the same batch and the same noise as in one process, and the scores match.

Training needs no helper here: :func:`fcre_utils.training.train_ddpm` runs on accelerate and
shards its data loader itself. :mod:`fcre_utils.launch` is the command line for both.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from diffusers import UNet2DModel

from .attacks import check_attack_inputs
from .presets import Params
from .reconstruction import Reconstructions, reconstruct
from .suite import Candidate, SuiteResult, baseline_candidates, calibration_labels, run_suite, suite_candidates

log = logging.getLogger(__name__)

STATE_KEYS = ("x_t", "x_t_roundtrip", "x0_recon")  # the per-timestep fields of Reconstructions


def shard_bounds(accelerator: Accelerator, n_images: int, batch_size: int) -> tuple[int, int]:
    """Return ``(begin, end)``: this process's images, a contiguous run of whole batches.

    Earlier processes get the earlier batches; a process gets ``begin == end`` (no images) when
    there are fewer batches than processes.
    """
    n_batches = math.ceil(n_images / batch_size)
    with accelerator.split_between_processes(list(range(n_batches))) as batches:
        if not batches:
            return n_images, n_images
        return batches[0] * batch_size, min((batches[-1] + 1) * batch_size, n_images)


def gather_in_order(part: object) -> list:
    """Return every process's ``part`` in process order, on every process (``[part]`` alone)."""
    return gather_object([part])


def concat_reconstructions(parts: list[Reconstructions]) -> Reconstructions:
    """Join reconstructions of consecutive image sets into one, in the order given."""
    eps_0 = None if any(part.eps_0 is None for part in parts) else torch.cat([part.eps_0 for part in parts])
    states = {key: {t: torch.cat([getattr(part, key)[t] for part in parts]) for t in parts[0].nfe} for key in STATE_KEYS}
    return Reconstructions(x0=torch.cat([part.x0 for part in parts]), nfe=dict(parts[0].nfe), eps_0=eps_0, **states)


def slice_reconstructions(recon: Reconstructions, begin: int, end: int) -> Reconstructions:
    """Return the reconstructions of images ``begin`` to ``end`` (exclusive)."""
    states = {key: {t: tensor[begin:end] for t, tensor in getattr(recon, key).items()} for key in STATE_KEYS}
    eps_0 = None if recon.eps_0 is None else recon.eps_0[begin:end]
    return Reconstructions(x0=recon.x0[begin:end], nfe=dict(recon.nfe), eps_0=eps_0, **states)


def reconstruct_sharded(accelerator: Accelerator, unet: UNet2DModel, images: torch.Tensor, params: Params, alphas_cumprod: torch.Tensor) -> Reconstructions:
    """Run :func:`fcre_utils.reconstruction.reconstruct` on this process's shard and gather every shard.

    Args:
        unet: the model, on ``accelerator.device``.
        images: every image (N, C, H, W) in [-1, 1], the same on every process.
        params: uses timesteps, ddim_stride, score_batch_size and progress.

    Returns:
        The reconstructions of all N images in their order, on every process.
    """
    begin, end = shard_bounds(accelerator, len(images), params.score_batch_size)
    part = None
    if end > begin:
        show_progress = params.progress and accelerator.is_main_process
        part = reconstruct(unet, images[begin:end], params.timesteps, params.ddim_stride, alphas_cumprod, params.score_batch_size, show_progress)
    parts = [p for p in gather_in_order(part) if p is not None]
    log.info("gathered reconstructions of %d images from %d processes", sum(len(p.x0) for p in parts), accelerator.num_processes)
    return concat_reconstructions(parts)


def merge_candidates(parts: list[tuple[list[Candidate], float, int]]) -> tuple[list[Candidate], float]:
    """Join the baseline candidates of consecutive shards into those of the full image set.

    Args:
        parts: per shard, in image order: the candidates, the network passes per image and the
            number of images. Every shard lists the same candidates in the same order.

    Returns:
        The candidates with every shard's scores joined, and the network passes per image.
    """
    merged = []
    for shards in zip(*(candidates for candidates, _, _ in parts)):
        first = shards[0]
        scores = np.concatenate([candidate.scores for candidate in shards])
        merged.append(Candidate(first.attack, first.setting, first.nfe, first.t, first.low, first.high, scores))
    n_images = sum(count for _, _, count in parts)
    passes = sum(passes * count for _, passes, count in parts) / n_images
    return merged, passes


def run_suite_sharded(accelerator: Accelerator, unet: UNet2DModel, alphas_cumprod: torch.Tensor, images: torch.Tensor,
                      manifest, params: Params, recon: Reconstructions | None = None) -> SuiteResult | None:
    """Run :func:`fcre_utils.suite.run_suite` with its network passes split over the processes.

    Every process reconstructs its shard (unless ``recon`` is given) and runs the baselines on
    it. The main process then chooses the settings on the calibration split and scores the
    chosen ones, which needs no network pass.

    Args:
        unet: the model, on ``accelerator.device``.
        images, manifest: every image in manifest order and the manifest, the same on every
            process.
        params, recon: as for :func:`fcre_utils.suite.run_suite`.

    Returns:
        The suite's result on the main process, the same as one process gives; None on the others.
    """
    calibration_labels(manifest)
    families, cutoffs, _, _ = suite_candidates(params)
    check_attack_inputs(unet, alphas_cumprod, images, max(max(ts) for ts in families.values()), params.score_batch_size)
    if len(images) != len(manifest):
        raise ValueError(f"{len(images)} images for a manifest of {len(manifest)} rows; pass the manifest's images in order")
    if recon is None:
        recon = reconstruct_sharded(accelerator, unet, images, params, alphas_cumprod)

    begin, end = shard_bounds(accelerator, len(images), params.score_batch_size)
    part = None
    if end > begin:
        candidates, passes = baseline_candidates(
            unet, alphas_cumprod, images[begin:end], slice_reconstructions(recon, begin, end), families, cutoffs,
            params.naive_draws, params.ddim_stride, params.seed, params.score_batch_size, first_image=begin,
        )
        part = (candidates, passes, end - begin)
    baselines = merge_candidates([p for p in gather_in_order(part) if p is not None])

    if not accelerator.is_main_process:
        return None
    return run_suite(unet, alphas_cumprod, images, manifest, params, recon, baselines=baselines)
