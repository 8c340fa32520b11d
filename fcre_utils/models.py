"""Build a grayscale DDPM (UNet2DModel and schedule) and save or load it as a diffusers folder.

A saved model is a standard ``DDPMPipeline`` folder (``model_index.json``, ``unet/`` with
safetensors weights, ``scheduler/``), so ``DDPMPipeline.from_pretrained(run_dir / "model")``
works, and any diffusers DDPM checkpoint with epsilon prediction can be attacked.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import torch
from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline, DDPMScheduler, UNet2DModel

from .presets import Params

log = logging.getLogger(__name__)


def build_unet(params: Params, in_channels: int = 1) -> UNet2DModel:
    """Build a UNet2DModel for ``params.image_size`` square images, seeded by ``params.seed``.

    Every level but the lowest uses plain ResNet blocks; the lowest adds self-attention when
    ``params.attention`` is set. The initial weights depend only on the parameters, so the same
    seed gives the same network.
    """
    torch.manual_seed(params.seed)
    levels = len(params.block_out_channels)
    down = ["DownBlock2D"] * levels
    up = ["UpBlock2D"] * levels
    if params.attention:
        down[-1] = "AttnDownBlock2D"
        up[0] = "AttnUpBlock2D"

    return UNet2DModel(
        sample_size=params.image_size,
        in_channels=in_channels,
        out_channels=in_channels,
        block_out_channels=tuple(params.block_out_channels),
        layers_per_block=params.layers_per_block,
        down_block_types=tuple(down),
        up_block_types=tuple(up),
        norm_num_groups=min(8, min(params.block_out_channels)),
        attention_head_dim=8,
    )


def build_scheduler(params: Params) -> DDPMScheduler:
    """Return the DDPM noise schedule: linear betas, epsilon prediction."""
    return DDPMScheduler(
        num_train_timesteps=params.num_train_timesteps,
        beta_start=params.beta_start,
        beta_end=params.beta_end,
        beta_schedule="linear",
        prediction_type="epsilon",
        clip_sample=True,
    )


def count_parameters(model: torch.nn.Module) -> int:
    """Return the number of parameters of ``model``."""
    return sum(p.numel() for p in model.parameters())


def save_model(unet: UNet2DModel, scheduler: DDPMScheduler, folder: str | os.PathLike) -> Path:
    """Save a DDPMPipeline folder atomically: written beside ``folder``, then renamed onto it."""
    folder = Path(folder)
    staging = folder.with_name(folder.name + ".partial")
    if staging.exists():
        shutil.rmtree(staging)

    DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(staging, safe_serialization=True)

    if folder.exists():
        previous = folder.with_name(folder.name + ".previous")
        if previous.exists():
            shutil.rmtree(previous)
        folder.rename(previous)
        staging.rename(folder)
        shutil.rmtree(previous)
    else:
        staging.rename(folder)
    return folder


def load_model(folder: str | os.PathLike, device: str | torch.device | None = None) -> tuple[UNet2DModel, DDPMScheduler]:
    """Load the UNet (eval mode) and noise schedule of a DDPMPipeline folder.

    The UNet goes to ``device``, or to :func:`pick_device` when it is None.

    Raises:
        FileNotFoundError: the folder, its ``unet/`` or its ``scheduler/`` is missing.
        ValueError: the scheduler does not predict epsilon.
    """
    folder = Path(folder)
    for part in ("unet", "scheduler"):
        if not (folder / part).is_dir():
            raise FileNotFoundError(
                f"{str(folder / part)!r} not found; expected a diffusers DDPMPipeline folder "
                "(train one with notebook 01 or save one with DDPMPipeline.save_pretrained)"
            )

    unet = _load_unet(folder / "unet").to(device or pick_device()).eval()
    return unet, _load_scheduler(folder / "scheduler")


def load_checkpoint(path: str | os.PathLike, scheduler_config: str | os.PathLike | None = None,
                    device: str | torch.device = "cpu") -> tuple[UNet2DModel, DDPMScheduler, dict[str, Path]]:
    """Load the UNet (eval mode) and noise schedule of a DDPMPipeline folder or a UNet2DModel folder.

    Args:
        path: a DDPMPipeline folder (``unet/``, ``scheduler/``), or a UNet2DModel folder
            (``config.json`` and safetensors weights).
        scheduler_config: a ``scheduler_config.json`` file or the folder holding it. When None,
            the pipeline's ``scheduler/`` is used, else ``scheduler_config.json`` inside the
            UNet folder, else the ``scheduler/`` folder beside it (a pipeline's ``unet/`` given
            directly).

    Returns:
        The UNet, the schedule, and the paths they came from (keys ``unet`` and ``scheduler``).

    Raises:
        FileNotFoundError: the folder, its weights or its scheduler config is missing.
        ValueError: the folder contains another model class, the weights are unreadable, or the
            scheduler does not predict epsilon.
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(
            f"model folder {str(path)!r} not found; give a diffusers DDPMPipeline folder or a UNet2DModel folder"
        )
    unet_folder = path / "unet" if (path / "unet").is_dir() else path
    if not (unet_folder / "config.json").is_file():
        raise FileNotFoundError(
            f"{str(path)!r} is neither a DDPMPipeline folder (unet/ and scheduler/) nor a UNet2DModel folder "
            "(config.json and safetensors weights); save the model with save_pretrained"
        )
    class_name = UNet2DModel.load_config(unet_folder).get("_class_name", "UNet2DModel")
    if class_name != "UNet2DModel":
        raise ValueError(
            f"{str(unet_folder / 'config.json')!r} describes a {class_name}; only unconditional "
            "UNet2DModel checkpoints (DDPM) are supported"
        )

    scheduler_path = _find_scheduler_config(path, unet_folder, scheduler_config)
    unet = _load_unet(unet_folder).to(device).eval()
    return unet, _load_scheduler(scheduler_path), {"unet": unet_folder, "scheduler": scheduler_path}


