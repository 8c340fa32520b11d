"""Sweeps: grid files resolve into typed points, bad grids fail before anything runs, and real
smoke sweeps (one training the model per point, one reusing a trained run) write one table."""

import ast
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pandas as pd
import pytest
import yaml

from fcre_utils.__main__ import main
from fcre_utils.presets import Params
from fcre_utils.reuse import (
    CONSUMED_PARAMETERS, BaseRun, base_values, check_overrides, files_before_start, open_base_run, reused_files,
)
from fcre_utils.runner import list_notebooks, resume_series, select_notebooks
from fcre_utils.sweeps import parse_grid, run_sweep, validate


def write_grid(folder, content):
    path = Path(folder) / "grid.yaml"
    path.write_text(content if isinstance(content, str) else yaml.safe_dump(content, sort_keys=False))
    return path


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "fcre_utils", "sweep", *args], capture_output=True, text=True, timeout=1200)


def same_types(value, expected):
    """Return True if ``value`` equals ``expected`` with the same type at every level of nesting."""
    if type(value) is not type(expected):
        return False
    if isinstance(expected, list):
        return len(value) == len(expected) and all(same_types(v, e) for v, e in zip(value, expected))
    return value == expected


# Grid parsing


def test_product_points_in_order():
    sweep = parse_grid({"preset": "smoke", "grid": {"fcre_t": [20, 40], "band_candidates": [[[0.15, 0.85]], [[0.05, 0.5]], [[0.0, 1.5]]]}})
    assert sweep.keys == ["fcre_t", "band_candidates"]
    assert len(sweep.points) == 6
    assert sweep.points[0] == {"fcre_t": 20, "band_candidates": [[0.15, 0.85]]}
    assert sweep.points[1] == {"fcre_t": 20, "band_candidates": [[0.05, 0.5]]}
    assert sweep.points[5] == {"fcre_t": 40, "band_candidates": [[0.0, 1.5]]}


def test_explicit_points_keep_key_order():
    sweep = parse_grid({"preset": "smoke", "fixed": {"seed": 3}, "points": [{"fcre_t": 20}, {"band_low": 0.1, "fcre_t": 40}]})
    assert sweep.keys == ["fcre_t", "band_low"]
    assert sweep.overrides(1) == {"seed": 3, "band_low": 0.1, "fcre_t": 40}


def test_yaml_types_kept(tmp_path):
    path = write_grid(tmp_path, """
preset: smoke
fixed: {mixed_precision: "no", learning_rate: 1.0e-3}
grid:
  fcre_t: [20, 40]
  band_low: [0, 0.25]
  band_candidates: [[[0.15, 0.85], [0, 1.5]]]
  attention: [true]
""")
    sweep = parse_grid(path)
    first = sweep.overrides(0)
    assert same_types(first["fcre_t"], 20)
    assert same_types(first["band_low"], 0)
    assert same_types(sweep.points[1]["band_low"], 0.25)
    assert same_types(first["band_candidates"], [[0.15, 0.85], [0, 1.5]])
    assert same_types(first["attention"], True)
    assert same_types(first["mixed_precision"], "no")
    assert same_types(first["learning_rate"], 0.001)


def test_notebook_numbers_normalised():
    sweep = parse_grid({"preset": "smoke", "notebooks": [1, "02", "4"], "points": [{}]})
    assert sweep.notebooks == ["01", "02", "04"]


def test_select_without_01_allowed():
    notebooks = list_notebooks()
    assert [nb.name[:2] for nb in select_notebooks(notebooks, ["04"], require_first=False)] == ["04"]
    with pytest.raises(ValueError, match="must include 01"):
        select_notebooks(notebooks, ["04"])


