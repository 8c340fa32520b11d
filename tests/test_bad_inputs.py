"""Each bad input fails with an error that names the value and the fix (docs/bad-inputs.md)."""

import json
import logging
import os

import numpy as np
import pytest
import torch
import yaml
from diffusers import DDPMScheduler
from PIL import Image

from conftest import synthetic_images
from fcre_utils import __main__ as cli
from fcre_utils import data, metrics, models, runs, training
from fcre_utils.presets import resolve_params


def save_pngs(folder, images):
    folder.mkdir(exist_ok=True)
    for i, image in enumerate(images):
        Image.fromarray(image).save(folder / f"{i}.png")


def npz_params(tmp_path, images):
    path = tmp_path / "images.npz"
    np.savez(path, images=images)
    return resolve_params("smoke", {"dataset": str(path)})


# Image files

def test_truncated_png(tmp_path):
    save_pngs(tmp_path, synthetic_images(1))
    (tmp_path / "broken.png").write_bytes((tmp_path / "0.png").read_bytes()[:40])
    with pytest.raises(ValueError) as error:
        data.load_image_folder(tmp_path)
    assert "broken.png" in str(error.value)
    assert "replace or remove it" in str(error.value)


def test_truncated_npz(tmp_path):
    path = tmp_path / "broken.npz"
    np.savez(path, images=synthetic_images(3))
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError) as error:
        data.load_npz_images(path)
    assert "broken.npz" in str(error.value)
    assert "save it again" in str(error.value)


def test_unsupported_file_in_folder(tmp_path):
    save_pngs(tmp_path, synthetic_images(2))
    (tmp_path / "scan.dcm").write_bytes(b"DICM")
    with pytest.raises(ValueError) as error:
        data.load_image_folder(tmp_path)
    assert "scan.dcm" in str(error.value)
    assert "convert" in str(error.value)


def test_unsupported_dataset_suffix():
    with pytest.raises(ValueError) as error:
        resolve_params("smoke", {"dataset": "scans/patient1.dcm"})
    assert "'scans/patient1.dcm'" in str(error.value)
    assert "path to an .npz file" in str(error.value)


def test_mixed_sizes(tmp_path):
    save_pngs(tmp_path, synthetic_images(1))
    Image.fromarray(synthetic_images(1, size=32)[0]).save(tmp_path / "large.png")
    with pytest.raises(ValueError) as error:
        data.load_image_folder(tmp_path)
    assert "(28, 28), (32, 32)" in str(error.value)
    assert "resize them" in str(error.value)


def test_rgb_png_converted_with_warning(tmp_path, caplog):
    rgb = np.stack([synthetic_images(1)[0]] * 3, axis=-1)
    Image.fromarray(rgb).save(tmp_path / "colour.png")
    with caplog.at_level(logging.WARNING, logger="fcre_utils.data"):
        images, _ = data.load_image_folder(tmp_path)
    assert images.shape == (1, 28, 28)
    assert "converted RGB image colour.png to grayscale" in caplog.text


def test_rgb_npz_rejected(tmp_path):
    params = npz_params(tmp_path, np.stack([synthetic_images(4)] * 3, axis=-1))
    with pytest.raises(ValueError) as error:
        runs.load_source_images(params)
    assert "(4, 28, 28, 3)" in str(error.value)
    assert "convert the images to grayscale" in str(error.value)


def test_nan_pixels_rejected(tmp_path):
    images = synthetic_images(4).astype(np.float32)
    images[2, 5, 5] = np.nan
    params = npz_params(tmp_path, images)
    with pytest.raises(ValueError) as error:
        runs.load_source_images(params)
    assert "1 pixel values are NaN or infinite" in str(error.value)
    assert "first in image 2" in str(error.value)
    assert "replace them" in str(error.value)


def test_infinite_model_input_rejected():
    images = synthetic_images(2).astype(np.float64)
    images[1, 0, 0] = np.inf
    with pytest.raises(ValueError) as error:
        data.to_model_tensor(images, 32)
    assert "NaN or infinite" in str(error.value)
    assert "first in image 1" in str(error.value)


def test_nan_members_rejected(tmp_path):
    params = resolve_params("smoke")
    members = torch.zeros(3, 1, 32, 32)
    members[1, 0, 4, 4] = float("nan")
    with pytest.raises(ValueError) as error:
        training.train_ddpm(models.build_unet(params), models.build_scheduler(params), members, params, tmp_path / "model")
    assert "1 member pixel values are NaN or infinite" in str(error.value)
    assert "first in image 1" in str(error.value)


