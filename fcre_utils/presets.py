"""Named parameter sets (presets) shared by the runner, the notebooks and the tests.

:class:`Params` lists every parameter with its type and its default. The defaults are sized for a
user with a GPU (the ``paper`` preset); the other presets override a few fields:

- ``smoke``: seconds per notebook on a CPU; checks that everything runs, not the science.
- ``quick``: the default main job, real PneumoniaMNIST on a laptop CPU in about an hour, with
  members clearly separable from non-members.
- ``paper``: 64 px images, thousands of images a side, long training; meant for a GPU.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Params:
    """Every parameter of a run, with the ``paper`` preset's values as defaults."""

    # Data
    dataset: str = "pneumoniamnist"  # MedMNIST 2-D dataset name, or a path to an npz file
    data_dir: str = ""  # folder with the npz files; empty: $FCRE_DATA_DIR, then download
    source_size: int = 64  # MedMNIST resolution to read: 28, 64, 128 or 224 px
    image_size: int = 64  # model resolution; smaller sources are edge-padded to it
    n_members: int = 1500  # training images (members); the control model trains on as many others
    n_nonmembers: int = 2000  # images never used in training (non-members)
    calibration_fraction: float = 0.2  # share of each side held out to choose attack settings
    seed: int = 0  # seed for splits, initial weights, training noise and attack noise

    # Model and noise schedule
    block_out_channels: list[int] = field(default_factory=lambda: [64, 128, 256, 256])
    layers_per_block: int = 2  # ResNet blocks per UNet resolution level
    attention: bool = True  # self-attention at the lowest resolution level
    num_train_timesteps: int = 1000  # T of the DDPM schedule
    beta_start: float = 1e-4  # first beta of the linear schedule
    beta_end: float = 0.02  # last beta of the linear schedule

    # Training
    epochs: int = 2000  # passes over the members
    batch_size: int = 64  # training batch size per process
    learning_rate: float = 2e-4  # AdamW learning rate
    ema_decay: float = 0.9995  # EMA decay of the saved weights
    checkpoint_every: int = 100  # epochs between checkpoints of the model folder
    history_every: int = 250  # epochs between kept weight snapshots (checkpoints/model/epoch-N); 0: none
    mixed_precision: str = "no"  # accelerate mixed precision: no, fp16 or bf16 (GPU only)
    n_samples: int = 16  # images sampled from the trained model for display
    sample_steps: int = 50  # DDIM steps per displayed sample

    # Reconstruction
    timesteps: list[int] = field(default_factory=lambda: [50, 100, 200])  # candidate t
    ddim_stride: int = 10  # timesteps skipped per DDIM step (k)
    score_batch_size: int = 256  # images per batch when scoring

    # Attacks
    band_low: float = 0.15  # default FCRE band, low edge (normalised radius, 1 = Nyquist)
    band_high: float = 0.85  # default FCRE band, high edge
    band_candidates: list[list[float]] = field(
        default_factory=lambda: [
            [0.15, 0.85], [0.05, 0.3], [0.05, 0.5], [0.1, 0.6], [0.25, 0.75], [0.5, 1.0],
            [0.0, 0.5], [0.0, 1.5],
        ]
    )  # bands compared on the calibration split; [0, 1.5] keeps every frequency
    lowpass_cutoffs: list[float] = field(default_factory=lambda: [0.25, 0.5, 0.75])  # low-pass filter variants' candidate cutoffs
    select_on_calibration: bool = True  # choose each attack's t, band and cutoff on the calibration split
    fcre_t: int = 100  # used when not selecting: FCRE's timestep t (both protocols)
    naive_t: int = 100  # used when not selecting: timestep t of the naive loss attack
    secmi_t: int = 100  # used when not selecting: SecMI-stat's timestep t; must be one of timesteps
    pia_t: int = 200  # used when not selecting: timestep t of PIA and PIAN
    sima_t: int = 100  # used when not selecting: timestep t of SimA
    lowpass_cutoff: float = 0.5  # used when not selecting: cutoff of the low-pass filter variants
    naive_draws: int = 4  # noise draws averaged by the naive loss attack
    bootstrap_resamples: int = 1000  # bootstrap resamples behind each 95% interval

    # Frequency analysis and ablations (notebooks 03 and 05)
    ring_width: float = 0.1  # width of the narrow rings swept from low to high frequency
    heatmap_edges: list[float] = field(
        default_factory=lambda: [0.0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0, 1.5]
    )  # band edges of the low-edge x high-edge heatmap; 1.5 keeps the corners
    ablation_strides: list[int] = field(default_factory=lambda: [5, 10, 25])  # DDIM strides compared at the chosen t
    ablation_member_sizes: list[int] = field(default_factory=lambda: [250, 500])  # smaller member sets, each trained like the model

    # Control model
    train_control: bool = True  # also train a model on a disjoint control set, as a sanity check

    # Display
    progress: bool = True  # show tqdm progress bars


