"""Start a run directory from an earlier run's files, so later notebooks run without retraining.

A sweep over attack settings need not train one model per point. Given a *base run*, the
notebooks of the series before the first one to execute are *reused*. The files they wrote in the
base run (model, manifest, reconstructions, figures, executed copies) are hard-linked into the new
run directory, or copied where the file system cannot link them. Only the later notebooks
execute. The base run is only read, and every notebook writes its results through a temporary
file and a rename, so a linked file is never changed in place.

The parameters a reused notebook consumed cannot change in the new run (:data:`CONSUMED_PARAMETERS`).
The new run records its resolved parameters in its own ``params.yaml``: the base run's values with
the new overrides on top.

Which files a reused notebook wrote comes from the runner's snapshots in ``.runner/``, the files
present before each notebook started. A run made before the runner wrote snapshots falls back to
file modification times compared with the start time papermill recorded in the next notebook.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nbformat
import yaml

from .presets import Params, resolve_params
from .runner import (
    NOTEBOOK_DIR, REQUEST_FILE, SNAPSHOT_FOLDER, _execute, _run_files, absolute_paths, list_notebooks, notebook_completed,
    prepare_run_dir, select_notebooks,
)
from .runs import atomic_write_text, read_yaml, start_run

log = logging.getLogger(__name__)


def _fields_before(name: str) -> tuple[str, ...]:
    names = [item.name for item in dataclasses.fields(Params)]
    return tuple(names[: names.index(name)])


# Parameters that shape what a notebook leaves for the later ones, by notebook number. Notebook 01
# consumes every field declared before ``timesteps`` in Params (the data, model and training
# sections, so a field added at the end of those sections is included). ``train_control`` may
# only be switched off (see :func:`base_values`).
CONSUMED_PARAMETERS: dict[str, tuple[str, ...]] = {
    "01": _fields_before("timesteps"),
    "02": ("timesteps", "ddim_stride"),
}

# Files of the base run that the new run writes itself rather than links.
OWN_FILES = frozenset({"params.yaml", "environment.yaml", "summary.md"})

# Caches that a later notebook writes and reads back when present, each with the notebook whose
# parameters it depends on. Notebook 04 reconstructs the control set at notebook 02's timesteps,
# so its cache is linked too when 02 is reused.
REUSABLE_CACHES = {"control_reconstructions.pt": "02"}


@dataclass
class BaseRun:
    """An earlier run directory whose first notebooks a new run reuses."""

    path: Path  # absolute
    preset: str
    values: dict[str, Any]  # the base run's params.yaml without its preset
    reused: list[Path]  # notebooks of the series whose outputs are taken over, in order
    files: list[str]  # the files those notebooks wrote, relative to ``path``


def open_base_run(base_run: str | os.PathLike, notebooks: list[Path], selected: list[Path]) -> BaseRun:
    """Check that ``base_run`` can stand in for the notebooks before ``selected[0]`` and list their files.

    The reused notebooks are those of ``notebooks`` (the series) that come before the first
    selected notebook and that the base run executed. Each must have completed there.

    Raises:
        FileNotFoundError: ``base_run`` is no directory or has no ``params.yaml``.
        ValueError: nothing is left to reuse, a reused notebook did not complete, or the base run
            records no preset.
    """
    path = Path(base_run).expanduser().resolve()
    if not path.is_dir():
        raise FileNotFoundError(f"base_run {str(path)!r} not found or not a directory; give the run directory of an earlier run")
    if not (path / "params.yaml").is_file():
        raise FileNotFoundError(
            f"base_run {str(path)!r} is missing params.yaml, so it is not a run directory; give the folder of a run "
            "made by python -m fcre_utils run"
        )

    first = selected[0]
    reused = [notebook for notebook in notebooks if notebook.name < first.name and (path / notebook.name).is_file()]
    if not reused:
        raise ValueError(
            f"base_run {str(path)!r} has no executed notebook before {first.name}, so there is nothing to reuse; "
            "list only the later notebooks to execute (for example notebooks: ['04']), or leave base_run out"
        )
    unfinished = [notebook.name for notebook in reused if not notebook_completed(path / notebook.name)]
    if unfinished:
        raise ValueError(
            f"{', '.join(unfinished)} did not complete in base_run {str(path)!r}; continue that run with "
            f"python -m fcre_utils run --resume {path}, or choose another base run"
        )

    values = read_yaml(path / "params.yaml")
    preset = values.pop("preset", None)
    if not isinstance(preset, str):
        raise ValueError(f"{str(path / 'params.yaml')!r} records no preset; give a run directory made by python -m fcre_utils run")
    files = reused_files(path, reused, notebooks) - OWN_FILES
    numbers = {notebook.name[:2] for notebook in reused}
    files |= {name for name, number in REUSABLE_CACHES.items() if number in numbers and (path / name).is_file()}
    return BaseRun(path=path, preset=preset, values=values, reused=reused, files=sorted(files))


def reused_files(path: Path, reused: list[Path], notebooks: list[Path]) -> set[str]:
    """Return the files (relative paths) that the notebooks up to ``reused[-1]`` wrote in run ``path``.

    Those are the files present before the base run's next notebook started, or all of the run's
    files when it executed nothing after ``reused[-1]``. The runner's own bookkeeping (request,
    timings, snapshots, training state, interrupted files) is never included.
    """
    later = [notebook for notebook in notebooks if notebook.name > reused[-1].name]
    for notebook in later:
        snapshot = path / SNAPSHOT_FOLDER / f"{notebook.stem}.txt"
        if snapshot.is_file():
            return {line for line in snapshot.read_text().splitlines() if line}
        if (path / notebook.name).is_file():
            return files_before_start(path, path / notebook.name)
    return _run_files(path)


def files_before_start(path: Path, executed: Path) -> set[str]:
    """Return the run's files last modified before papermill started the notebook ``executed``.

    NOTE: this relies on modification times, so it fails for a run directory copied without
    keeping them (``cp`` without ``-p``). A wrongly linked file makes the notebook that writes it
    stop with FileExistsError. A file left out makes a later notebook stop with FileNotFoundError.
    Neither changes the base run.
    """
    start_text = nbformat.read(executed, as_version=4).metadata.get("papermill", {}).get("start_time")
    if not start_text:
        raise ValueError(
            f"{str(executed)!r} records no papermill start time, so the files of the notebooks before it are unknown; "
            "give a base run made by python -m fcre_utils run"
        )
    start = dt.datetime.fromisoformat(start_text).timestamp()
    return {relative for relative in _run_files(path) if (path / relative).stat().st_mtime < start}


def check_overrides(base: BaseRun, keys: list[str] | set[str]) -> None:
    """Raise ValueError naming every key in ``keys`` that a reused notebook consumed."""
    consumed = {}
    for notebook in base.reused:
        for name in CONSUMED_PARAMETERS.get(notebook.name[:2], ()):
            consumed[name] = notebook.name
    conflicts = [key for key in keys if key in consumed]
    if conflicts:
        named = ", ".join(f"{key} (read by {consumed[key]})" for key in conflicts)
        raise ValueError(
            f"{named} cannot change, because the run reuses those notebooks from base_run {str(base.path)!r}; "
            "remove them from the overrides (fixed, grid or points of a sweep), or leave base_run out so that notebook 01 runs again"
        )


def base_values(base: BaseRun, overrides: dict[str, Any]) -> dict[str, Any]:
    """Return the base run's parameter values with ``overrides`` on top, checked by :func:`resolve_params`.

    ``train_control`` may switch the control model's attacks off, but not on where the base run
    trained no control model.
    """
    check_overrides(base, list(overrides))
    if overrides.get("train_control") is True and base.values.get("train_control") is False:
        raise ValueError(
            f"train_control=true needs a control model, but base_run {str(base.path)!r} trained none; "
            "set train_control to false, or choose a base run that trained one"
        )
    values = {**base.values, **overrides}
    resolve_params(base.preset, values)
    return values


def link_files(base: BaseRun, run_dir: Path) -> tuple[int, int]:
    """Hard-link the base run's reused files into ``run_dir``, copying where linking fails.

    Returns the number of files linked and copied.
    """
    linked = copied = 0
    for relative in base.files:
        source, target = base.path / relative, run_dir / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(source, target)
            linked += 1
        except FileExistsError:
            raise
        except OSError:
            # another file system, or one without hard links
            shutil.copy2(source, target)
            copied += 1
    return linked, copied


def run_from_base(
    base_run: str | os.PathLike,
    overrides: dict[str, Any] | None = None,
    run_dir: str | os.PathLike | None = None,
    notebook_dir: str | os.PathLike = NOTEBOOK_DIR,
    only: list[str] | None = None,
) -> Path:
    """Execute the notebooks ``only`` into a new run directory that starts from ``base_run``'s files.

    The run directory records ``base_run`` in ``run_request.yaml``, so ``python -m fcre_utils run
    --resume`` continues it like any other run.

    Raises:
        FileNotFoundError, ValueError: see :func:`open_base_run` and :func:`check_overrides`.
        KeyError, TypeError: an override names no parameter or has the wrong type.
        RunFailed: a notebook raised an error, which its executed copy shows.
    """
    notebooks = list_notebooks(notebook_dir)
    selected = select_notebooks(notebooks, only, require_first=False)
    base = open_base_run(base_run, notebooks, selected)
    values = base_values(base, absolute_paths(dict(overrides or {})))

    run_dir = prepare_run_dir(run_dir, base.preset).resolve()
    linked, copied = link_files(base, run_dir)
    log.info("run directory %s starts from %s: %d files linked, %d copied (%s reused)", run_dir, base.path, linked, copied,
             ", ".join(notebook.name for notebook in base.reused))
    start_run(run_dir, base.preset, values)

    # written last, so a run directory without it was never started and can be set aside
    request = {"preset": base.preset, "overrides": values, "only": [notebook.name[:2] for notebook in selected],
               "base_run": str(base.path)}
    atomic_write_text(run_dir / REQUEST_FILE, yaml.safe_dump(request, sort_keys=False))
    _execute(run_dir, selected, {"run_dir": str(run_dir), "preset": base.preset, "overrides": values}, timings=[])
    return run_dir
