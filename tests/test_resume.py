"""Training killed with SIGKILL and resumed ends with the weights of an uninterrupted run."""

import os
import signal
import subprocess
import sys
import time

import nbformat
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from conftest import synthetic_images
from fcre_utils import models, training
from fcre_utils.presets import resolve_params

EPOCHS = 20


def small_members(n=8):
    images = torch.from_numpy(synthetic_images(n, seed=2).astype("float32")).unsqueeze(1) / 127.5 - 1
    return torch.nn.functional.pad(images, (2, 2, 2, 2), mode="replicate")


def train(model_dir, resume=False, members=None, **overrides):
    params = resolve_params("smoke", {"checkpoint_every": 2, **overrides})
    unet = models.build_unet(params)
    members = small_members() if members is None else members
    return training.train_ddpm(unet, models.build_scheduler(params), members, params, model_dir, resume=resume)


def assert_same_weights(first, second):
    assert first.keys() == second.keys()
    for name in first:
        assert torch.equal(first[name], second[name]), name


def test_resumed_weights_equal(tmp_path):
    uninterrupted, full_log = train(tmp_path / "a" / "model", epochs=5)
    train(tmp_path / "b" / "model", epochs=2)
    resumed, resumed_log = train(tmp_path / "b" / "model", resume=True, epochs=5)
    assert_same_weights(uninterrupted.state_dict(), resumed.state_dict())
    assert resumed_log.loss.tolist() == full_log.loss.tolist()
    assert resumed_log.epoch.tolist() == [1, 2, 3, 4, 5]


def test_state_per_model_dir(tmp_path):
    train(tmp_path / "model", epochs=2)
    train(tmp_path / "control_model", epochs=2)
    state_folder = tmp_path / training.STATE_FOLDER
    assert sorted(p.name for p in state_folder.iterdir()) == ["control_model", "model"]


def test_state_loads_without_pickle(tmp_path):
    train(tmp_path / "model", epochs=2)
    state = torch.load(training.training_state_path(tmp_path / "model"), weights_only=True)
    assert state["epoch"] == 2
    assert state["torch_threads"] == torch.get_num_threads()


def test_existing_state_needs_resume(tmp_path):
    train(tmp_path / "model", epochs=2)
    with pytest.raises(FileExistsError, match="pass resume=True"):
        train(tmp_path / "model", epochs=2)


def test_resume_with_other_members_rejected(tmp_path):
    train(tmp_path / "model", epochs=2)
    with pytest.raises(ValueError, match="different members_sha256"):
        train(tmp_path / "model", resume=True, members=-small_members(), epochs=4)


def test_resume_past_epochs_rejected(tmp_path):
    train(tmp_path / "model", epochs=4)
    with pytest.raises(ValueError, match="set epochs to at least 4"):
        train(tmp_path / "model", resume=True, epochs=2)


def test_finished_state_saves_model(tmp_path):
    first, _ = train(tmp_path / "model", epochs=2)
    (tmp_path / "model" / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    again, log = train(tmp_path / "model", resume=True, epochs=2)
    loaded, _ = models.load_model(tmp_path / "model")
    assert_same_weights(first.state_dict(), loaded.state_dict())
    assert log.epoch.tolist() == [1, 2]


def run_cli(*args, **options):
    command = [sys.executable, "-m", "fcre_utils", "run", *args]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **options)


def unet_weights(run_dir):
    return load_file(run_dir / "model" / "unet" / "diffusion_pytorch_model.safetensors")


@pytest.mark.slow
def test_killed_run_resumes_to_same_weights(tmp_path, npz_dataset):
    arguments = ["--preset", "smoke", "--set", f"dataset={npz_dataset}", "--set", f"epochs={EPOCHS}", "--only", "01"]
    reference = run_cli(*arguments, "--run-dir", str(tmp_path / "reference"))
    _, stderr = reference.communicate(timeout=600)
    assert reference.returncode == 0, stderr[-3000:]

    # Kill the runner and its notebook kernel as soon as the first training state is written.
    killed_dir = tmp_path / "killed"
    state = training.training_state_path(killed_dir / "model")
    victim = run_cli(*arguments, "--run-dir", str(killed_dir), start_new_session=True)
    while not state.exists() and victim.poll() is None:
        time.sleep(0.01)
    os.killpg(victim.pid, signal.SIGKILL)
    victim.wait()
    assert victim.returncode == -signal.SIGKILL
    killed_at = torch.load(state, weights_only=True)["epoch"]
    assert killed_at < EPOCHS

    resumed = run_cli("--resume", str(killed_dir))
    _, stderr = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, stderr[-3000:]

    assert_same_weights(unet_weights(tmp_path / "reference"), unet_weights(killed_dir))
    reference_log = pd.read_csv(tmp_path / "reference" / "training_log.csv")
    resumed_log = pd.read_csv(killed_dir / "training_log.csv")
    assert resumed_log.loss.tolist() == reference_log.loss.tolist()
    executed = nbformat.read(killed_dir / "01_train_ddpm.ipynb", as_version=4)
    assert f"resuming training of {killed_dir / 'model'} at epoch {killed_at + 1}" in str(executed.cells)
    assert (killed_dir / "interrupted" / "01_train_ddpm-1" / "01_train_ddpm.ipynb").is_file()