@pytest.mark.parametrize("grid", [
    {"preset": "smoke", "grid": {"epoch": [1, 2]}},
    {"preset": "smoke", "fixed": {"epoch": 1}, "grid": {"fcre_t": [20]}},
    {"preset": "smoke", "points": [{"fcre_t": 20}, {"epoch": 2}]},
])
def test_unknown_parameter_named(grid):
    with pytest.raises(KeyError, match=r"unknown parameters \['epoch'\]"):
        parse_grid(grid)


@pytest.mark.parametrize("grid, error, message", [
    ({"preset": "smoke", "grids": {"fcre_t": [20]}}, ValueError, r"grid file keys \['grids'\] are unknown"),
    ({"preset": "smoke"}, ValueError, "exactly one of grid"),
    ({"preset": "smoke", "grid": {"fcre_t": [20]}, "points": [{}]}, ValueError, "exactly one of grid"),
    ({"preset": "smoke", "grid": {}}, ValueError, "grid is empty"),
    ({"preset": "smoke", "grid": {"fcre_t": []}}, ValueError, "grid value of fcre_t is an empty list"),
    ({"preset": "smoke", "points": []}, ValueError, "points must be a non-empty list"),
    ({"preset": "smoke", "points": [{"fcre_t": 20}, 40]}, TypeError, "point 1 must be a mapping"),
    ({"preset": "smoke", "grid": {"fcre_t": 20}}, TypeError, r"write \[20\], or move fcre_t to fixed"),
    ({"preset": "smoke", "fixed": {"fcre_t": 20}, "grid": {"fcre_t": [40]}}, ValueError, "fixed and the varying values both set fcre_t"),
    ({"grid": {"fcre_t": [20]}}, ValueError, "names no preset"),
    ({"preset": "smoke", "points": [{"fcre_t": 20}, {"fcre_t": 20}]}, ValueError, "points 0 and 1 are the same"),
    ({"preset": "smoke", "notebooks": [], "points": [{}]}, ValueError, "notebooks must be a non-empty list"),
])
def test_bad_grid_rejected(grid, error, message):
    with pytest.raises(error, match=message):
        parse_grid(grid)


def test_missing_grid_file_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="grid.yaml' not found"):
        parse_grid(tmp_path / "grid.yaml")


def test_bad_points_listed_together():
    sweep = parse_grid({"preset": "smoke", "points": [{"epochs": 2}, {"epochs": "many"}, {"epochs": 3}, {"n_members": 0}]})
    with pytest.raises(ValueError) as raised:
        validate(sweep)
    message = str(raised.value)
    assert "2 of 4 points are invalid" in message
    assert "point 1 (epochs=\"many\"): parameter 'epochs' must be of type int" in message
    assert "point 3 (n_members=0): invalid parameters: n_members=0 must be at least 1" in message
    assert "point 0" not in message
    assert "point 2" not in message


def test_unquoted_no_explained(tmp_path):
    sweep = parse_grid(write_grid(tmp_path, "preset: smoke\ngrid:\n  mixed_precision: [no, fp16]\n"))
    with pytest.raises(ValueError, match="quote the value of mixed_precision"):
        validate(sweep)


def test_notebooks_without_01_rejected():
    sweep = parse_grid({"preset": "smoke", "notebooks": ["04"], "grid": {"fcre_t": [20]}})
    with pytest.raises(ValueError, match=r"notebooks \['04'\] must include 01"):
        validate(sweep)


def test_unknown_notebook_named():
    sweep = parse_grid({"preset": "smoke", "notebooks": ["01", "09"], "grid": {"fcre_t": [20]}})
    with pytest.raises(ValueError, match=r"notebooks \['09'\] name no notebook"):
        validate(sweep)


def test_consumed_parameters_by_section():
    assert {"dataset", "seed", "block_out_channels", "epochs", "sample_steps"} <= set(CONSUMED_PARAMETERS["01"])
    assert not {"timesteps", "band_low", "band_candidates", "fcre_t", "select_on_calibration", "train_control"} & set(CONSUMED_PARAMETERS["01"])
    assert set(CONSUMED_PARAMETERS["01"]) | set(CONSUMED_PARAMETERS["02"]) <= set(Params.__dataclass_fields__)


