"""Execute the notebook series with papermill into a new run directory.

``python -m fcre_utils run --preset quick --set epochs=200 --set 'timesteps=[50,100]'`` resolves
and checks the parameters before any notebook starts, executes ``notebooks/0*.ipynb`` in order
into the run directory, records each notebook's wall time, and prints the metrics table.

``python -m fcre_utils run --resume DIR`` continues a run that was interrupted or failed: it skips
the notebooks whose executed copy completed, moves the files an unfinished notebook left behind to
``DIR/interrupted/<notebook>-<n>/`` (nothing is deleted), and executes the rest. Notebook 01 then
continues training from the training state in ``DIR/training_state/``.
"""

from __future__ import annotations

import logging
import os
import time
import typing
from pathlib import Path
from typing import Any

import nbformat
import pandas as pd
import papermill
import yaml

from .data import DATA_DIR_VARIABLE
from .metrics import format_table
from .presets import Params, resolve_params
from .runs import atomic_write_text, new_run_dir, read_yaml
from .training import STATE_FOLDER

log = logging.getLogger(__name__)

NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"
KERNEL = "python3"
REQUEST_FILE = "run_request.yaml"  # preset, overrides and notebooks, read back by --resume
TIMES_FILE = "notebook_times.csv"
SNAPSHOT_FOLDER = ".runner"  # the files present before each notebook started
INTERRUPTED_FOLDER = "interrupted"


class RunFailed(RuntimeError):
    """A notebook raised an error; its executed copy in the run directory shows where."""


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """Turn ``["key=value", ...]`` into a dict, reading each value as YAML (typed).

    ``epochs=5`` gives an int, ``band_low=0.2`` a float, ``timesteps=[50,100]`` a list and
    ``dataset=pneumoniamnist`` a string. The text of a string-typed parameter is kept as written, so
    ``mixed_precision=no`` stays ``"no"`` rather than becoming YAML's false.
    """
    types = typing.get_type_hints(Params)
    overrides = {}
    for pair in pairs:
        key, separator, text = pair.partition("=")
        key = key.strip()
        if not separator or not key:
            raise ValueError(f"override {pair!r} must have the form key=value")
        overrides[key] = text.strip() if types.get(key) is str else yaml.safe_load(text)
    return overrides


def absolute_paths(overrides: dict[str, Any]) -> dict[str, Any]:
    """Make data paths absolute against the current folder, because notebooks run elsewhere.

    Applies to the ``dataset`` (when it is an npz path) and ``data_dir`` overrides, and to the
    ``FCRE_DATA_DIR`` environment variable that the notebook kernels inherit.
    """
    dataset = overrides.get("dataset")
    if isinstance(dataset, str) and dataset.endswith(".npz"):
        overrides["dataset"] = str(Path(dataset).expanduser().resolve())
    if isinstance(overrides.get("data_dir"), str) and overrides["data_dir"]:
        overrides["data_dir"] = str(Path(overrides["data_dir"]).expanduser().resolve())
    if os.environ.get(DATA_DIR_VARIABLE):
        os.environ[DATA_DIR_VARIABLE] = str(Path(os.environ[DATA_DIR_VARIABLE]).expanduser().resolve())
    return overrides


def list_notebooks(notebook_dir: str | os.PathLike = NOTEBOOK_DIR) -> list[Path]:
    """Return the numbered notebooks of the series, in order."""
    notebooks = sorted(Path(notebook_dir).glob("[0-9][0-9]_*.ipynb"))
    if not notebooks:
        raise FileNotFoundError(f"no numbered notebooks (NN_name.ipynb) in {str(notebook_dir)!r}")
    return notebooks