def test_constant_image_rejected(tmp_path):
    images = synthetic_images(4)
    images[3] = 128
    params = npz_params(tmp_path, images)
    with pytest.raises(ValueError) as error:
        runs.load_source_images(params)
    assert "1 images are constant" in str(error.value)
    assert "first image 3" in str(error.value)
    assert "remove them" in str(error.value)


# Splits

@pytest.mark.parametrize("name", ["n_members", "n_nonmembers"])
def test_empty_set_parameter(name):
    with pytest.raises(ValueError) as error:
        resolve_params("smoke", {name: 0})
    assert f"{name}=0 must be at least 1" in str(error.value)


def test_empty_set_split():
    with pytest.raises(ValueError) as error:
        data.make_splits(data.content_hashes(synthetic_images(10)), 5, 0, 0.2, seed=0)
    assert "n_nonmembers=0" in str(error.value)
    assert "at least 1" in str(error.value)


def test_empty_members_training(tmp_path):
    params = resolve_params("smoke")
    with pytest.raises(ValueError) as error:
        training.train_ddpm(models.build_unet(params), models.build_scheduler(params), torch.zeros(0, 1, 32, 32), params, tmp_path)
    assert "no member images" in str(error.value)
    assert "n_members must be at least 1" in str(error.value)


def test_image_in_both_sets():
    manifest = data.make_splits(data.content_hashes(synthetic_images(10)), 5, 5, 0.0, seed=0)
    shared = manifest.sha256.iloc[0]
    manifest.loc[manifest.index[-1], "sha256"] = shared
    with pytest.raises(ValueError) as error:
        data.check_manifest(manifest)
    assert shared[:12] in str(error.value)
    assert "remove the duplicates" in str(error.value)


def test_split_larger_than_data():
    with pytest.raises(ValueError) as error:
        data.make_splits(data.content_hashes(synthetic_images(20)), 15, 10, 0.2, seed=0)
    assert "= 25 exceeds the 20 available images" in str(error.value)
    assert "lower one of them" in str(error.value)


# Checkpoints

@pytest.fixture
def saved_model(tiny_model, tmp_path):
    unet, scheduler, _, _ = tiny_model
    return models.save_model(unet, scheduler, tmp_path / "model")


def test_missing_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        models.load_model(tmp_path / "nowhere")
    assert "nowhere/unet" in str(error.value)
    assert "DDPMPipeline folder" in str(error.value)


def test_checkpoint_without_weights(saved_model):
    (saved_model / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError) as error:
        models.load_model(saved_model)
    assert "model/unet" in str(error.value)
    assert "no safetensors weights" in str(error.value)


def test_truncated_weights(saved_model):
    weights = saved_model / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ValueError) as error:
        models.load_model(saved_model)
    assert "diffusion_pytorch_model.safetensors" in str(error.value)
    assert "save the model again" in str(error.value)


def test_checkpoint_channels_mismatch(tiny_model):
    unet, _, _, images = tiny_model
    with pytest.raises(ValueError) as error:
        models.check_images_fit(unet, images.repeat(1, 3, 1, 1))
    assert "1-channel" in str(error.value)
    assert "have 3 channels" in str(error.value)


def test_checkpoint_size_mismatch(tiny_model):
    unet, _, _, images = tiny_model
    with pytest.raises(ValueError) as error:
        models.check_images_fit(unet, images[:, :, :28, :28])
    assert "32x32" in str(error.value)
    assert "28x28" in str(error.value)
    assert "set image_size=32" in str(error.value)


def test_reconstruction_size_mismatch(tiny_model, tmp_path):
    unet, scheduler, _, images = tiny_model
    params = resolve_params("smoke")
    with pytest.raises(ValueError, match="set image_size=32"):
        runs.cached_reconstructions(tmp_path, params, unet, scheduler.alphas_cumprod, images[:, :, :28, :28])
    assert not (tmp_path / "reconstructions.pt").exists()


def test_timestep_beyond_schedule(tiny_model, tmp_path):
    unet, _, _, images = tiny_model
    params = resolve_params("smoke")
    with pytest.raises(ValueError) as error:
        runs.cached_reconstructions(tmp_path, params, unet, torch.linspace(0.99, 0.01, 30), images)
    assert "timestep 40" in str(error.value)
    assert "30 timesteps" in str(error.value)


