"""Train a DDPM on the member images with accelerate, keeping EMA weights.

One CPU process by default; ``accelerate launch`` runs the same loop on several GPUs or
processes. The EMA weights are what gets saved and attacked.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed
from diffusers import DDPMScheduler, UNet2DModel
from diffusers.training_utils import EMAModel
from torch.utils.data import DataLoader, TensorDataset
from tqdm.auto import tqdm

from .models import save_model
from .presets import Params

log = logging.getLogger(__name__)


def train_ddpm(
    unet: UNet2DModel,
    scheduler: DDPMScheduler,
    members: torch.Tensor,
    params: Params,
    model_dir: str | Path,
) -> tuple[UNet2DModel, pd.DataFrame]:
    """Train ``unet`` to predict the noise added to ``members`` and save its EMA weights.

    Args:
        unet: the network, updated in place.
        scheduler: the DDPM noise schedule.
        members: training images, float tensor (N, C, H, W) in [-1, 1].
        params: uses seed, epochs, batch_size, learning_rate, ema_decay, checkpoint_every,
            mixed_precision and progress.
        model_dir: where the DDPMPipeline folder with the EMA weights is saved, every
            ``checkpoint_every`` epochs and at the end.

    Returns:
        The EMA model (eval mode, on the CPU) and the loss log: one row per epoch with columns
        ``epoch``, ``loss`` (mean training loss) and ``seconds`` (elapsed time).
    """
    if len(members) == 0:
        raise ValueError("no member images to train on; n_members must be at least 1")
    if not torch.isfinite(members).all():
        raise ValueError("member images contain NaN or infinite values; fix the input data")

    # 1. set up accelerate, seeded data order and the optimizer
    set_seed(params.seed)
    accelerator = Accelerator(mixed_precision=params.mixed_precision)
    generator = torch.Generator().manual_seed(params.seed)
    loader = DataLoader(
        TensorDataset(members), batch_size=params.batch_size, shuffle=True, generator=generator
    )
    optimizer = torch.optim.AdamW(unet.parameters(), lr=params.learning_rate)
    ema = EMAModel(unet.parameters(), decay=params.ema_decay, use_ema_warmup=True, power=3 / 4)
    unet, optimizer, loader = accelerator.prepare(unet, optimizer, loader)
    ema.to(accelerator.device)

    # 2. the loop: noise each batch at uniform random timesteps and regress the noise
    num_timesteps = scheduler.config.num_train_timesteps
    log_rows = []
    start = time.perf_counter()
    bar = tqdm(range(1, params.epochs + 1), desc="training", disable=not params.progress)
    unet.train()
    for epoch in bar:
        total, count = 0.0, 0
        for (x0,) in loader:
            noise = torch.randn_like(x0)
            t = torch.randint(0, num_timesteps, (x0.shape[0],), device=x0.device)
            x_t = scheduler.add_noise(x0, noise, t)

            with accelerator.autocast():
                loss = F.mse_loss(unet(x_t, t).sample, noise)
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            ema.step(accelerator.unwrap_model(unet).parameters())

            total += loss.item() * x0.shape[0]
            count += x0.shape[0]

        mean_loss = accelerator.gather_for_metrics(torch.tensor([total / count], device=accelerator.device)).mean().item()
        if not math.isfinite(mean_loss):
            raise FloatingPointError(
                f"training loss is {mean_loss} at epoch {epoch} (learning_rate={params.learning_rate}); "
                "lower learning_rate and start a new run, the last saved checkpoint is kept"
            )
        log_rows.append({"epoch": epoch, "loss": mean_loss, "seconds": time.perf_counter() - start})
        bar.set_postfix(loss=f"{mean_loss:.4f}")

        # 3. checkpoint the EMA weights atomically
        if epoch % params.checkpoint_every == 0 or epoch == params.epochs:
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                save_model(_ema_copy(unet, ema, accelerator), scheduler, model_dir)

    log.info("trained %d epochs on %d members in %.1f s", params.epochs, len(members), time.perf_counter() - start)
    ema_unet = _ema_copy(unet, ema, accelerator)
    return ema_unet, pd.DataFrame(log_rows)


def _ema_copy(unet, ema: EMAModel, accelerator: Accelerator) -> UNet2DModel:
    """Return a CPU copy of the unwrapped network holding the EMA weights."""
    raw = accelerator.unwrap_model(unet)
    copy = UNet2DModel.from_config(raw.config)
    copy.load_state_dict(raw.state_dict())
    ema.copy_to(copy.parameters())
    return copy.to("cpu").eval()