def test_consumed_keys_named(tmp_path):
    reused = list_notebooks()[:2]
    base = BaseRun(path=tmp_path, preset="smoke", values={}, reused=reused, files=[])
    with pytest.raises(ValueError) as raised:
        check_overrides(base, ["fcre_t", "epochs", "ddim_stride"])
    message = str(raised.value)
    assert "epochs (read by 01_train_ddpm.ipynb), ddim_stride (read by 02_reconstruction.ipynb) cannot change" in message
    assert "fcre_t" not in message
    check_overrides(base, ["fcre_t", "band_low"])


def test_existing_out_kept(tmp_path, npz_dataset):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="is not an empty folder"):
        run_sweep({"preset": "smoke", "fixed": {"dataset": str(npz_dataset)}, "grid": {"fcre_t": [20]}}, out)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    assert (out / "notes.txt").read_text() == "keep me"


def test_cli_invalid_point_exits_2(tmp_path, capsys):
    grid = write_grid(tmp_path, {"preset": "smoke", "grid": {"epochs": [2, -1]}})
    assert main(["sweep", str(grid), "--out", str(tmp_path / "out")]) == 2
    assert "point 1 (epochs=-1): invalid parameters: epochs=-1 must be at least 1" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("arguments, message", [
    (["grid.yaml", "--resume", "out"], "cannot be combined with a grid file or --out"),
    ([], "give a grid file"),
    (["--resume", "nowhere"], "contains no sweep"),
])
def test_cli_bad_arguments(tmp_path, monkeypatch, capsys, arguments, message):
    monkeypatch.chdir(tmp_path)
    assert main(["sweep", *arguments]) == 2
    assert message in capsys.readouterr().err


# Real sweeps on the smoke preset


POINTS = [
    {"fcre_t": 20, "band_low": 0.1, "band_candidates": [[0.1, 0.85]]},
    {"fcre_t": 40, "band_low": 0, "band_candidates": [[0.0, 1.5], [0.05, 0.5]], "mixed_precision": "no"},
    {"fcre_t": 20, "n_members": 5000},  # more images than the npz holds: notebook 01 fails
]


@pytest.fixture(scope="module")
def sweep_run(npz_dataset, tmp_path_factory):
    folder = tmp_path_factory.mktemp("sweep")
    fixed = {"dataset": str(npz_dataset), "train_control": False, "select_on_calibration": False}
    grid = write_grid(folder, {"preset": "smoke", "notebooks": ["01", "02", "04"], "fixed": fixed, "points": POINTS})
    out = folder / "out"
    result = run_cli(str(grid), "--out", str(out))
    return out, fixed, result


@pytest.mark.slow
def test_failed_point_named(sweep_run):
    _, _, result = sweep_run
    assert result.returncode == 1, result.stderr[-3000:]
    assert "1 of 3 points failed: point-002" in result.stderr
    assert "sweep --resume" in result.stderr


@pytest.mark.slow
def test_results_table(sweep_run):
    out, _, _ = sweep_run
    results = pd.read_csv(out / "results.csv")
    metrics = pd.read_csv(out / "point-000" / "metrics.csv")
    keys = ["fcre_t", "band_low", "band_candidates", "mixed_precision", "n_members"]
    metric_columns = [f"metrics_{name}" if name == "n_members" else name for name in metrics.columns]
    assert list(results.columns) == ["point", "run_dir", *keys, *metric_columns, "status", "error"]
    assert len(results) == 2 * len(metrics) + 1

    first = results[results.point == "point-000"]
    assert (first.status == "completed").all()
    assert first.auc.tolist() == metrics.auc.tolist()
    assert set(first.band_candidates) == {"[[0.1,0.85]]"}
    assert set(first.mixed_precision) == {"no"}  # left out by the point: the value it ran with
    assert set(first.n_members) == {24}
    assert first.metrics_n_members.tolist() == metrics.n_members.tolist()
    assert json.loads(results[results.point == "point-001"].band_candidates.iloc[0]) == [[0.0, 1.5], [0.05, 0.5]]
    assert (first.run_dir == str(out / "point-000")).all()

    failed = results[results.point == "point-002"]
    assert len(failed) == 1
    assert failed.status.iloc[0] == "failed"
    assert "exceeds the 80 available images" in failed.error.iloc[0]
    assert failed.auc.isna().all()