def test_v_prediction_scheduler(tiny_model, tmp_path):
    unet, scheduler, _, _ = tiny_model
    folder = models.save_model(unet, DDPMScheduler.from_config(scheduler.config, prediction_type="v_prediction"), tmp_path / "model")
    with pytest.raises(ValueError) as error:
        models.load_model(folder)
    assert "'v_prediction'" in str(error.value)
    assert "epsilon" in str(error.value)


def test_unknown_beta_schedule(saved_model):
    config_path = saved_model / "scheduler" / "scheduler_config.json"
    config = json.loads(config_path.read_text())
    config["beta_schedule"] = "cubic"
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError) as error:
        models.load_model(saved_model)
    assert "'cubic'" in str(error.value)
    assert "'linear'" in str(error.value)


# Runner parameters: rejected before the run directory or any notebook exists

@pytest.mark.parametrize(
    "arguments, value, fix",
    [
        (["--preset", "huge"], "'huge'", "choose one of"),
        (["--preset", "smoke", "--set", "epoch=3"], "'epoch'", "valid parameters are"),
        (["--preset", "smoke", "--set", "epochs=many"], "'many'", "fix the value"),
        (["--preset", "smoke", "--set", "timesteps=50"], "50 (int)", "fix the value"),
    ],
)
def test_runner_rejects_before_running(tmp_path, capsys, arguments, value, fix):
    code = cli.main(["run", *arguments, "--run-dir", str(tmp_path / "run")])
    message = capsys.readouterr().err
    assert code == 2
    assert value in message
    assert fix in message
    assert not (tmp_path / "run").exists()


def test_resume_with_changes_rejected(tmp_path, capsys):
    code = cli.main(["run", "--resume", str(tmp_path), "--set", "epochs=3"])
    message = capsys.readouterr().err
    assert code == 2
    assert "--set" in message
    assert "leave them out" in message


def test_resume_unknown_directory(tmp_path, capsys):
    code = cli.main(["run", "--resume", str(tmp_path)])
    message = capsys.readouterr().err
    assert code == 2
    assert "run_request.yaml" in message
    assert "start a new run" in message


# Metrics

def test_constant_scores_give_chance():
    labels = np.array([True] * 5 + [False] * 5)
    result = metrics.attack_metrics(labels, np.full(10, 0.3))
    assert result["auc"] == 0.5
    assert result["asr"] == 0.5
    assert result["tpr_at_1pct_fpr"] == 0.0


def test_single_class_labels():
    with pytest.raises(ValueError) as error:
        metrics.attack_metrics(np.ones(6, dtype=bool), np.arange(6.0))
    assert "single class (6 members, 0 non-members)" in str(error.value)
    assert "both members and non-members" in str(error.value)


# Pickle-bearing files: rejected without running the pickled code

class Payload:
    """Creates ``marker`` when unpickled, to show whether a loader ran pickled code."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_pickled_tensor_file(tmp_path):
    marker = tmp_path / "unpickled"
    torch.save({"x0": torch.zeros(2), "extra": Payload(str(marker))}, tmp_path / "reconstructions.pt")
    with pytest.raises(ValueError) as error:
        runs.load_tensors(tmp_path / "reconstructions.pt")
    assert "reconstructions.pt" in str(error.value)
    assert "pickled Python objects" in str(error.value)
    assert not marker.exists()


def test_pickled_npz(tmp_path):
    marker = tmp_path / "unpickled"
    np.savez(tmp_path / "images.npz", images=np.array([Payload(str(marker))], dtype=object))
    with pytest.raises(ValueError) as error:
        data.load_npz_images(tmp_path / "images.npz")
    assert "images.npz" in str(error.value)
    assert "pickled objects are rejected" in str(error.value)
    assert not marker.exists()


def test_pickle_weights_not_loaded(saved_model):
    weights = saved_model / "unet" / "diffusion_pytorch_model.safetensors"
    torch.save({"conv_in.weight": Payload(str(saved_model / "unpickled"))}, weights.with_suffix(".bin"))
    weights.unlink()
    with pytest.raises(ValueError) as error:
        models.load_model(saved_model)
    assert "diffusion_pytorch_model.bin" in str(error.value)
    assert "safe_serialization=True" in str(error.value)
    assert not (saved_model / "unpickled").exists()


def test_yaml_python_tag(tmp_path):
    (tmp_path / "params.yaml").write_text(f"seed: !!python/object/apply:os.mkdir ['{tmp_path / 'unpickled'}']\n")
    with pytest.raises(ValueError) as error:
        runs.load_run(tmp_path)
    assert "params.yaml" in str(error.value)
    assert "plain YAML" in str(error.value)
    assert not (tmp_path / "unpickled").exists()
