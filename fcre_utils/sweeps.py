"""Parameter sweeps: execute the notebook series once per point of a grid, then collect one table.

``python -m fcre_utils sweep GRID.yaml [--out DIR]`` reads a grid file such as::

    preset: smoke
    notebooks: ["01", "02", "04"]     # optional; default: the whole series
    fixed: {train_control: false}     # overrides shared by every point
    grid:                             # Cartesian product, the last key varying fastest
      epochs: [1, 3]
      band_candidates: [[[0.15, 0.85]], [[0.0, 1.5]]]

or ``points: [{...}, {...}]`` (an explicit list of overrides) in place of ``grid``. With
``base_run: outputs/<run>``, the points reuse that run's model and reconstructions and execute
only the notebooks listed (see :mod:`fcre_utils.reuse`).

Every value keeps the type YAML gives it on its way into the notebooks' parameters. Every point is
checked with :func:`fcre_utils.presets.resolve_params` before anything runs. The output folder
contains one run directory per point (``point-000``, ...), ``sweep.yaml`` (the grid as given and
the resolved points) and ``results.csv``. The table has one row per point and attack, with a
``status`` and an ``error`` column. A failing point is recorded and the others still run.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import logging
import os
import time
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from .presets import Params, resolve_params
from .reuse import BaseRun, base_values, check_overrides, open_base_run, run_from_base
from .runner import (
    INTERRUPTED_FOLDER, NOTEBOOK_DIR, REQUEST_FILE, absolute_paths, list_notebooks, notebook_completed, resume_series, run_series,
    select_notebooks,
)
from .runs import atomic_write_text, new_run_dir, read_yaml

log = logging.getLogger(__name__)

SWEEP_FILE = "sweep.yaml"
RESULTS_FILE = "results.csv"
GRID_FILE_KEYS = ("preset", "notebooks", "fixed", "grid", "points", "base_run")


@dataclass
class Sweep:
    """A grid file resolved into its points; ``sweep.yaml`` records it for ``--resume``."""

    preset: str | None  # None with a base run: the base run's preset
    notebooks: list[str] | None  # notebook numbers such as "04"; None: the whole series
    fixed: dict[str, Any]  # overrides shared by every point
    keys: list[str]  # the parameters that vary between points, in order
    points: list[dict[str, Any]]  # per point, its values of ``keys`` (an explicit point may leave some out)
    base_run: str | None = None  # absolute path of the run whose first notebooks are reused
    grid: dict[str, Any] = field(default_factory=dict)  # the grid file as given

    def overrides(self, index: int) -> dict[str, Any]:
        """Return the overrides of point ``index``: the fixed values, then the point's own."""
        return {**self.fixed, **self.points[index]}


def point_name(index: int) -> str:
    """Return the run directory name of point ``index``, e.g. ``point-007``."""
    return f"point-{index:03d}"


def compact_json(value: Any) -> str:
    """Return ``value`` as JSON without spaces, e.g. ``[[0.15,0.85]]``."""
    return json.dumps(value, separators=(",", ":"))


def describe(values: dict[str, Any]) -> str:
    """Return ``key=value`` pairs for messages and logs, lists as compact JSON."""
    return ", ".join(f"{key}={compact_json(value)}" for key, value in values.items()) or "no overrides"


def read_grid(grid: str | os.PathLike | dict[str, Any]) -> dict[str, Any]:
    """Return the grid file's content, or a copy of ``grid`` when it is a dict already."""
    if isinstance(grid, dict):
        try:
            return json.loads(json.dumps(grid))  # tuples become lists, which YAML can record
        except TypeError as error:
            raise TypeError(f"grid values must be plain numbers, strings, booleans and lists ({error}); convert them, e.g. with int()") from error
    path = Path(grid)
    if not path.is_file():
        raise FileNotFoundError(f"grid file {str(path)!r} not found; give a YAML file as described in docs/sweeps.md")
    content = read_yaml(path)
    if not isinstance(content, dict):
        raise ValueError(f"grid file {str(path)!r} must contain a mapping with the keys {', '.join(GRID_FILE_KEYS)}, got {type(content).__name__}")
    return content


