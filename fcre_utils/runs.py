"""Run directories: one folder per run holding its parameters, split, model and results.

Layout of ``outputs/<run-name>/``::

    params.yaml          resolved parameters (written once, by notebook 01 or the runner)
    environment.yaml     package versions, seed, threads, device and git commit
    manifest.csv         image_id, sha256, member, split
    control_manifest.csv image_id, sha256 of the control set (when train_control)
    model/               diffusers DDPMPipeline folder (safetensors)
    control_model/       the same, trained on the control set
    training_state/      per model folder: state.pt to resume training (replaced at each checkpoint)
    training_log.csv     mean loss per epoch (control_training_log.csv for the control model)
    reconstructions.pt   cached DDIM inversions and reconstructions (notebook 02)
    selection.csv        calibration metrics of every candidate setting (notebook 04)
    scores.csv           one row per image and attack (notebook 04)
    metrics.csv          one row per attack, with intervals (notebook 04; metrics.md as text)
    control_*            the same files for the control model
    figures/             PNG figures
    *.ipynb              executed notebooks (runner)
    run_request.yaml     preset, overrides and notebooks, read by ``run --resume`` (runner)
    interrupted/         files of notebooks that did not finish, moved aside by ``run --resume``

Result files are written atomically (temporary file, then rename) and never overwritten. The
model folder and the training state are replaced at each checkpoint, also atomically.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import pickle
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import yaml

from .data import (
    check_manifest, check_pixels, content_hashes, draw_control, file_sha256, load_npz_images, locate_medmnist, make_splits,
    read_medmnist_file, to_model_tensor,
)
from .models import check_images_fit
from .presets import Params, params_from_dict, params_to_dict, resolve_params
from .reconstruction import Reconstructions, reconstruct

log = logging.getLogger(__name__)

PACKAGES = ("torch", "diffusers", "accelerate", "numpy", "scikit-learn", "scikit-image", "torchmetrics", "papermill")


def new_run_dir(root: str | os.PathLike = "outputs", prefix: str = "run") -> Path:
    """Create and return a new, empty run directory ``root/<prefix>-<UTC time>[-n]``."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    for attempt in range(1000):
        name = f"{prefix}-{stamp}" if attempt == 0 else f"{prefix}-{stamp}-{attempt}"
        try:
            (root / name).mkdir()
            return root / name
        except FileExistsError:
            continue
    raise FileExistsError(f"could not create a new run directory under {str(root)!r}")


