import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from conftest import synthetic_images
from fcre_utils import runs
from fcre_utils.presets import resolve_params


@pytest.fixture
def run(tmp_path, npz_dataset):
    run_dir = tmp_path / "run"
    params = runs.start_run(run_dir, "smoke", {"dataset": str(npz_dataset)})
    return run_dir, params


def test_start_run_records_params(run):
    run_dir, params = run
    recorded = yaml.safe_load((run_dir / "params.yaml").read_text())
    assert recorded["preset"] == "smoke"
    assert runs.load_run(run_dir) == params


def test_start_run_twice_rejected(run, npz_dataset):
    run_dir, _ = run
    with pytest.raises(FileExistsError, match="already contains a run"):
        runs.start_run(run_dir, "smoke", {"dataset": str(npz_dataset)})


def test_load_run_without_params(tmp_path):
    with pytest.raises(FileNotFoundError, match="run notebook 01"):
        runs.load_run(tmp_path)


def test_manifest_images_in_order(run):
    run_dir, params = run
    manifest = runs.create_manifest(run_dir, params)
    loaded, images = runs.load_split_images(run_dir, params)
    pd.testing.assert_frame_equal(manifest, loaded)
    assert images.shape == (len(manifest), 1, 32, 32)


def test_changed_data_detected(tmp_path):
    dataset = tmp_path / "images.npz"
    np.savez(dataset, images=synthetic_images(80))
    run_dir = tmp_path / "run"
    params = runs.start_run(run_dir, "smoke", {"dataset": str(dataset)})
    manifest = runs.create_manifest(run_dir, params)

    changed = synthetic_images(80)
    first = int(manifest.image_id.iloc[0])
    changed[first] = 255 - changed[first]
    np.savez(dataset, images=changed)
    with pytest.raises(ValueError, match=f"first image_id {first}"):
        runs.load_split_images(run_dir, params)


def test_table_never_overwritten(tmp_path):
    table = pd.DataFrame({"a": [1, 2]})
    runs.write_table(table, tmp_path / "scores.csv")
    with pytest.raises(FileExistsError, match="already exists"):
        runs.write_table(pd.DataFrame({"a": [3]}), tmp_path / "scores.csv")
    assert pd.read_csv(tmp_path / "scores.csv").a.tolist() == [1, 2]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scores.csv"]


def test_tensors_round_trip(tmp_path):
    values = {"x0": torch.randn(2, 1, 4, 4), "x_t": {10: torch.randn(2, 1, 4, 4)}, "nfe": {10: 3}}
    runs.save_tensors(values, tmp_path / "r.pt")
    loaded = runs.load_tensors(tmp_path / "r.pt")
    torch.testing.assert_close(loaded["x_t"][10], values["x_t"][10])
    assert loaded["nfe"] == {10: 3}


def test_new_run_dirs_distinct(tmp_path):
    first = runs.new_run_dir(tmp_path, "quick")
    second = runs.new_run_dir(tmp_path, "quick")
    assert first != second
    assert first.name.startswith("quick-")


def test_rows_mask(run):
    run_dir, params = run
    manifest = runs.create_manifest(run_dir, params)
    mask = runs.rows(manifest, member=True, split="calibration")
    assert mask.dtype == torch.bool
    assert int(mask.sum()) == int((manifest.member & (manifest.split == "calibration")).sum())


def test_data_source_recorded(run, npz_dataset):
    run_dir, params = run
    runs.create_manifest(run_dir, params)
    record = yaml.safe_load((run_dir / "data_source.yaml").read_text())
    assert record["path"] == str(npz_dataset.resolve())
    assert record["sha256"] == __import__("hashlib").sha256(npz_dataset.read_bytes()).hexdigest()
    assert record["unique_images"] == 80


def test_missing_dataset_file_named(tmp_path):
    params = resolve_params("smoke", {"dataset": str(tmp_path / "absent.npz")})
    with pytest.raises(FileNotFoundError, match="absent.npz"):
        runs.source_file(params)


def test_missing_manifest_named(run):
    run_dir, params = run
    with pytest.raises(FileNotFoundError, match="run notebook 01"):
        runs.load_split_images(run_dir, params)


def test_figure_never_overwritten(tmp_path):
    import matplotlib.pyplot as plt
    from fcre_utils import plotting
    fig = plt.figure()
    plotting.save_figure(fig, tmp_path, "once")
    with pytest.raises(FileExistsError, match="once.png"):
        plotting.save_figure(fig, tmp_path, "once")
    assert sorted(p.name for p in (tmp_path / "figures").iterdir()) == ["once.png"]


def test_control_images_written(run):
    run_dir, params = run
    manifest = runs.create_manifest(run_dir, params)
    control = pd.read_csv(run_dir / "control_manifest.csv")
    assert len(control) == params.n_members
    assert not set(control.sha256) & set(manifest.sha256)
    assert runs.load_control_images(run_dir, params).shape == (params.n_members, 1, 32, 32)


def test_control_overlap_detected(run):
    run_dir, params = run
    manifest = runs.create_manifest(run_dir, params)
    control = pd.read_csv(run_dir / "control_manifest.csv")
    control.iloc[0] = manifest[["image_id", "sha256"]].iloc[0]
    control.to_csv(run_dir / "control_manifest.csv", index=False)
    with pytest.raises(ValueError, match="1 control images are also members or non-members"):
        runs.load_control_images(run_dir, params)


def test_no_control_without_flag(tmp_path, npz_dataset):
    run_dir = tmp_path / "run"
    params = runs.start_run(run_dir, "smoke", {"dataset": str(npz_dataset), "train_control": False})
    runs.create_manifest(run_dir, params)
    assert not (run_dir / "control_manifest.csv").exists()
    with pytest.raises(FileNotFoundError, match="train_control=true"):
        runs.load_control_images(run_dir, params)