def parse_grid(grid: str | os.PathLike | dict[str, Any]) -> Sweep:
    """Resolve a grid file (path) or its content (dict) into a :class:`Sweep`.

    Checks the file's shape and the parameter names; :func:`validate` checks each point's values.

    Raises:
        FileNotFoundError: the grid file does not exist.
        KeyError: a key names no parameter.
        TypeError, ValueError: the grid file has the wrong shape, no points or repeated points.
    """
    content = read_grid(grid)
    unknown = sorted(set(content) - set(GRID_FILE_KEYS))
    if unknown:
        raise ValueError(f"grid file keys {unknown} are unknown; valid keys are {', '.join(GRID_FILE_KEYS)}")
    if ("grid" in content) == ("points" in content):
        raise ValueError("the grid file needs exactly one of grid: (a Cartesian product) or points: (an explicit list)")

    fixed = _mapping(content.get("fixed") or {}, "fixed")
    keys, points = _product(content["grid"]) if "grid" in content else _explicit(content["points"])
    _check_names([*fixed, *keys])
    overlap = sorted(set(fixed) & set(keys))
    if overlap:
        raise ValueError(f"fixed and the varying values both set {', '.join(overlap)}; keep each parameter in one place")

    base_run = content.get("base_run")
    preset = content.get("preset")
    if base_run is None and preset is None:
        raise ValueError("the grid file names no preset; add preset: smoke, quick or paper")
    if preset is not None and not isinstance(preset, str):
        raise TypeError(f"preset must be a name such as smoke, got {preset!r} ({type(preset).__name__})")
    if base_run is not None and not isinstance(base_run, str):
        raise TypeError(f"base_run must be the path of a run directory, got {base_run!r} ({type(base_run).__name__})")

    sweep = Sweep(
        preset=preset,
        notebooks=_notebook_numbers(content.get("notebooks")),
        fixed=absolute_paths(fixed),
        keys=keys,
        points=[absolute_paths(point) for point in points],
        base_run=str(Path(base_run).expanduser().resolve()) if base_run is not None else None,
        grid=content,
    )
    _check_repeats(sweep)
    return sweep