def atomic_write_text(path: str | os.PathLike, text: str, overwrite: bool = False) -> Path:
    """Write ``text`` to ``path`` through a temporary file and a rename.

    Raises:
        FileExistsError: ``path`` exists and ``overwrite`` is false.
    """
    path = Path(path)
    if not overwrite:
        _refuse_existing(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(text)
    os.replace(temporary, path)
    return path


def _refuse_existing(path: Path) -> None:
    if path.exists():
        raise FileExistsError(
            f"{str(path)!r} already exists and is kept; start a new run directory to recompute it"
        )


def write_table(table: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Write ``table`` as CSV atomically; an existing file is never overwritten."""
    return atomic_write_text(path, table.to_csv(index=False))


def save_tensors(tensors: dict[str, Any], path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Save a dict of tensors with torch.save atomically; an existing file is kept unless ``overwrite``."""
    path = Path(path)
    if not overwrite:
        _refuse_existing(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    torch.save(tensors, temporary)
    os.replace(temporary, path)
    return path


def load_tensors(path: str | os.PathLike) -> dict[str, Any]:
    """Load a file written by :func:`save_tensors` (tensors only, no pickled code).

    Raises:
        ValueError: the file contains other pickled Python objects. They are not unpickled, so no
            code in the file runs.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise ValueError(
            f"{str(path)!r} contains pickled Python objects besides tensors, which are not loaded "
            "because unpickling can run code; recreate the file with this package, which saves "
            "tensors and plain values only"
        ) from error


def read_yaml(path: str | os.PathLike) -> Any:
    """Read a YAML file with the safe loader, so tags that build Python objects are rejected."""
    try:
        return yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError as error:
        raise ValueError(
            f"cannot read {str(path)!r} as plain YAML ({error}); write it with plain values only, "
            "without Python tags such as !!python/object"
        ) from error


def start_run(run_dir: str | os.PathLike, preset: str, overrides: dict[str, Any] | None = None) -> Params:
    """Resolve the parameters and record them in a run directory that has none yet.

    Writes ``params.yaml`` and ``environment.yaml``.

    Raises:
        FileExistsError: the run directory already contains ``params.yaml`` from another run.
    """
    params = resolve_params(preset, overrides)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)

    if (run_dir / "params.yaml").exists():
        raise FileExistsError(
            f"run directory {str(run_dir)!r} already contains a run (params.yaml); choose a new "
            "run_dir, or open the existing run with notebooks 02-04"
        )
    atomic_write_text(run_dir / "params.yaml", yaml.safe_dump({"preset": preset, **params_to_dict(params)}, sort_keys=False))
    atomic_write_text(run_dir / "environment.yaml", yaml.safe_dump(environment_record(params), sort_keys=False))
    log.info("started run %s with preset %s", run_dir, preset)
    return params


def load_run(run_dir: str | os.PathLike) -> Params:
    """Return the parameters recorded in ``run_dir/params.yaml``."""
    path = Path(run_dir) / "params.yaml"
    if not path.is_file():
        raise FileNotFoundError(
            f"{str(path)!r} not found; run notebook 01 (or python -m fcre_utils run) first to "
            "create this run directory"
        )
    values = read_yaml(path)
    values.pop("preset", None)
    return params_from_dict(values)


def environment_record(params: Params) -> dict[str, Any]:
    """Package versions, seed, thread count, device and git commit, for reproducibility."""
    from .models import pick_device

    versions = {}
    for package in PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"

    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": versions,
        "seed": params.seed,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "device": str(pick_device()),
        "git_commit": _git_commit(),
        "git_uncommitted_changes": _git_uncommitted_changes(),
        "created_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }


def _git_commit() -> str:
    try:
        result = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return result.stdout.strip() if result.returncode == 0 else "unknown"


def _git_uncommitted_changes() -> bool | str:
    """Return whether the project's tracked files differ from the recorded commit ("unknown" outside git)."""
    try:
        result = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=Path(__file__).parent,
            capture_output=True, text=True, timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return bool(result.stdout.strip()) if result.returncode == 0 else "unknown"


def load_source_images(params: Params, source: Path | None = None) -> np.ndarray:
    """Load every image of the run's dataset as uint8 (N, H, W) from ``source`` or its file."""
    source = source or source_file(params)
    if params.dataset.endswith(".npz"):
        images = load_npz_images(source)
    else:
        images, _ = read_medmnist_file(source)
    if images.ndim == 4 and images.shape[-1] in (3, 4):
        raise ValueError(
            f"dataset {params.dataset!r} has shape {images.shape}, colour images; expected grayscale (N, H, W), "
            "so convert the images to grayscale before saving them"
        )
    if images.ndim != 3:
        raise ValueError(
            f"dataset {params.dataset!r} has shape {images.shape}; expected (N, H, W), one grayscale image per row "
            "without a channel axis, so reshape or squeeze the array before saving it"
        )
    check_pixels(images, f"dataset {params.dataset!r}")
    return images


def source_file(params: Params) -> Path:
    """Return the npz file the run's images come from (downloading it if needed)."""
    if params.dataset.endswith(".npz"):
        path = Path(params.dataset).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"dataset file {str(path)!r} not found; set dataset to an existing npz file")
        return path
    return locate_medmnist(params.dataset, params.source_size, params.data_dir or None)


def create_manifest(run_dir: str | os.PathLike, params: Params) -> pd.DataFrame:
    """Draw the member / non-member / calibration split and write ``manifest.csv``.

    Also writes ``data_source.yaml``: the data file's path, its SHA-256 and the image count.
    """
    source = source_file(params)
    images = load_source_images(params, source)

    hashes = content_hashes(images)
    manifest = make_splits(hashes, params.n_members, params.n_nonmembers, params.calibration_fraction, params.seed)
    control = draw_control(hashes, manifest, params.n_members, params.seed) if params.train_control else None

    record = {"path": str(source.resolve()), "sha256": file_sha256(source), "unique_images": len(images)}
    atomic_write_text(Path(run_dir) / "data_source.yaml", yaml.safe_dump(record, sort_keys=False))
    write_table(manifest, Path(run_dir) / "manifest.csv")
    if control is not None:
        write_table(control, Path(run_dir) / "control_manifest.csv")
    return manifest


def configure_logging(level: int = logging.INFO) -> None:
    """Show the package's one-line phase logs (counts and timings) in a notebook or script."""
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", force=True)


def rows(manifest: pd.DataFrame, member: bool | None = None, split: str | None = None) -> torch.Tensor:
    """Boolean row mask of the manifest for a membership and/or split, as a tensor."""
    mask = np.ones(len(manifest), dtype=bool)
    if member is not None:
        mask &= manifest.member.to_numpy() == member
    if split is not None:
        mask &= manifest.split.to_numpy() == split
    return torch.from_numpy(mask.copy())


def cached_reconstructions(run_dir: str | os.PathLike, params: Params, unet, alphas_cumprod: torch.Tensor, images: torch.Tensor,
                           filename: str = "reconstructions.pt") -> Reconstructions:
    """Load ``run_dir/filename`` if this run has it, else reconstruct every image and save it there."""
    path = Path(run_dir) / filename
    if path.is_file():
        recon = Reconstructions.from_dict(load_tensors(path))
        if len(recon.x0) != len(images):
            raise ValueError(
                f"{str(path)!r} contains {len(recon.x0)} images but the manifest lists {len(images)}; "
                "start a new run directory"
            )
        log.info("loaded cached reconstructions from %s", path)
        return recon

    check_images_fit(unet, images)
    too_late = [t for t in params.timesteps if t >= len(alphas_cumprod)]
    if too_late:
        raise ValueError(
            f"timestep {too_late[0]} in timesteps is beyond the model's schedule of "
            f"{len(alphas_cumprod)} timesteps; choose timesteps below {len(alphas_cumprod)}"
        )
    recon = reconstruct(unet, images, params.timesteps, params.ddim_stride, alphas_cumprod, params.score_batch_size, params.progress)
    save_tensors(recon.to_dict(), path)
    return recon


def load_reconstructions(run_dir: str | os.PathLike, filename: str = "reconstructions.pt") -> Reconstructions:
    """Load the reconstructions notebook 02 saved (``control_reconstructions.pt``: the control model's)."""
    path = Path(run_dir) / filename
    if not path.is_file():
        raise FileNotFoundError(f"{str(path)!r} not found; run notebook 02 on this run directory first")
    return Reconstructions.from_dict(load_tensors(path))


def load_control_images(run_dir: str | os.PathLike, params: Params) -> torch.Tensor:
    """Return the model-ready images of ``control_manifest.csv``, checked against their hashes."""
    path = Path(run_dir) / "control_manifest.csv"
    if not path.is_file():
        raise FileNotFoundError(f"{str(path)!r} not found; start a new run with train_control=true to train a control model")
    control = pd.read_csv(path)
    manifest = pd.read_csv(Path(run_dir) / "manifest.csv")
    shared = set(control.sha256) & set(manifest.sha256)
    if shared:
        raise ValueError(f"{len(shared)} control images are also members or non-members; the control set must be disjoint, start a new run")
    images = load_source_images(params)[control.image_id.to_numpy()]
    _check_hashes(images, control, path)
    return to_model_tensor(images, params.image_size)


def _check_hashes(images: np.ndarray, table: pd.DataFrame, path: Path) -> None:
    changed = content_hashes(images) != table.sha256.to_numpy()
    if changed.any():
        first = int(table.image_id[changed].iloc[0])
        raise ValueError(
            f"{int(changed.sum())} images differ from {str(path)!r} (first image_id {first}); the "
            "dataset changed since this run was created, start a new run"
        )


def load_split_images(run_dir: str | os.PathLike, params: Params) -> tuple[pd.DataFrame, torch.Tensor]:
    """Return the manifest and the model-ready images of its rows, in manifest order.

    Raises:
        ValueError: an image's content no longer matches the hash recorded in the manifest.
    """
    path = Path(run_dir) / "manifest.csv"
    if not path.is_file():
        raise FileNotFoundError(f"{str(path)!r} not found; run notebook 01 on this run directory first")
    manifest = pd.read_csv(path)
    check_manifest(manifest)
    images = load_source_images(params)[manifest.image_id.to_numpy()]
    _check_hashes(images, manifest, path)
    return manifest, to_model_tensor(images, params.image_size)