@pytest.mark.slow
def test_fixed_t_reaches_attacks(sweep_run):
    out, _, _ = sweep_run
    for name, point in (("point-000", POINTS[0]), ("point-001", POINTS[1])):
        metrics = pd.read_csv(out / name / "metrics.csv")
        fcre = metrics[metrics.attack.str.startswith("fcre_") & metrics.attack.str.endswith("_x0")]
        assert fcre.setting.str.startswith(f"t={point['fcre_t']} ").all(), fcre.setting.tolist()


@pytest.mark.slow
def test_point_values_keep_types(sweep_run):
    out, fixed, _ = sweep_run
    declared = Params.__annotations__
    for name, point in (("point-000", POINTS[0]), ("point-001", POINTS[1])):
        notebook = nbformat.read(out / name / "01_train_ddpm.ipynb", as_version=4)
        injected = next(c.source for c in notebook.cells if "injected-parameters" in c.metadata.get("tags", []))
        line = next(line for line in injected.splitlines() if line.startswith("overrides = "))
        overrides = ast.literal_eval(line.removeprefix("overrides = "))
        assert same_types(overrides, {**fixed, **point})

        params = yaml.safe_load((out / name / "params.yaml").read_text())
        for key, value in point.items():
            assert params[key] == value, key
            assert type(params[key]).__name__ == declared[key].split("[")[0], key
        assert all(isinstance(band, list) and all(isinstance(edge, float) for edge in band) for band in params["band_candidates"])


@pytest.mark.slow
def test_sweep_record(sweep_run):
    out, fixed, _ = sweep_run
    record = yaml.safe_load((out / "sweep.yaml").read_text())
    assert record["grid"]["points"] == POINTS
    assert record["points"] == POINTS
    assert record["fixed"] == fixed
    assert record["grid_file"].endswith("grid.yaml")


@pytest.mark.slow
def test_resume_skips_completed(sweep_run):
    out, _, _ = sweep_run
    completed = out / "point-000" / "04_attack.ipynb"
    before = completed.stat().st_mtime_ns

    result = run_cli("--resume", str(out))
    assert result.returncode == 1, result.stderr[-3000:]
    assert "point-000 of 3 (fcre_t=20, band_low=0.1, band_candidates=[[0.1,0.85]]): skipped" in result.stderr
    assert "point-002" in result.stderr
    assert completed.stat().st_mtime_ns == before
    assert (out / "point-002" / "interrupted" / "01_train_ddpm-1" / "01_train_ddpm.ipynb").is_file()
    assert len(pd.read_csv(out / "results.csv")) == len(pd.read_csv(out / "point-000" / "metrics.csv")) * 2 + 1


def listing(folder):
    """Every file below ``folder`` with its size, modification time and inode."""
    return {p.relative_to(folder).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns, p.stat().st_ino)
            for p in folder.rglob("*") if p.is_file()}


@pytest.mark.slow
def test_snapshot_and_times_agree(sweep_run):
    out, _, _ = sweep_run
    base = out / "point-000"
    notebooks = list_notebooks()
    for reused, following in ((notebooks[:1], "02_reconstruction.ipynb"), (notebooks[:3], "04_attack.ipynb")):
        by_snapshot = reused_files(base, reused, notebooks)
        assert by_snapshot == files_before_start(base, base / following)
        assert "model/unet/diffusion_pytorch_model.safetensors" in by_snapshot
    assert "reconstructions.pt" in reused_files(base, notebooks[:3], notebooks)
    assert "metrics.csv" not in reused_files(base, notebooks[:3], notebooks)