def _mapping(value: Any, name: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise TypeError(f"{name} must be a mapping of parameter names to values, got {value!r} ({type(value).__name__})")
    return dict(value)


def _product(grid: Any) -> tuple[list[str], list[dict[str, Any]]]:
    """Return the keys and the points of a Cartesian product grid."""
    grid = _mapping(grid, "grid")
    if not grid:
        raise ValueError("grid is empty; give at least one parameter with a list of values")
    for key, values in grid.items():
        if not isinstance(values, list):
            raise TypeError(
                f"grid value of {key} must be the list of values to try, got {values!r} ({type(values).__name__}); "
                f"write [{compact_json(values)}], or move {key} to fixed"
            )
        if not values:
            raise ValueError(f"grid value of {key} is an empty list, which leaves no points; give at least one value")
    keys = list(grid)
    points = [dict(zip(keys, combination)) for combination in itertools.product(*grid.values())]
    return keys, points


def _explicit(points: Any) -> tuple[list[str], list[dict[str, Any]]]:
    """Return the keys (in order of first appearance) and the points of an explicit list."""
    if not isinstance(points, list) or not points:
        raise ValueError(f"points must be a non-empty list of mappings, got {points!r}")
    checked = [_mapping(point, f"point {index}") for index, point in enumerate(points)]
    keys = list(dict.fromkeys(key for point in checked for key in point))
    return keys, checked


def _check_names(names: list[str]) -> None:
    known = typing.get_type_hints(Params)
    unknown = [name for name in dict.fromkeys(names) if name not in known]
    if unknown:
        raise KeyError(f"unknown parameters {unknown} in the grid file; valid parameters are: {', '.join(sorted(known))}")


def _notebook_numbers(notebooks: Any) -> list[str] | None:
    """Return notebook numbers as two-digit strings; YAML reads an unquoted 04 as the int 4."""
    if notebooks is None:
        return None
    if not isinstance(notebooks, list) or not notebooks:
        raise ValueError(f"notebooks must be a non-empty list of notebook numbers such as ['01', '02'], got {notebooks!r}")
    numbers = []
    for number in notebooks:
        if isinstance(number, bool) or not isinstance(number, (int, str)):
            raise TypeError(f"notebooks lists {number!r} ({type(number).__name__}); give notebook numbers such as '04'")
        text = str(number).strip()
        numbers.append(f"{int(text):02d}" if text.isdigit() else text)
    return numbers


def _check_repeats(sweep: Sweep) -> None:
    seen: dict[str, int] = {}
    for index in range(len(sweep.points)):
        text = json.dumps(sweep.overrides(index), sort_keys=True)
        if text in seen:
            raise ValueError(f"points {seen[text]} and {index} are the same ({describe(sweep.points[index])}); list each point once")
        seen[text] = index


def validate(sweep: Sweep, notebook_dir: str | os.PathLike = NOTEBOOK_DIR) -> BaseRun | None:
    """Check every point before anything runs; return the base run when the sweep has one.

    Raises:
        ValueError: one message listing every invalid point with its index and the reason, or a
            notebook selection or base run that cannot work.
        FileNotFoundError: the base run does not exist.
    """
    notebooks = list_notebooks(notebook_dir)
    selected = select_sweep_notebooks(sweep, notebooks)
    base = None
    if sweep.base_run is not None:
        base = open_base_run(sweep.base_run, notebooks, selected)
        if sweep.preset is not None and sweep.preset != base.preset:
            raise ValueError(
                f"preset {sweep.preset} differs from the base run's preset {base.preset}; leave preset out, because "
                "a sweep on a base run keeps that run's parameters"
            )
        check_overrides(base, [*sweep.fixed, *sweep.keys])

    problems = []
    for index in range(len(sweep.points)):
        overrides = sweep.overrides(index)
        try:
            if base is None:
                resolve_params(sweep.preset, overrides)
            else:
                base_values(base, overrides)
        except (KeyError, TypeError, ValueError) as error:
            problems.append(f"point {index} ({describe(sweep.points[index])}): {_reason(error, overrides)}")
    if problems:
        raise ValueError(f"{len(problems)} of {len(sweep.points)} points are invalid, so nothing ran:\n  " + "\n  ".join(problems))
    return base


def select_sweep_notebooks(sweep: Sweep, notebooks: list[Path]) -> list[Path]:
    """Return the notebooks the sweep's points execute, in series order.

    Raises:
        ValueError: ``notebooks`` names no notebook of the series, or leaves out 01 without a base run.
    """
    known = sorted(notebook.name[:2] for notebook in notebooks)
    unknown = [number for number in sweep.notebooks or [] if number not in known]
    if unknown:
        raise ValueError(f"notebooks {unknown} name no notebook of the series; choose from {', '.join(known)}")
    if sweep.notebooks and sweep.base_run is None and "01" not in sweep.notebooks:
        raise ValueError(
            f"notebooks {sweep.notebooks} must include 01, because each point's new run directory needs notebook 01 "
            "to train its model; or give base_run to reuse the model of an earlier run"
        )
    return select_notebooks(notebooks, sweep.notebooks, require_first=False)


def _reason(error: Exception, overrides: dict[str, Any]) -> str:
    """Return the error's message, with a hint where YAML turned a word into a boolean."""
    reason = error.args[0] if error.args else str(error)
    types = typing.get_type_hints(Params)
    misread = [key for key, value in overrides.items() if types.get(key) is str and isinstance(value, bool)]
    if misread:
        reason += f" (YAML reads unquoted no, yes, on and off as booleans, so quote the value of {', '.join(misread)}, e.g. 'no')"
    return reason


def run_sweep(grid: str | os.PathLike | dict[str, Any], out: str | os.PathLike | None = None,
              notebook_dir: str | os.PathLike = NOTEBOOK_DIR) -> pd.DataFrame:
    """Execute the series once per point of ``grid`` into ``out`` and return the results table.

    Args:
        grid: path of a grid file, or its content as a dict.
        out: new or empty folder; a new ``outputs/sweep-<name>-<UTC time>`` when None.
        notebook_dir: folder of the numbered notebooks.

    Returns:
        The table written to ``out/results.csv``, with one row per point and attack, or one row
        for a point that failed or wrote no metrics. Its columns are ``point``, ``run_dir``, one
        per varying parameter (lists as compact JSON text), the point's ``metrics.csv`` columns,
        ``status`` ("completed" or "failed") and ``error``.

    Raises:
        KeyError, TypeError, ValueError, FileNotFoundError: the grid file or a point is invalid;
            nothing has run.
        FileExistsError: ``out`` exists and is not empty.
    """
    sweep = parse_grid(grid)
    validate(sweep, notebook_dir)
    name = Path(grid).stem if not isinstance(grid, dict) else None
    out = prepare_out(out, name)

    record = {"grid_file": None if isinstance(grid, dict) else str(Path(grid).resolve()), **asdict(sweep)}
    atomic_write_text(out / SWEEP_FILE, yaml.safe_dump(record, sort_keys=False))
    log.info("sweep of %d points into %s", len(sweep.points), out)
    return _run_points(sweep, out, notebook_dir)


def resume_sweep(out: str | os.PathLike, notebook_dir: str | os.PathLike = NOTEBOOK_DIR) -> pd.DataFrame:
    """Continue the sweep recorded in ``out/sweep.yaml`` and return the results table.

    Completed points are skipped. A point whose run started is continued with
    :func:`fcre_utils.runner.resume_series`, so a failed point runs again from its failed notebook.
    A point folder left without ``run_request.yaml`` (stopped while its files were being linked)
    is moved to ``out/interrupted/`` and the point starts again.
    """
    out = Path(out).resolve()
    path = out / SWEEP_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{str(path)!r} not found, so {str(out)!r} contains no sweep; give the --out folder of a sweep")
    record = read_yaml(path)
    record.pop("grid_file", None)
    sweep = Sweep(**record)
    validate(sweep, notebook_dir)
    log.info("resuming sweep of %d points in %s", len(sweep.points), out)
    return _run_points(sweep, out, notebook_dir)


def prepare_out(out: str | os.PathLike | None, name: str | None = None) -> Path:
    """Return a new or empty output folder; an existing non-empty one raises FileExistsError."""
    if out is None:
        return new_run_dir("outputs", prefix=f"sweep-{name}" if name else "sweep").resolve()
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(
            f"--out {str(out)!r} exists and is not an empty folder, so it is kept as it is; choose a new --out, "
            f"or continue the sweep there with --resume {out}"
        )
    out.mkdir(parents=True, exist_ok=True)
    return out.resolve()


def _run_points(sweep: Sweep, out: Path, notebook_dir: str | os.PathLike) -> pd.DataFrame:
    """Run every point not completed yet, rewriting ``results.csv`` after each one."""
    selected = select_sweep_notebooks(sweep, list_notebooks(notebook_dir))
    outcomes: dict[int, tuple[str, str]] = {}
    for index in range(len(sweep.points)):
        run_dir = out / point_name(index)
        label = f"{point_name(index)} of {len(sweep.points)} ({describe(sweep.points[index])})"
        if (run_dir / REQUEST_FILE).is_file() and all(notebook_completed(run_dir / notebook.name) for notebook in selected):
            log.info("%s: skipped, it completed earlier", label)
            outcomes[index] = ("completed", "")
            continue

        start = time.perf_counter()
        try:
            _run_point(sweep, index, run_dir, out, notebook_dir)
            outcomes[index] = ("completed", "")
            log.info("%s: completed in %.1f s", label, time.perf_counter() - start)
        # Any error of one point is recorded, so that the other points still run.
        except Exception as error:
            outcomes[index] = ("failed", f"{type(error).__name__}: {error}")
            log.error("%s: failed after %.1f s: %s", label, time.perf_counter() - start, error)
        write_results(collect_results(sweep, out, outcomes), out)

    results = collect_results(sweep, out, outcomes)
    write_results(results, out)
    failed = [point_name(index) for index, (status, _) in outcomes.items() if status == "failed"]
    if failed:
        log.warning("%d of %d points failed: %s; see the error column of %s", len(failed), len(outcomes), ", ".join(failed), out / RESULTS_FILE)
    return results


def _run_point(sweep: Sweep, index: int, run_dir: Path, out: Path, notebook_dir: str | os.PathLike) -> None:
    if (run_dir / REQUEST_FILE).is_file():
        resume_series(run_dir, notebook_dir)
        return
    if run_dir.exists() and any(run_dir.iterdir()):
        _set_aside(run_dir, out)
    if sweep.base_run is None:
        run_series(sweep.preset, sweep.overrides(index), run_dir, notebook_dir, only=sweep.notebooks)
    else:
        run_from_base(sweep.base_run, sweep.overrides(index), run_dir, notebook_dir, only=sweep.notebooks)


def _set_aside(run_dir: Path, out: Path) -> None:
    """Move a point folder that never started its notebooks to ``out/interrupted/<point>-<n>``."""
    for attempt in itertools.count(1):
        target = out / INTERRUPTED_FOLDER / f"{run_dir.name}-{attempt}"
        if not target.exists():
            break
    target.parent.mkdir(parents=True, exist_ok=True)
    run_dir.rename(target)
    log.warning("moved the unstarted %s to %s", run_dir, target)


def collect_results(sweep: Sweep, out: Path, outcomes: dict[int, tuple[str, str]]) -> pd.DataFrame:
    """Build the tidy table of the points in ``outcomes`` from their ``metrics.csv`` files.

    A point that leaves a varying parameter out gets the value it ran with in that column. A
    ``metrics.csv`` column named like a varying parameter (``n_members``, ``n_nonmembers``: the
    evaluation split's counts) is renamed ``metrics_<name>``, so both values are kept.
    """
    rows = []
    metric_columns: list[str] = []
    for index, (status, error) in sorted(outcomes.items()):
        run_dir = out / point_name(index)
        head = {"point": point_name(index), "run_dir": str(run_dir), **_point_values(sweep, index)}
        metrics_path = run_dir / "metrics.csv"
        if status == "completed" and metrics_path.is_file():
            metrics = pd.read_csv(metrics_path)
            metrics = metrics.rename(columns={name: f"metrics_{name}" for name in metrics.columns if name in head})
            metric_columns += [column for column in metrics.columns if column not in metric_columns]
            rows += [{**head, **row, "status": status, "error": error} for row in metrics.to_dict("records")]
        else:
            rows.append({**head, "status": status, "error": error})
    columns = ["point", "run_dir", *sweep.keys, *metric_columns, "status", "error"]
    return pd.DataFrame(rows, columns=columns)


def _point_values(sweep: Sweep, index: int) -> dict[str, Any]:
    """Return the point's values of the varying parameters, lists as compact JSON text."""
    values = dict(sweep.points[index])
    missing = [key for key in sweep.keys if key not in values]
    if missing:
        params = asdict(resolve_params(sweep.preset, sweep.overrides(index))) if sweep.base_run is None else {
            **read_yaml(Path(sweep.base_run) / "params.yaml"), **sweep.overrides(index)}
        values.update({key: params[key] for key in missing})
    return {key: compact_json(values[key]) if isinstance(values[key], (list, dict)) else values[key] for key in sweep.keys}


def write_results(results: pd.DataFrame, out: Path) -> None:
    """Write ``out/results.csv``, and ``out/results.parquet`` when pyarrow is installed.

    Both are rebuilt from the point run directories, so they are replaced on every write.
    """
    atomic_write_text(out / RESULTS_FILE, results.to_csv(index=False), overwrite=True)
    if importlib.util.find_spec("pyarrow") is None:
        return

    # NOTE: this branch has not run in the project's tests, whose environment lacks pyarrow.
    temporary = out / ".results.parquet.tmp"
    try:
        results.to_parquet(temporary, index=False)
    except (TypeError, ValueError) as error:  # pyarrow's ArrowTypeError and ArrowInvalid derive from these
        log.warning("results.parquet not written (%s); results.csv contains the same table", error)
        return
    os.replace(temporary, out / "results.parquet")


def summarise_points(results: pd.DataFrame) -> pd.DataFrame:
    """Return one row per point of a results table: its varying values, status and highest AUC."""
    end = results.columns.get_loc("attack") if "attack" in results else results.columns.get_loc("status")
    keys = list(results.columns[2:end])
    rows = []
    for _, group in results.groupby("point", sort=True):
        row = group.iloc[0][["point", *keys, "status"]].to_dict()
        if "auc" in group and group.auc.notna().any():
            best = group.loc[group.auc.idxmax()]
            row["highest AUC"] = f"{best.auc:.3f} ({best.attack})"
        rows.append(row)
    return pd.DataFrame(rows)
