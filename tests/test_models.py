import json

import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler

from fcre_utils import models
from fcre_utils.presets import resolve_params


def test_unet_shapes():
    params = resolve_params("smoke")
    unet = models.build_unet(params)
    x = torch.randn(2, 1, 32, 32)
    assert unet(x, torch.tensor([3, 500])).sample.shape == x.shape


def test_schedule_is_linear_ddpm():
    scheduler = models.build_scheduler(resolve_params("quick"))
    assert scheduler.config.num_train_timesteps == 1000
    assert scheduler.betas[0].item() == pytest.approx(1e-4)
    assert scheduler.betas[-1].item() == pytest.approx(0.02)
    assert scheduler.config.prediction_type == "epsilon"


def test_save_load_round_trip(tiny_model, tmp_path):
    unet, scheduler, _, _ = tiny_model
    folder = models.save_model(unet, scheduler, tmp_path / "model")
    loaded, loaded_scheduler = models.load_model(folder)
    for (name, a), (_, b) in zip(unet.state_dict().items(), loaded.state_dict().items()):
        torch.testing.assert_close(a, b, msg=name)
    torch.testing.assert_close(loaded_scheduler.alphas_cumprod, scheduler.alphas_cumprod)


def test_saved_folder_is_diffusers_pipeline(tiny_model):
    _, _, folder, _ = tiny_model
    assert (folder / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert json.loads((folder / "model_index.json").read_text())["_class_name"] == "DDPMPipeline"
    pipeline = DDPMPipeline.from_pretrained(folder)
    assert isinstance(pipeline.scheduler, DDPMScheduler)


def test_save_replaces_existing_folder(tiny_model, tmp_path):
    unet, scheduler, _, _ = tiny_model
    models.save_model(unet, scheduler, tmp_path / "model")
    models.save_model(unet, scheduler, tmp_path / "model")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_missing_folder_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="unet"):
        models.load_model(tmp_path / "nowhere")


def test_partial_folder_named(tiny_model, tmp_path):
    unet, scheduler, _, _ = tiny_model
    folder = models.save_model(unet, scheduler, tmp_path / "model")
    for file in (folder / "scheduler").iterdir():
        file.unlink()
    (folder / "scheduler").rmdir()
    with pytest.raises(FileNotFoundError, match="scheduler"):
        models.load_model(folder)


def test_v_prediction_rejected(tiny_model, tmp_path):
    unet, scheduler, _, _ = tiny_model
    other = DDPMScheduler.from_config(scheduler.config, prediction_type="v_prediction")
    folder = models.save_model(unet, other, tmp_path / "model")
    with pytest.raises(ValueError, match="v_prediction"):
        models.load_model(folder)


def test_samples_in_range(tiny_model):
    unet, scheduler, _, _ = tiny_model
    samples = models.sample_images(unet, scheduler, 2, 3, seed=0)
    assert samples.shape == (2, 1, 32, 32)
    assert samples.min() >= -1.0
    assert samples.max() <= 1.0