MAX_RADIUS = 2**0.5  # normalised radius of the spectrum's corners; a band starting there is empty

PRESETS: dict[str, dict[str, Any]] = {
    # NOTE: the paper preset has not been run end to end yet. Its model size, training length
    # and learning rate are estimates for one modern GPU, not measured settings.
    "paper": {},
    "quick": {
        "source_size": 28,
        "image_size": 32,
        "n_members": 128,
        "n_nonmembers": 1400,
        "calibration_fraction": 0.25,
        "block_out_channels": [16, 32, 32],
        "layers_per_block": 1,
        "epochs": 1100,
        "batch_size": 32,
        "learning_rate": 1e-3,
        "ema_decay": 0.999,
        "checkpoint_every": 100,
        "history_every": 100,
        "ablation_member_sizes": [32, 64],
    },
    "smoke": {
        "source_size": 28,
        "image_size": 32,
        "n_members": 24,
        "n_nonmembers": 24,
        "calibration_fraction": 0.5,
        "block_out_channels": [8, 16],
        "layers_per_block": 1,
        "attention": False,
        "epochs": 2,
        "batch_size": 8,
        "learning_rate": 1e-3,
        "ema_decay": 0.9,
        "checkpoint_every": 1,
        "history_every": 1,
        "ablation_strides": [10, 20],
        "ablation_member_sizes": [8],
        "timesteps": [20, 40],
        "ddim_stride": 20,
        "band_candidates": [[0.15, 0.85], [0.0, 1.5]],
        "naive_t": 40,
        "secmi_t": 40,
        "pia_t": 40,
        "sima_t": 40,
        "lowpass_cutoffs": [0.5],
        "naive_draws": 1,
        "bootstrap_resamples": 50,
        "n_samples": 4,
        "sample_steps": 5,
        "progress": False,
    },
}


def preset_names() -> list[str]:
    """Return the names of the presets."""
    return sorted(PRESETS)


def _field_types() -> dict[str, Any]:
    return typing.get_type_hints(Params)


def _check_type(name: str, value: Any, expected: Any) -> Any:
    """Return ``value`` converted to ``expected`` where lossless, else raise TypeError."""
    origin = typing.get_origin(expected)

    if expected is bool:
        if isinstance(value, bool):
            return value
    elif expected is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif expected is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)  # YAML 1.1 reads "1e-3" (no dot) as a string
            except ValueError:
                pass
    elif expected is str:
        if isinstance(value, str):
            return value
    elif origin is list:
        (item_type,) = typing.get_args(expected)
        if isinstance(value, (list, tuple)):
            return [_check_type(f"{name}[{i}]", item, item_type) for i, item in enumerate(value)]

    raise TypeError(
        f"parameter {name!r} must be of type {getattr(expected, '__name__', expected)}, "
        f"got {value!r} ({type(value).__name__}); fix the value in the preset or override"
    )


