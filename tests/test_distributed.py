"""Two processes under accelerate launch give the scores and the loss curve of one process."""

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from fcre_utils import distributed, models, reconstruction, runs, suite, training
from fcre_utils.presets import resolve_params

ROOT = Path(__file__).resolve().parents[1]
EPOCHS = 30
# accelerate 1.16 starts several CPU processes on one machine through --multi_gpu (torchrun) with
# ACCELERATE_USE_CPU=true; its --cpu flag alone starts one process unless mpirun is installed.
LAUNCH = ["launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch(*args: str) -> None:
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or shutil.which("accelerate")
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    command = [accelerate, *LAUNCH, "--main_process_port", str(free_port()), "-m", "fcre_utils.launch", *args]
    result = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stderr[-3000:]}"


@pytest.fixture(scope="module")
def two_process_run(npz_dataset, tmp_path_factory):
    """A smoke run trained and scored by two processes: 4 images per process and step, 7 per scoring batch."""
    run_dir = tmp_path_factory.mktemp("distributed") / "run"
    overrides = [f"dataset={npz_dataset}", f"epochs={EPOCHS}", "batch_size=4", f"checkpoint_every={EPOCHS}",
                 "train_control=false", "score_batch_size=7"]
    launch("train", "--run-dir", str(run_dir), "--preset", "smoke", *[f"--set={value}" for value in overrides])
    launch("score", "--run-dir", str(run_dir))
    return run_dir


@pytest.fixture
def one_thread():
    """Run like each launched process: torchrun gives every process one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
def test_two_processes_score_like_one(two_process_run, one_thread):
    params = runs.load_run(two_process_run)
    manifest, images = runs.load_split_images(two_process_run, params)
    unet, scheduler = models.load_model(two_process_run / "model", device="cpu")
    one_process = suite.run_suite(unet, scheduler.alphas_cumprod, images, manifest, params)

    two_processes = pd.read_csv(two_process_run / "scores.csv")
    assert list(two_processes.columns) == list(one_process.scores.columns)
    assert (two_processes.attack.to_numpy() == one_process.scores.attack.to_numpy()).all()
    assert (two_processes.setting.to_numpy() == one_process.scores.setting.to_numpy()).all()
    assert (two_processes.image_id.to_numpy() == one_process.scores.image_id.to_numpy()).all()
    # Same batches and noise per image, so only float rounding may differ; a wrong order or noise
    # draw changes scores in the first digits.
    np.testing.assert_allclose(two_processes.score.to_numpy(), one_process.scores.score.to_numpy(), rtol=1e-6, atol=1e-12)


@pytest.mark.slow
def test_two_processes_loss_curve_like_one(two_process_run, one_thread):
    two_processes = pd.read_csv(two_process_run / "training_log.csv")
    params = runs.load_run(two_process_run)
    manifest, images = runs.load_split_images(two_process_run, params)
    members = images[runs.rows(manifest, member=True)]
    # One process with twice the batch takes the same images per step and the same steps per epoch.
    single = resolve_params("smoke", {"dataset": params.dataset, "epochs": EPOCHS, "batch_size": 8, "checkpoint_every": EPOCHS, "train_control": False})
    _, one_process = training.train_ddpm(models.build_unet(single), models.build_scheduler(single), members, single, two_process_run.parent / "one" / "model")

    assert list(two_processes.epoch) == list(one_process.epoch)
    assert np.isfinite(two_processes.loss).all()
    assert two_processes.loss.iloc[-5:].mean() < 0.6 * two_processes.loss.iloc[:5].mean()
    # The runs differ only in their noise and timestep draws. Over five seeds of one process and
    # three of two, the mean loss of the last 10 epochs ranged from 0.080 to 0.088. A run with
    # half the optimizer steps ends near twice that, so a 25% tolerance still catches it.
    late_two, late_one = two_processes.loss.iloc[-10:].mean(), one_process.loss.iloc[-10:].mean()
    assert abs(late_two - late_one) < 0.25 * late_one


def test_shards_join_to_whole_set(tiny_model, one_thread):
    unet, scheduler, _, images = tiny_model
    recon = reconstruction.reconstruct(unet, images, [20, 40], 20, scheduler.alphas_cumprod, batch_size=7, progress=False)
    joined = distributed.concat_reconstructions([distributed.slice_reconstructions(recon, 0, 14), distributed.slice_reconstructions(recon, 14, 24)])
    for key in ("x0", "eps_0"):
        assert torch.equal(getattr(joined, key), getattr(recon, key)), key
    for key in distributed.STATE_KEYS:
        for t in (20, 40):
            assert torch.equal(getattr(joined, key)[t], getattr(recon, key)[t]), (key, t)


def test_shard_noise_matches_full_run(tiny_model, one_thread):
    unet, scheduler, _, images = tiny_model
    recon = reconstruction.reconstruct(unet, images, [20, 40], 20, scheduler.alphas_cumprod, batch_size=7, progress=False)
    families = {"naive": [20, 40], "secmi": [40], "pia": [20], "sima": [20]}
    arguments = (families, [0.5], 2, 20, 3, 7)

    whole, whole_passes = suite.baseline_candidates(unet, scheduler.alphas_cumprod, images, recon, *arguments)
    parts = []
    for begin, end in [(0, 14), (14, 24)]:
        candidates, passes = suite.baseline_candidates(unet, scheduler.alphas_cumprod, images[begin:end],
                                                       distributed.slice_reconstructions(recon, begin, end), *arguments, first_image=begin)
        parts.append((candidates, passes, end - begin))
    merged, merged_passes = distributed.merge_candidates(parts)

    assert merged_passes == whole_passes
    for a, b in zip(merged, whole):
        assert (a.attack, a.setting) == (b.attack, b.setting)
        np.testing.assert_allclose(a.scores, b.scores, rtol=1e-6, err_msg=a.attack)


def test_shard_start_off_batch_rejected(tiny_model):
    unet, scheduler, _, images = tiny_model
    recon = reconstruction.reconstruct(unet, images[:8], [20], 20, scheduler.alphas_cumprod, progress=False)
    families = {"naive": [20], "secmi": [20], "pia": [], "sima": []}
    with pytest.raises(ValueError, match="first_image=3 must be a multiple of batch_size=7"):
        suite.baseline_candidates(unet, scheduler.alphas_cumprod, images[:8], recon, families, [], 1, 20, 0, 7, first_image=3)
