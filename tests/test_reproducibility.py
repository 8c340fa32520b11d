"""The same seed and thread count give the same weights, reconstructions and scores."""

import subprocess

import numpy as np
import torch

from conftest import synthetic_images
from fcre_utils import attacks, models, runs, training
from fcre_utils.presets import resolve_params
from fcre_utils.reconstruction import reconstruct


def scores_from_scratch(model_dir):
    params = resolve_params("smoke", {"epochs": 2})
    images = torch.from_numpy(synthetic_images(8, seed=3).astype(np.float32)).unsqueeze(1) / 127.5 - 1
    images = torch.nn.functional.pad(images, (2, 2, 2, 2), mode="replicate")
    scheduler = models.build_scheduler(params)
    unet, _ = training.train_ddpm(models.build_unet(params), scheduler, images, params, model_dir)
    recon = reconstruct(unet, images, params.timesteps, params.ddim_stride, scheduler.alphas_cumprod, progress=False)
    return recon, attacks.fcre_scores(recon.x0, recon.x0_recon[40], 0.15, 0.85, "l2")


def test_same_seed_same_scores(tmp_path):
    first_recon, first_scores = scores_from_scratch(tmp_path / "a" / "model")
    again_recon, again_scores = scores_from_scratch(tmp_path / "b" / "model")
    for t in first_recon.x0_recon:
        assert torch.equal(first_recon.x0_recon[t], again_recon.x0_recon[t]), t
    np.testing.assert_array_equal(first_scores, again_scores)


def test_environment_record_complete(smoke_params):
    record = runs.environment_record(smoke_params)
    assert record["seed"] == smoke_params.seed
    assert record["torch_threads"] == torch.get_num_threads()
    assert record["device"] == str(models.pick_device())
    assert set(runs.PACKAGES) <= set(record["packages"])
    assert record["packages"]["torch"] == torch.__version__


def test_environment_records_commit(smoke_params):
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=runs.__file__.rsplit("/", 1)[0])
    record = runs.environment_record(smoke_params)
    assert record["git_commit"] == head.stdout.strip()
    assert isinstance(record["git_uncommitted_changes"], bool)
