import numpy as np
import pytest
import torch

from conftest import synthetic_images
from fcre_utils import models, training
from fcre_utils.presets import resolve_params


def small_images(n=8):
    images = torch.from_numpy(synthetic_images(n, seed=2).astype(np.float32)).unsqueeze(1) / 127.5 - 1
    return torch.nn.functional.pad(images, (2, 2, 2, 2), mode="replicate")


def train(tmp_path, **overrides):
    params = resolve_params("smoke", overrides)
    unet = models.build_unet(params)
    return training.train_ddpm(unet, models.build_scheduler(params), small_images(), params, tmp_path / "model")


def test_loss_log_has_every_epoch(tmp_path):
    _, log = train(tmp_path, epochs=3)
    assert list(log.epoch) == [1, 2, 3]
    assert np.isfinite(log.loss).all()
    assert log.seconds.is_monotonic_increasing


def test_loss_decreases(tmp_path):
    _, log = train(tmp_path, epochs=40, learning_rate=2e-3)
    assert log.loss.iloc[-5:].mean() < 0.7 * log.loss.iloc[:5].mean()


def test_saved_weights_are_ema(tmp_path):
    ema_model, _ = train(tmp_path, epochs=2)
    saved, _ = models.load_model(tmp_path / "model")
    for a, b in zip(ema_model.parameters(), saved.parameters()):
        torch.testing.assert_close(a, b)


def test_same_seed_same_weights(tmp_path):
    first, _ = train(tmp_path / "a", epochs=2)
    again, _ = train(tmp_path / "b", epochs=2)
    for a, b in zip(first.parameters(), again.parameters()):
        torch.testing.assert_close(a, b)


def test_empty_member_set_rejected(tmp_path):
    params = resolve_params("smoke")
    with pytest.raises(ValueError, match="no member images"):
        training.train_ddpm(models.build_unet(params), models.build_scheduler(params), torch.zeros(0, 1, 32, 32), params, tmp_path)


def test_nan_images_rejected(tmp_path):
    params = resolve_params("smoke")
    images = small_images()
    images[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        training.train_ddpm(models.build_unet(params), models.build_scheduler(params), images, params, tmp_path)


def test_diverging_loss_stops_training(tmp_path):
    with pytest.raises(FloatingPointError, match="lower learning_rate"):
        train(tmp_path, epochs=5, learning_rate=1e6)


def test_same_seed_same_initial_weights():
    params = resolve_params("smoke")
    first = models.build_unet(params)
    torch.randn(100)
    again = models.build_unet(params)
    for a, b in zip(first.parameters(), again.parameters()):
        torch.testing.assert_close(a, b)


def test_history_keeps_snapshots_along_training(tmp_path):
    params = resolve_params("smoke", {"epochs": 5, "history_every": 2, "checkpoint_every": 3})
    unet = models.build_unet(params)
    final, _ = training.train_ddpm(unet, models.build_scheduler(params), small_images(), params, tmp_path / "model",
                                   history_dir=tmp_path / "checkpoints")
    snapshots = training.list_snapshots(tmp_path / "checkpoints")
    assert list(snapshots) == [2, 4, 5]  # every 2 epochs, and the last one
    last, _ = models.load_model(snapshots[5])
    for a, b in zip(final.parameters(), last.parameters()):
        torch.testing.assert_close(a, b)
    early, _ = models.load_model(snapshots[2])
    assert not all(torch.equal(a, b) for a, b in zip(early.parameters(), last.parameters()))


def test_no_history_without_a_folder_or_with_zero(tmp_path):
    train(tmp_path, epochs=2, history_every=0)
    assert not (tmp_path / "checkpoints").exists()
    assert training.list_snapshots(tmp_path / "checkpoints") == {}


def test_checkpoints_and_snapshots_leave_training_unchanged(tmp_path):
    rare, _ = train(tmp_path / "rare", epochs=4, checkpoint_every=4, history_every=0)
    params = resolve_params("smoke", {"epochs": 4, "checkpoint_every": 1, "history_every": 1})
    often, _ = training.train_ddpm(models.build_unet(params), models.build_scheduler(params), small_images(), params,
                                   tmp_path / "often" / "model", history_dir=tmp_path / "often" / "history")
    for a, b in zip(rare.parameters(), often.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
