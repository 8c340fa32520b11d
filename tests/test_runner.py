"""The runner executes the real notebooks with papermill under the smoke preset."""

import subprocess
import sys

import nbformat
import pandas as pd
import pytest
import yaml

from fcre_utils.runner import parse_overrides

pytestmark = pytest.mark.slow

ATTACKS = {"naive_loss", "naive_loss_lowpass", "secmi_stat", "secmi_stat_lowpass", "pia", "pia_lowpass", "pian", "sima"} | {
    f"fcre_{metric}_{protocol}" for metric in ("ssim", "l2", "l2_ssim") for protocol in ("x0", "residual")}
METRIC_COLUMNS = ["attack", "auc", "asr", "tpr_at_1pct_fpr", "tpr_at_0_1pct_fpr", "n_members", "n_nonmembers", "nfe"]
CALIBRATED = {"fcre_l2_calibrated", "fcre_ssim_calibrated"}  # the control model serves as their reference


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "fcre_utils", "run", *args], capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def smoke_run(npz_dataset, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("runs") / "smoke"
    result = run_cli("--preset", "smoke", "--set", f"dataset={npz_dataset}", "--run-dir", str(run_dir))
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir, result


def test_run_directory_contents(smoke_run):
    run_dir, _ = smoke_run
    for name in ["params.yaml", "environment.yaml", "manifest.csv", "training_log.csv", "reconstructions.pt",
                 "selection.csv", "scores.csv", "metrics.csv", "metrics.md", "notebook_times.csv", "model/unet/config.json",
                 "control_manifest.csv", "control_model/unet/config.json", "control_metrics.csv", "control_scores.csv",
                 "01_train_ddpm.ipynb", "02_reconstruction.ipynb", "03_frequency_analysis.ipynb", "04_attack.ipynb",
                 "05_ablations.ipynb", "06_audit.ipynb", "control_reconstructions.pt", "frequency_rings.csv",
                 "difficulty_correlations.csv", "ablation_band_edges.csv", "ablation_member_count.csv", "audit/report.md",
                 "checkpoints/model/epoch-00002/unet/config.json"]:
        assert (run_dir / name).exists(), name


def test_figures_written(smoke_run):
    run_dir, _ = smoke_run
    figures = {p.stem for p in (run_dir / "figures").glob("*.png")}
    assert {"01_loss_curve", "01_control_loss_curve", "01_samples", "02_reconstruction_members", "03_spectra",
            "03_error_by_ring", "03_auc_by_band", "03_band_comparison", "03_difficulty", "03_band_explorer", "04_roc",
            "04_score_histograms", "05_band_edges", "05_timestep", "05_ddim_steps", "05_metric", "05_training_length",
            "05_member_count"} <= figures


def test_metrics_table(smoke_run):
    run_dir, result = smoke_run
    metrics = pd.read_csv(run_dir / "metrics.csv")
    assert set(METRIC_COLUMNS) <= set(metrics.columns)
    assert set(metrics.attack) == ATTACKS | CALIBRATED
    assert metrics.auc.between(0, 1).all()
    assert (metrics.auc_low <= metrics.auc_high).all()
    assert (metrics.n_members == 12).all()
    assert "fcre_ssim_x0" in result.stdout


def test_control_table(smoke_run):
    run_dir, _ = smoke_run
    control = pd.read_csv(run_dir / "control_metrics.csv")
    assert set(control.attack) == ATTACKS
    summary = (run_dir / "summary.md").read_text()
    assert "Attacks on the control model" in summary


def test_scores_table(smoke_run):
    run_dir, _ = smoke_run
    scores = pd.read_csv(run_dir / "scores.csv")
    manifest = pd.read_csv(run_dir / "manifest.csv")
    assert list(scores.columns) == ["image_id", "member", "split", "attack", "setting", "nfe", "score"]
    assert len(scores) == len(ATTACKS | CALIBRATED) * len(manifest)
    assert scores.groupby("attack").image_id.apply(set).map(lambda ids: ids == set(manifest.image_id)).all()


def test_params_recorded(smoke_run, npz_dataset):
    run_dir, _ = smoke_run
    params = yaml.safe_load((run_dir / "params.yaml").read_text())
    assert params["preset"] == "smoke"
    assert params["dataset"] == str(npz_dataset)
    environment = yaml.safe_load((run_dir / "environment.yaml").read_text())
    assert environment["packages"]["torch"].startswith("2.13.0")
    assert environment["seed"] == 0


def test_parameters_injected(smoke_run):
    run_dir, _ = smoke_run
    notebook = nbformat.read(run_dir / "01_train_ddpm.ipynb", as_version=4)
    injected = [c for c in notebook.cells if "injected-parameters" in c.metadata.get("tags", [])]
    assert len(injected) == 1
    assert "smoke" in injected[0].source


def test_existing_run_dir_rejected(smoke_run):
    run_dir, _ = smoke_run
    before = sorted(p.name for p in run_dir.iterdir())
    result = run_cli("--preset", "smoke", "--run-dir", str(run_dir))
    assert result.returncode == 2
    assert "is not empty" in result.stderr
    assert sorted(p.name for p in run_dir.iterdir()) == before


def test_unknown_parameter_rejected_early(tmp_path):
    result = run_cli("--preset", "smoke", "--set", "epoch=3", "--run-dir", str(tmp_path / "run"))
    assert result.returncode == 2
    assert "unknown parameter 'epoch'" in result.stderr
    assert not (tmp_path / "run").exists()


def test_failed_notebook_kept(tmp_path, npz_dataset):
    run_dir = tmp_path / "run"
    result = run_cli("--preset", "smoke", "--set", f"dataset={npz_dataset}", "--set", "n_members=5000", "--run-dir", str(run_dir), "--only", "01")
    assert result.returncode == 1
    assert "01_train_ddpm.ipynb failed" in result.stderr
    executed = (run_dir / "01_train_ddpm.ipynb").read_text()
    assert "exceeds the 80 available images" in executed


def test_overrides_typed():
    overrides = parse_overrides(["epochs=5", "band_low=0.2", "timesteps=[50, 100]", "dataset=pneumoniamnist", "attention=false"])
    assert overrides == {"epochs": 5, "band_low": 0.2, "timesteps": [50, 100], "dataset": "pneumoniamnist", "attention": False}


def test_override_without_value_rejected():
    with pytest.raises(ValueError, match="key=value"):
        parse_overrides(["epochs"])


def test_overrides_keep_string_text():
    overrides = parse_overrides(["mixed_precision=no", "learning_rate=1e-3"])
    assert overrides["mixed_precision"] == "no"
    from fcre_utils.presets import resolve_params
    params = resolve_params("smoke", overrides)
    assert params.learning_rate == 0.001
    assert params.mixed_precision == "no"


def test_relative_paths_made_absolute(tmp_path, monkeypatch):
    from fcre_utils.runner import absolute_paths
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FCRE_DATA_DIR", "data")
    overrides = absolute_paths({"dataset": "images.npz", "data_dir": "folder"})
    assert overrides["dataset"] == str(tmp_path / "images.npz")
    assert overrides["data_dir"] == str(tmp_path / "folder")
    assert __import__("os").environ["FCRE_DATA_DIR"] == str(tmp_path / "data")


def test_run_dir_file_rejected(tmp_path):
    target = tmp_path / "notes.txt"
    target.write_text("keep me")
    result = run_cli("--preset", "smoke", "--run-dir", str(target))
    assert result.returncode == 2
    assert "is a file" in result.stderr
    assert target.read_text() == "keep me"


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--preset", "huge"], "unknown preset 'huge'"),
        (["--preset", "smoke", "--set", "epochs=many"], "parameter 'epochs' must be of type int"),
        (["--preset", "smoke", "--only", "1,9"], "names no notebook"),
        (["--preset", "smoke", "--only", "02"], "must include 01"),
    ],
)
def test_bad_arguments_rejected(tmp_path, arguments, message):
    result = run_cli(*arguments, "--run-dir", str(tmp_path / "run"))
    assert result.returncode == 2
    assert message in result.stderr
    assert not (tmp_path / "run").exists()


def test_resume_missing_directory_named(tmp_path):
    from fcre_utils.runner import resume_series
    with pytest.raises(FileNotFoundError, match="not found or not a directory"):
        resume_series(tmp_path / "nowhere")