@pytest.mark.slow
def test_base_run_sweep(sweep_run, tmp_path):
    out, _, _ = sweep_run
    base = out / "point-000"
    before = listing(base)
    grid = write_grid(tmp_path, {"base_run": str(base), "notebooks": ["04"], "grid": {"fcre_t": [20, 40]}})

    result = run_cli(str(grid), "--out", str(tmp_path / "reused"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert listing(base) == before

    results = pd.read_csv(tmp_path / "reused" / "results.csv")
    assert (results.status == "completed").all()
    assert results.point.unique().tolist() == ["point-000", "point-001"]
    for index, t in enumerate([20, 40]):
        point = tmp_path / "reused" / f"point-{index:03d}"
        weights = "model/unet/diffusion_pytorch_model.safetensors"
        assert os.stat(point / weights).st_ino == os.stat(base / weights).st_ino
        assert os.stat(point / "reconstructions.pt").st_ino == os.stat(base / "reconstructions.pt").st_ino
        assert os.stat(point / "04_attack.ipynb").st_ino != os.stat(base / "04_attack.ipynb").st_ino
        assert pd.read_csv(point / "notebook_times.csv").notebook.tolist() == ["04_attack.ipynb"]

        params = yaml.safe_load((point / "params.yaml").read_text())
        base_params = yaml.safe_load((base / "params.yaml").read_text())
        assert params == {**base_params, "fcre_t": t}
        request = yaml.safe_load((point / "run_request.yaml").read_text())
        assert request["base_run"] == str(base)
        assert request["only"] == ["04"]
        fcre = results[(results.point == point.name) & (results.attack == "fcre_l2_x0")]
        assert fcre.setting.iloc[0].startswith(f"t={t} ")

    # run --resume accepts a run without notebook 01 when it records a base run; nothing is left to run
    resume_series(tmp_path / "reused" / "point-000")
    assert pd.read_csv(tmp_path / "reused" / "point-000" / "notebook_times.csv").notebook.tolist() == ["04_attack.ipynb"]


@pytest.mark.slow
def test_base_run_conflict_named(sweep_run, tmp_path, capsys):
    out, _, _ = sweep_run
    grid = write_grid(tmp_path, {"base_run": str(out / "point-000"), "notebooks": ["04"], "grid": {"epochs": [1, 2], "timesteps": [[20]]}})
    assert main(["sweep", str(grid), "--out", str(tmp_path / "reused")]) == 2
    error = capsys.readouterr().err
    assert "epochs (read by 01_train_ddpm.ipynb), timesteps (read by 02_reconstruction.ipynb) cannot change" in error
    assert not (tmp_path / "reused").exists()


@pytest.mark.slow
def test_control_switched_on_rejected(sweep_run):
    out, _, _ = sweep_run
    notebooks = list_notebooks()
    base = open_base_run(out / "point-000", notebooks, notebooks[3:])
    with pytest.raises(ValueError, match="train_control=true needs a control model"):
        base_values(base, {"train_control": True})
    assert base_values(base, {"train_control": False, "fcre_t": 40})["fcre_t"] == 40


@pytest.mark.slow
def test_control_cache_linked_with_02(sweep_run, tmp_path):
    out, _, _ = sweep_run
    base = tmp_path / "base"
    shutil.copytree(out / "point-000", base)  # copy2 keeps the snapshots and modification times
    (base / "control_reconstructions.pt").write_bytes(b"stands in for notebook 04's cache")
    notebooks = list_notebooks()
    assert "control_reconstructions.pt" in open_base_run(base, notebooks, notebooks[3:]).files
    assert "control_reconstructions.pt" not in open_base_run(base, notebooks, notebooks[1:]).files