def _find_scheduler_config(path: Path, unet_folder: Path, scheduler_config: str | os.PathLike | None) -> Path:
    if scheduler_config is not None:
        candidates = [Path(scheduler_config)]
    else:
        candidates = [path / "scheduler", unet_folder / "scheduler_config.json", unet_folder.parent / "scheduler"]
    for candidate in candidates:
        if candidate.is_file() or (candidate / "scheduler_config.json").is_file():
            return candidate
    raise FileNotFoundError(
        f"no scheduler config found (looked for {', '.join(repr(str(c)) for c in candidates)}); give the "
        "scheduler_config.json of the model's noise schedule (--scheduler on the command line)"
    )


def _load_scheduler(location: Path) -> DDPMScheduler:
    """Load a DDPM noise schedule from a scheduler folder or config file; epsilon prediction only."""
    try:
        config = DDPMScheduler.load_config(location)
    except (OSError, ValueError) as error:
        raise ValueError(f"cannot read the scheduler config {str(location)!r} ({error}); save it again as JSON") from error
    if config.get("prediction_type", "epsilon") != "epsilon":
        raise ValueError(
            f"scheduler prediction_type is {config['prediction_type']!r}; the attacks "
            "support epsilon prediction only, so use a model trained with prediction_type='epsilon'"
        )
    try:
        return DDPMScheduler.from_config(config)
    except NotImplementedError as error:
        raise ValueError(
            f"scheduler beta_schedule {config.get('beta_schedule')!r} in {str(location)!r} is not "
            "implemented by diffusers' DDPMScheduler; use one it implements, such as 'linear'"
        ) from error


def _load_unet(folder: Path) -> UNet2DModel:
    """Load a UNet2DModel from safetensors weights only; pickle-based weights are rejected."""
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{str(folder / 'config.json')!r} not found; save the model again with save_pretrained")
    if not any(folder.glob("*.safetensors")):
        pickled = sorted(p.name for p in folder.glob("*.bin"))
        if pickled:
            raise ValueError(
                f"{str(folder)!r} contains only pickle-based weights ({', '.join(pickled)}), which are not "
                "loaded because unpickling can run code; in a trusted environment load them and save "
                "again with save_pretrained(..., safe_serialization=True)"
            )
        raise FileNotFoundError(
            f"{str(folder)!r} has no safetensors weights; the checkpoint is incomplete, so save or "
            "copy the model again"
        )
    try:
        return UNet2DModel.from_pretrained(folder, use_safetensors=True)
    except OSError as error:
        raise ValueError(
            f"cannot read the weights in {str(folder)!r} ({error}); the file is truncated or "
            "corrupt, so save the model again"
        ) from error


def check_images_fit(unet: UNet2DModel, images: torch.Tensor) -> None:
    """Raise ValueError unless ``images`` (N, C, H, W) have the channels and size ``unet`` expects."""
    channels, height, width = images.shape[1:]
    size = unet.config.sample_size
    expected = (size, size) if isinstance(size, int) else tuple(size)
    if channels != unet.config.in_channels:
        raise ValueError(
            f"the model expects {unet.config.in_channels}-channel images but the images have "
            f"{channels} channels; use a checkpoint trained on {channels}-channel images, or "
            "convert the images to match it"
        )
    if (height, width) != expected:
        raise ValueError(
            f"the model expects {expected[0]}x{expected[1]} px images (sample_size) but the images are "
            f"{height}x{width} px; set image_size={expected[0]} or use a checkpoint trained at that size"
        )


def pick_device() -> torch.device:
    """Return CUDA if available, then Apple MPS, then CPU.

    :func:`load_model` places the model there, and training runs where accelerate puts it (the same
    order). ``environment.yaml`` records the result.
    """
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def sample_images(unet: UNet2DModel, scheduler: DDPMScheduler, n: int, steps: int, seed: int = 0) -> torch.Tensor:
    """Draw ``n`` images with the DDIM sampler in ``steps`` steps (eta = 0).

    Returns:
        float tensor (n, C, H, W) in [-1, 1], on the CPU.
    """
    pipeline = DDIMPipeline(unet=unet, scheduler=DDIMScheduler.from_config(scheduler.config))
    pipeline.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(seed)
    with torch.inference_mode():
        images = pipeline(batch_size=n, generator=generator, num_inference_steps=steps, output_type="np").images
    return torch.from_numpy(images).permute(0, 3, 1, 2) * 2.0 - 1.0