def resolve_params(preset: str, overrides: dict[str, Any] | None = None) -> Params:
    """Return the parameters of ``preset`` with ``overrides`` applied on top.

    Raises:
        KeyError: ``preset`` is not a known preset, or an override names no parameter.
        TypeError: an override has the wrong type (an int is accepted for a float).
    """
    if preset not in PRESETS:
        raise KeyError(f"unknown preset {preset!r}; choose one of {preset_names()}")

    types = _field_types()
    values = dict(PRESETS[preset])
    for name, value in (overrides or {}).items():
        if name not in types:
            raise KeyError(
                f"unknown parameter {name!r}; valid parameters are: {', '.join(sorted(types))}"
            )
        values[name] = value

    checked = {name: _check_type(name, value, types[name]) for name, value in values.items()}
    params = Params(**checked)
    check_values(params)
    return params


def check_values(params: Params) -> None:
    """Raise ValueError for values that have the right type but cannot work together.

    Runs before any notebook, so a bad combination fails in seconds rather than after training.
    """
    problems = []
    for name in ("n_members", "n_nonmembers", "epochs", "batch_size", "checkpoint_every", "ddim_stride",
                 "score_batch_size", "naive_draws", "n_samples", "sample_steps", "num_train_timesteps"):
        if getattr(params, name) < 1:
            problems.append(f"{name}={getattr(params, name)} must be at least 1")
    if not 0.0 <= params.calibration_fraction < 1.0:
        problems.append(f"calibration_fraction={params.calibration_fraction} must be in [0, 1)")
    for name in ("n_members", "n_nonmembers"):
        size = getattr(params, name)
        n_calibration = int(round(params.calibration_fraction * size))
        if n_calibration < 1 or n_calibration >= size:
            problems.append(
                f"calibration_fraction={params.calibration_fraction} gives {n_calibration} of {name}={size} images "
                "to the calibration split; both splits need at least one, so change either value"
            )
    if params.seed < 0:
        problems.append(f"seed={params.seed} must be at least 0")
    if params.layers_per_block < 1:
        problems.append(f"layers_per_block={params.layers_per_block} must be at least 1")
    channels = params.block_out_channels
    if not channels or min(channels) < 1:
        problems.append(f"block_out_channels={channels} must list at least one positive channel count")
    elif any(c % min(8, min(channels)) for c in channels):
        problems.append(f"block_out_channels={channels} must all be multiples of {min(8, min(channels))} (the GroupNorm groups)")
    if not 0.0 < params.beta_start < params.beta_end < 1.0:
        problems.append(f"beta_start={params.beta_start} and beta_end={params.beta_end} must satisfy 0 < beta_start < beta_end < 1")
    if not params.dataset.strip():
        problems.append("dataset is empty; give a MedMNIST name such as 'pneumoniamnist' or a path to an .npz file")
    elif not params.dataset.endswith(".npz") and ("/" in params.dataset or "." in params.dataset):
        problems.append(f"dataset={params.dataset!r} must be a MedMNIST name such as 'pneumoniamnist' or a path to an .npz file")
    if params.image_size < params.source_size and not params.dataset.endswith(".npz"):
        problems.append(f"image_size={params.image_size} is smaller than source_size={params.source_size}")

    steps = params.num_train_timesteps
    if not params.timesteps:
        problems.append("timesteps is empty; give at least one candidate t")
    for t in params.timesteps if params.ddim_stride >= 1 else []:
        if t < params.ddim_stride or t % params.ddim_stride or t >= steps:
            problems.append(f"timestep {t} in timesteps must be a positive multiple of ddim_stride={params.ddim_stride} below {steps}")
    for name in ("fcre_t", "secmi_t"):
        if not params.select_on_calibration and getattr(params, name) not in params.timesteps:
            problems.append(f"{name}={getattr(params, name)} must be one of timesteps={params.timesteps} when select_on_calibration is false")
    for name in ("naive_t", "pia_t", "sima_t"):
        if not 0 <= getattr(params, name) < steps:
            problems.append(f"{name}={getattr(params, name)} must be in [0, {steps})")
    for cutoff in [params.lowpass_cutoff, *params.lowpass_cutoffs]:
        if not 0.0 < cutoff < MAX_RADIUS:
            problems.append(f"low-pass cutoff {cutoff} must be in (0, {MAX_RADIUS:.4f}) (normalised radius, 1 = Nyquist); above it nothing is filtered")
    for name in ("timesteps", "lowpass_cutoffs"):
        values = getattr(params, name)
        if len(set(values)) != len(values):
            problems.append(f"{name}={values} lists a value twice; give each value once")
    for name in ("n_members", "n_nonmembers"):
        size = getattr(params, name)
        n_calibration = int(round(params.calibration_fraction * size))
        if 1 <= n_calibration < size and min(n_calibration, size - n_calibration) < 2:
            problems.append(
                f"{name}={size} with calibration_fraction={params.calibration_fraction} leaves a split with fewer than 2 images; "
                "the bootstrap intervals need at least 2 per split, so raise the set size"
            )
    if params.select_on_calibration and not params.lowpass_cutoffs:
        problems.append("lowpass_cutoffs is empty; give at least one cutoff")
    if params.history_every < 0:
        problems.append(f"history_every={params.history_every} must be 0 (no snapshots) or a number of epochs")
    if not 0.0 < params.ring_width < MAX_RADIUS:
        problems.append(f"ring_width={params.ring_width} must be in (0, {MAX_RADIUS:.4f}) (normalised radius)")
    edges = params.heatmap_edges
    if len(edges) < 2 or sorted(set(edges)) != edges or edges[0] < 0.0:
        problems.append(f"heatmap_edges={edges} must list at least two increasing values from 0 up")
    for stride in params.ablation_strides:
        if stride < 1 or any(t % stride for t in params.timesteps):
            problems.append(f"ablation stride {stride} must be a positive divisor of every t in timesteps={params.timesteps}")
    for size in params.ablation_member_sizes:
        if not 2 <= size < params.n_members:
            problems.append(f"ablation member-set size {size} must be in [2, n_members={params.n_members})")
    if params.bootstrap_resamples < 2:
        problems.append(f"bootstrap_resamples={params.bootstrap_resamples} must be at least 2; 1000 is usual")

    if params.select_on_calibration and not params.band_candidates:
        problems.append("band_candidates is empty; give at least one [low, high] band")
    bands = [[params.band_low, params.band_high], *params.band_candidates]
    for band in bands:
        if len(band) != 2 or not 0.0 <= band[0] < band[1] or band[0] >= MAX_RADIUS:
            problems.append(f"band {band} must be [low, high] with 0 <= low < high and low < {MAX_RADIUS:.4f} (normalised radius)")
    if params.mixed_precision not in ("no", "fp16", "bf16"):
        problems.append(f"mixed_precision={params.mixed_precision!r} must be 'no', 'fp16' or 'bf16'")
    if not 0.0 < params.ema_decay < 1.0:
        problems.append(f"ema_decay={params.ema_decay} must be in (0, 1)")

    if problems:
        raise ValueError("invalid parameters: " + "; ".join(problems))


def params_to_dict(params: Params) -> dict[str, Any]:
    """Return ``params`` as a plain dict of YAML-safe values."""
    return dataclasses.asdict(params)


def params_from_dict(values: dict[str, Any]) -> Params:
    """Build :class:`Params` from a dict such as a loaded ``params.yaml``, checking types."""
    types = _field_types()
    unknown = sorted(set(values) - set(types))
    if unknown:
        raise KeyError(f"unknown parameters {unknown}; this file was written by another version")
    return Params(**{name: _check_type(name, v, types[name]) for name, v in values.items()})
