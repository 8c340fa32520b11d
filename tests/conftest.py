"""Shared fixtures: small real data files, a tiny trained DDPM and the smoke parameters."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fcre_utils import models, training
from fcre_utils.presets import resolve_params


def synthetic_images(n: int, size: int = 28, seed: int = 0) -> np.ndarray:
    """Distinct uint8 images (n, size, size): smooth random blobs plus pixel noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    images = []
    for _ in range(n):
        cx, cy, width = rng.uniform(0.2, 0.8, 2).tolist() + [rng.uniform(0.05, 0.2)]
        blob = np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * width**2))
        image = 200 * blob + rng.normal(0, 8, (size, size)) + 30
        images.append(np.clip(image, 0, 255).astype(np.uint8))
    return np.stack(images)


@pytest.fixture(scope="session")
def npz_dataset(tmp_path_factory) -> Path:
    """An npz file with 80 synthetic 28 px images under ``images``."""
    path = tmp_path_factory.mktemp("data") / "synthetic.npz"
    np.savez(path, images=synthetic_images(80), labels=np.zeros(80, dtype=np.int64))
    return path


@pytest.fixture(scope="session")
def smoke_params(npz_dataset):
    return resolve_params("smoke", {"dataset": str(npz_dataset)})


@pytest.fixture(scope="session")
def tiny_model(smoke_params, tmp_path_factory):
    """A tiny real UNet trained for a few epochs on 24 synthetic images, and its schedule."""
    torch.manual_seed(0)
    params = resolve_params("smoke", {"epochs": 3, "dataset": smoke_params.dataset})
    images = torch.from_numpy(synthetic_images(24, seed=1).astype(np.float32)).unsqueeze(1) / 127.5 - 1
    images = torch.nn.functional.pad(images, (2, 2, 2, 2), mode="replicate")
    unet = models.build_unet(params)
    scheduler = models.build_scheduler(params)
    model_dir = tmp_path_factory.mktemp("model") / "model"
    trained, _ = training.train_ddpm(unet, scheduler, images, params, model_dir)
    return trained, scheduler, model_dir, images