def prepare_run_dir(run_dir: str | os.PathLike | None, preset: str, root: str | os.PathLike = "outputs") -> Path:
    """Return a new empty run directory; an existing non-empty one raises FileExistsError."""
    if run_dir is None:
        return new_run_dir(root, prefix=preset)

    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise FileExistsError(f"--run-dir {str(run_dir)!r} is a file; give a new or empty directory")
    if run_dir.exists() and any(run_dir.iterdir()):
        raise FileExistsError(
            f"run directory {str(run_dir)!r} is not empty and is kept as it is; choose a new "
            "--run-dir, leave it out to get a fresh one under outputs/, or continue an interrupted "
            "run there with --resume"
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def run_series(
    preset: str,
    overrides: dict[str, Any] | None = None,
    run_dir: str | os.PathLike | None = None,
    notebook_dir: str | os.PathLike = NOTEBOOK_DIR,
    only: list[str] | None = None,
) -> Path:
    """Execute the notebooks in order into a new run directory and return its path.

    Args:
        preset: preset name (see :mod:`fcre_utils.presets`).
        overrides: parameter values on top of the preset, checked before anything runs.
        run_dir: where to write; a new ``outputs/<preset>-<time>`` when None.
        notebook_dir: folder of the numbered notebooks.
        only: notebook name prefixes to run (e.g. ``["01", "02"]``); all when None.

    Raises:
        KeyError, TypeError: unknown preset or parameter, or a value of the wrong type.
        RunFailed: a notebook raised an error, which its executed copy shows.
    """
    overrides = absolute_paths(dict(overrides or {}))
    resolve_params(preset, overrides)
    notebooks = select_notebooks(list_notebooks(notebook_dir), only)

    run_dir = prepare_run_dir(run_dir, preset).resolve()
    log.info("run directory: %s", run_dir)
    request = {"preset": preset, "overrides": overrides, "only": only}
    atomic_write_text(run_dir / REQUEST_FILE, yaml.safe_dump(request, sort_keys=False))

    _execute(run_dir, notebooks, {"run_dir": str(run_dir), "preset": preset, "overrides": overrides}, timings=[])
    return run_dir


def resume_series(run_dir: str | os.PathLike, notebook_dir: str | os.PathLike = NOTEBOOK_DIR) -> Path:
    """Continue an interrupted or failed run in ``run_dir`` with its recorded preset and parameters.

    Notebooks whose executed copy completed are skipped. An unfinished notebook's files are moved
    to ``run_dir/interrupted/<notebook>-<n>/`` before it runs again, except the training state,
    which notebook 01 resumes from.

    Raises:
        FileNotFoundError: ``run_dir`` has no ``run_request.yaml``, so it was not made by the runner.
        KeyError, TypeError, ValueError: the recorded parameters are no longer valid.
        RunFailed: a notebook raised an error, which its executed copy shows.
    """
    run_dir = Path(run_dir).resolve()
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory {str(run_dir)!r} not found or not a directory; give the folder of an earlier run")
    request_path = run_dir / REQUEST_FILE
    if not request_path.is_file():
        raise FileNotFoundError(
            f"{str(request_path)!r} not found, so {str(run_dir)!r} was not created by "
            "python -m fcre_utils run; --resume only continues such runs, start a new run instead"
        )
    request = read_yaml(request_path)
    preset, overrides = request["preset"], request["overrides"] or {}
    resolve_params(preset, overrides)
    notebooks = select_notebooks(list_notebooks(notebook_dir), request.get("only"), require_first=not request.get("base_run"))
    log.info("resuming run directory: %s", run_dir)

    timings = pd.read_csv(run_dir / TIMES_FILE).to_dict("records") if (run_dir / TIMES_FILE).is_file() else []
    values = {"run_dir": str(run_dir), "preset": preset, "overrides": overrides, "resume": True}
    pending = [notebook for notebook in notebooks if not notebook_completed(run_dir / notebook.name)]
    for notebook in notebooks:
        if notebook not in pending:
            log.info("skipping %s: its executed copy completed", notebook.name)
    for notebook in pending:
        set_aside_unfinished(run_dir, notebook.stem)
    _execute(run_dir, pending, values, timings)
    return run_dir


def select_notebooks(notebooks: list[Path], only: list[str] | None, require_first: bool = True) -> list[Path]:
    """Return the notebooks named by ``only`` (number prefixes such as "01"), or all when None.

    ``require_first=False`` allows a selection without 01, for a run directory that starts from
    another run's files (see :mod:`fcre_utils.reuse`).
    """
    if not only:
        return notebooks
    requested = {f"{int(number):02d}" if number.strip().isdigit() else number.strip() for number in only}
    known = {nb.name[:2] for nb in notebooks}
    if not requested <= known:
        raise ValueError(f"--only {','.join(only)} names no notebook; choose from {', '.join(sorted(known))}")
    if require_first and "01" not in requested:
        raise ValueError("--only must include 01, because a new run directory needs notebook 01 to create its run")
    return [nb for nb in notebooks if nb.name[:2] in requested]


def _execute(run_dir: Path, notebooks: list[Path], values: dict[str, Any], timings: list[dict[str, Any]]) -> None:
    """Execute ``notebooks`` in order into ``run_dir``, then write the summary."""
    values = {"interactive": False, **values}  # headless: widgets fall back to static figures
    for notebook in notebooks:
        declared = papermill.inspect_notebook(str(notebook))
        parameters = {name: value for name, value in values.items() if name in declared}
        output = run_dir / notebook.name
        _write_snapshot(run_dir, notebook.stem)

        log.info("executing %s", notebook.name)
        start = time.perf_counter()
        try:
            papermill.execute_notebook(
                str(notebook), str(output), parameters=parameters, kernel_name=KERNEL,
                cwd=str(notebook.parent), progress_bar=False,
            )
        except papermill.PapermillExecutionError as error:
            raise RunFailed(
                f"{notebook.name} failed ({error.ename}: {error.evalue}); see {output}. If the cause "
                f"lies in the data or the code, fix it and continue with python -m fcre_utils run --resume {run_dir}; "
                "if a parameter was wrong, start a new run, because --resume keeps the recorded parameters"
            ) from error
        finally:
            timings.append({"notebook": notebook.name, "seconds": round(time.perf_counter() - start, 1)})
            _write_timings(run_dir, timings)

    write_summary(run_dir)


def _write_timings(run_dir: Path, timings: list[dict[str, Any]]) -> None:
    atomic_write_text(run_dir / TIMES_FILE, pd.DataFrame(timings).to_csv(index=False), overwrite=True)


def notebook_completed(executed: Path) -> bool:
    """Return True if papermill finished executing ``executed`` without an error."""
    if not executed.is_file():
        return False
    metadata = nbformat.read(executed, as_version=4).metadata.get("papermill", {})
    return bool(metadata.get("end_time")) and not metadata.get("exception")


def _run_files(run_dir: Path) -> set[str]:
    """Return the run's files as relative paths, leaving out those the runner itself manages."""
    skipped = {REQUEST_FILE, TIMES_FILE, SNAPSHOT_FOLDER, INTERRUPTED_FOLDER, STATE_FOLDER}
    files = set()
    for path in run_dir.rglob("*"):
        relative = path.relative_to(run_dir)
        if relative.parts[0] not in skipped and not path.is_dir():
            files.add(relative.as_posix())
    return files


def _write_snapshot(run_dir: Path, stem: str) -> None:
    listing = "\n".join(sorted(_run_files(run_dir)))
    atomic_write_text(run_dir / SNAPSHOT_FOLDER / f"{stem}.txt", listing, overwrite=True)


def set_aside_unfinished(run_dir: Path, stem: str) -> Path | None:
    """Move the files an unfinished run of notebook ``stem`` wrote to ``interrupted/<stem>-<n>/``.

    Those are the files absent from the snapshot taken before the notebook started. Returns the
    folder they went to, or None when there was nothing to move.
    """
    snapshot = run_dir / SNAPSHOT_FOLDER / f"{stem}.txt"
    if not snapshot.is_file():
        return None
    before = set(snapshot.read_text().splitlines())
    leftovers = sorted(_run_files(run_dir) - before)
    if not leftovers:
        return None

    attempt = 1
    while (run_dir / INTERRUPTED_FOLDER / f"{stem}-{attempt}").exists():
        attempt += 1
    target = run_dir / INTERRUPTED_FOLDER / f"{stem}-{attempt}"
    for relative in leftovers:
        (target / relative).parent.mkdir(parents=True, exist_ok=True)
        os.replace(run_dir / relative, target / relative)
    _remove_empty_folders(run_dir)
    log.info("moved %d files of the unfinished %s to %s", len(leftovers), stem, target)
    return target


def _remove_empty_folders(run_dir: Path) -> None:
    folders = sorted((p for p in run_dir.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True)
    for folder in folders:
        if not any(folder.iterdir()):
            folder.rmdir()


def metrics_summary(run_dir: str | os.PathLike) -> str:
    """Format the run's metrics table as text, or a note when the series stopped before notebook 04."""
    path = Path(run_dir) / "metrics.csv"
    if not path.is_file():
        return f"no metrics.csv in {run_dir}"
    columns = ["attack", "NFE", "AUC", "ASR", "TPR@1%FPR", "TPR@0.1%FPR"]
    return format_table(pd.read_csv(path))[columns].to_string(index=False)


SUMMARY_FIGURES = ("04_roc", "03_error_by_ring", "04_score_histograms", "01_samples")


def write_summary(run_dir: str | os.PathLike) -> Path:
    """Write ``summary.md``: the attack tables of the model and the control model, wall times and figures."""
    run_dir = Path(run_dir)
    params = yaml.safe_load((run_dir / "params.yaml").read_text()) if (run_dir / "params.yaml").is_file() else {}
    lines = [f"# Run {run_dir.name}", "", f"Preset: `{params.get('preset', 'unknown')}`.", ""]

    for prefix, title in (("", "Attacks on the trained model"), ("control_", "Attacks on the control model (never saw the members)")):
        path = run_dir / f"{prefix}metrics.csv"
        if path.is_file():
            table = format_table(pd.read_csv(path))
            lines += [f"## {title}", "", "Evaluation split; thresholds and settings chosen on the calibration split; "
                      "95% bootstrap intervals in brackets.", "", table.to_markdown(index=False), ""]
        elif prefix == "control_" and params.get("train_control") is False:
            lines += [f"## {title}", "", "Skipped: the run set train_control=false, so no control model was trained.", ""]
    if (run_dir / "notebook_times.csv").is_file():
        times = pd.read_csv(run_dir / "notebook_times.csv")
        total = times.seconds.sum()
        lines += ["## Wall time", "", times.to_markdown(index=False, floatfmt=".1f"), "", f"Total: {total / 60:.1f} min.", ""]

    figures = [name for name in SUMMARY_FIGURES if (run_dir / "figures" / f"{name}.png").is_file()]
    if figures:
        lines += ["## Figures", ""] + [f"![{name}](figures/{name}.png)" for name in figures] + [""]
    return atomic_write_text(run_dir / "summary.md", "\n".join(lines), overwrite=True)
