"""Train a DDPM on the member images with accelerate, keeping EMA weights.

One CPU process by default; ``accelerate launch`` runs the same loop on several GPUs or
processes (see :mod:`fcre_utils.launch`). The EMA weights are what gets saved and attacked.

With P processes, ``batch_size`` is the batch of each process: every optimizer step averages the
gradients of P batches, so an epoch takes about 1/P of the steps of one process. Setting
``batch_size`` to the one-process value divided by P keeps the batch per step and the steps per
epoch of one process. Each process draws its own noise, seeded with seed + process index, so a
single process draws the same noise as with ``set_seed(seed)``.

Every checkpoint also writes a training state (network, optimizer, EMA, RNG states, epoch and loss
log) to ``<model_dir parent>/training_state/<model_dir name>/state.pt``, so a killed run resumes
where it stopped and ends with the same weights as an uninterrupted run on the same thread count.
``Accelerator.save_state`` is not used because accelerate 1.16 stores RNG states and custom
objects as pickles that it loads with ``weights_only=False``.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from copy import deepcopy
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed
from diffusers import DDPMScheduler, UNet2DModel
from diffusers.training_utils import EMAModel
from torch.utils.data import DataLoader, TensorDataset
from tqdm.auto import tqdm

from .models import check_images_fit, save_model
from .presets import Params
from .runs import load_tensors, save_tensors

STATE_FOLDER = "training_state"
STATE_FILE = "state.pt"

log = logging.getLogger(__name__)


def train_ddpm(
    unet: UNet2DModel,
    scheduler: DDPMScheduler,
    members: torch.Tensor,
    params: Params,
    model_dir: str | Path,
    *,
    resume: bool = False,
    history_dir: str | Path | None = None,
) -> tuple[UNet2DModel, pd.DataFrame]:
    """Train ``unet`` to predict the noise added to ``members`` and save its EMA weights.

    Args:
        unet: the network, updated in place.
        scheduler: the DDPM noise schedule.
        members: training images, float tensor (N, C, H, W) in [-1, 1].
        params: uses seed, epochs, batch_size, learning_rate, ema_decay, checkpoint_every,
            mixed_precision and progress.
        model_dir: where the DDPMPipeline folder with the EMA weights is saved, every
            ``checkpoint_every`` epochs and at the end. The training state goes to
            :func:`training_state_path` of it.
        resume: continue from the training state of ``model_dir`` if there is one. The state must
            come from the same members, seed, network and optimizer settings; ``epochs`` may be
            raised to train longer.
        history_dir: where to keep a snapshot of the EMA weights every ``history_every`` epochs
            and at the last epoch, as DDPMPipeline folders ``epoch-NNNNN``, for attacks along
            training. None keeps none.

    Returns:
        The EMA model (eval mode, on the CPU) and the loss log: one row per epoch with columns
        ``epoch``, ``loss`` (mean training loss) and ``seconds`` (elapsed time).

    Raises:
        FileExistsError: ``resume`` is false and ``model_dir`` already has a training state.
        ValueError: the training state was written for other members or settings.
    """
    if len(members) == 0:
        raise ValueError("no member images to train on; n_members must be at least 1")
    finite = torch.isfinite(members)
    if not finite.all():
        first = int(torch.nonzero(~finite.flatten(1).all(dim=1))[0])
        raise ValueError(
            f"{int((~finite).sum())} member pixel values are NaN or infinite (first in image {first}); "
            "replace them or remove those images"
        )
    check_images_fit(unet, members)
    state_path = training_state_path(model_dir)
    fingerprint = _fingerprint(unet, members, params)
    state = _read_state(state_path, fingerprint) if resume else None
    if not resume and state_path.exists():
        raise FileExistsError(
            f"{str(state_path)!r} already exists, so {str(model_dir)!r} already has a training in progress or done; "
            "pass resume=True to continue it, or choose a new model_dir"
        )

    # 1. set up accelerate, seeded data order and the optimizer
    accelerator = Accelerator(mixed_precision=params.mixed_precision)
    set_seed(params.seed, device_specific=True)
    generator = torch.Generator().manual_seed(params.seed)
    loader = DataLoader(
        TensorDataset(members), batch_size=params.batch_size, shuffle=True, generator=generator
    )
    optimizer = torch.optim.AdamW(unet.parameters(), lr=params.learning_rate)
    ema = EMAModel(unet.parameters(), decay=params.ema_decay, use_ema_warmup=True, power=3 / 4)
    first_epoch, log_rows, elapsed = 1, [], 0.0
    if state is not None:
        first_epoch, log_rows, elapsed = _restore(state, unet, optimizer, ema, generator)
        if first_epoch - 1 > params.epochs:
            raise ValueError(
                f"training state {str(state_path)!r} already reached epoch {first_epoch - 1}, beyond "
                f"epochs={params.epochs}; set epochs to at least {first_epoch - 1}, or choose a new model_dir"
            )
        log.info("resuming training of %s at epoch %d of %d", model_dir, first_epoch, params.epochs)
    if params.mixed_precision != "no" and accelerator.device.type == "cpu":
        log.warning("mixed_precision=%s has no effect on the CPU; training runs in float32", params.mixed_precision)
    unet, optimizer, loader = accelerator.prepare(unet, optimizer, loader)
    ema.to(accelerator.device)

    # 2. the loop: noise each batch at uniform random timesteps and regress the noise
    num_timesteps = scheduler.config.num_train_timesteps
    start = time.perf_counter() - elapsed
    bar = tqdm(range(first_epoch, params.epochs + 1), desc="training", disable=not params.progress)
    unet.train()
    for epoch in bar:
        # The sums stay on the device, so the loop waits for the device once per epoch, not per step.
        total = torch.zeros((), device=accelerator.device)
        count = 0
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

            total += loss.detach().float() * x0.shape[0]
            count += x0.shape[0]

        # Sum over processes: each saw its own share of the members this epoch.
        sums = accelerator.reduce(torch.stack([total, torch.tensor(float(count), device=accelerator.device)]), reduction="sum")
        mean_loss = (sums[0] / sums[1]).item()
        if not math.isfinite(mean_loss):
            raise FloatingPointError(
                f"training loss is {mean_loss} at epoch {epoch} (learning_rate={params.learning_rate}); "
                "lower learning_rate and start a new run, the last saved checkpoint is kept"
            )
        log_rows.append({"epoch": epoch, "loss": mean_loss, "seconds": time.perf_counter() - start})
        bar.set_postfix(loss=f"{mean_loss:.4f}")

        # 3. checkpoint the EMA weights, then the training state, each atomically
        snapshot = history_dir is not None and params.history_every > 0 and (epoch % params.history_every == 0 or epoch == params.epochs)
        if snapshot or epoch % params.checkpoint_every == 0 or epoch == params.epochs:
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                save_model(_ema_copy(unet, ema, accelerator), scheduler, model_dir)
                if snapshot:
                    save_model(_ema_copy(unet, ema, accelerator), scheduler, snapshot_path(history_dir, epoch))
                state = _capture(epoch, log_rows, accelerator.unwrap_model(unet), optimizer, ema, generator, fingerprint)
                save_tensors(state, state_path, overwrite=True)

    if first_epoch > params.epochs:
        # The state already covers every epoch, for example when a run stopped after training.
        log.info("training state of %s already reached epoch %d; nothing left to train", model_dir, first_epoch - 1)
        if accelerator.is_main_process:
            save_model(_ema_copy(unet, ema, accelerator), scheduler, model_dir)
    log.info("trained %d epochs on %d members in %.1f s", params.epochs, len(members), time.perf_counter() - start)
    ema_unet = _ema_copy(unet, ema, accelerator)
    return ema_unet, pd.DataFrame(log_rows)


def _ema_copy(unet, ema: EMAModel, accelerator: Accelerator) -> UNet2DModel:
    """Return a CPU copy of the unwrapped network holding the EMA weights.

    The copy is a deep copy, not a new network: initialising one would draw from the global RNG
    and change the training noise after every checkpoint, so the trained weights would depend on
    ``checkpoint_every`` and ``history_every``.
    """
    copy = deepcopy(accelerator.unwrap_model(unet))
    ema.copy_to(copy.parameters())
    return copy.to("cpu").eval()


def snapshot_path(history_dir: str | Path, epoch: int) -> Path:
    """Folder of the weight snapshot taken after ``epoch``."""
    return Path(history_dir) / f"epoch-{epoch:05d}"


def list_snapshots(history_dir: str | Path) -> dict[int, Path]:
    """Return the snapshots in ``history_dir`` by epoch, oldest first; empty when there are none."""
    folders = sorted(Path(history_dir).glob("epoch-[0-9][0-9][0-9][0-9][0-9]")) if Path(history_dir).is_dir() else []
    return {int(folder.name.split("-")[1]): folder for folder in folders if (folder / "unet").is_dir()}


def training_state_path(model_dir: str | Path) -> Path:
    """Return the training state file of ``model_dir``: ``<parent>/training_state/<name>/state.pt``.

    One folder per model folder, so two models trained into one run directory keep separate states.
    """
    model_dir = Path(model_dir)
    return model_dir.parent / STATE_FOLDER / model_dir.name / STATE_FILE


def _fingerprint(unet: UNet2DModel, members: torch.Tensor, params: Params) -> dict[str, Any]:
    """Describe what a resumed training must share with the one that wrote the state."""
    digest = hashlib.sha256(members.detach().cpu().contiguous().numpy().tobytes()).hexdigest()
    return {
        "members_sha256": digest,
        "members_shape": list(members.shape),
        "network": repr(sorted((k, v) for k, v in dict(unet.config).items() if not k.startswith("_"))),
        "seed": params.seed,
        "batch_size": params.batch_size,
        "learning_rate": params.learning_rate,
        "ema_decay": params.ema_decay,
        "mixed_precision": params.mixed_precision,
    }


def _read_state(path: Path, fingerprint: dict[str, Any]) -> dict[str, Any] | None:
    """Load the training state at ``path`` (None when there is none) and check it fits this training."""
    if not path.is_file():
        log.info("no training state at %s; training from the start", path)
        return None
    state = load_tensors(path)
    for key, value in fingerprint.items():
        if state["fingerprint"].get(key) != value:
            raise ValueError(
                f"training state {str(path)!r} was written with a different {key} "
                f"({state['fingerprint'].get(key)!r}, now {value!r}); resume with the same "
                "members and settings, or choose a new model_dir to train from the start"
            )
    if state["torch_threads"] != torch.get_num_threads():
        log.warning(
            "training state %s was written with %d threads, now %d; the resumed weights may differ "
            "slightly from an uninterrupted run", path, state["torch_threads"], torch.get_num_threads(),
        )
    return state


def _capture(epoch, log_rows, unet, optimizer, ema: EMAModel, generator: torch.Generator, fingerprint) -> dict[str, Any]:
    """Collect everything the loop needs to continue after ``epoch`` as tensors and plain values.

    NOTE: only the main process calls this, so the RNG states are its own. With several
    processes every process resumes from them, and the noise after a resume differs from an
    uninterrupted run's.
    """
    state = {
        "epoch": epoch,
        "log": {column: [row[column] for row in log_rows] for column in ("epoch", "loss", "seconds")},
        "unet": unet.state_dict(),
        "optimizer": optimizer.state_dict(),
        "ema": ema.state_dict(),
        "torch_rng": torch.get_rng_state(),
        "loader_rng": generator.get_state(),
        "torch_threads": torch.get_num_threads(),
        "fingerprint": fingerprint,
    }
    if torch.cuda.is_available():
        state["cuda_rng"] = torch.cuda.get_rng_state_all()
    return state


def _restore(state, unet, optimizer, ema: EMAModel, generator: torch.Generator) -> tuple[int, list[dict], float]:
    """Load a captured state into the training objects; return the next epoch, log and elapsed seconds."""
    unet.load_state_dict(state["unet"])
    optimizer.load_state_dict(state["optimizer"])
    ema.load_state_dict(state["ema"])
    torch.set_rng_state(state["torch_rng"])
    generator.set_state(state["loader_rng"])
    if "cuda_rng" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])

    columns = state["log"]
    log_rows = [dict(zip(columns, values)) for values in zip(*columns.values())]
    elapsed = log_rows[-1]["seconds"] if log_rows else 0.0
    return state["epoch"] + 1, log_rows, elapsed
