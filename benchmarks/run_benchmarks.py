"""Measure training and scoring cost against plain reference loops, and write a benchmark record.

    FCRE_DATA_DIR=../shared/data .venv/bin/python benchmarks/run_benchmarks.py --out benchmarks/results

Every measurement uses the network shape of a preset (``quick`` by default), the weights of a
briefly trained model, and real PneumoniaMNIST images when the folder ``$FCRE_DATA_DIR`` contains them
(synthetic images otherwise, and the record names the source). It writes ``<out>/<name>.json`` and
``<out>/<name>.md``, refusing to replace an existing record, and renders the new record into
``docs/benchmarks.md``, which lists every record in ``<out>``.

1. Training: :func:`fcre_utils.training.train_ddpm` against a bare PyTorch loop with the same
   network, batch, optimizer, noise and steps (no EMA, no checkpoints, no accelerate), run
   alternately in this process. Target: at most 1.10 times the bare loop's time per step.
2. Scoring: images per second of each attack class with its batch size, and of
   :func:`fcre_utils.suite.run_suite`, against a per-image loop (batch size 1) of the same math.
   For the suite, that loop runs each candidate setting on its own, as the attack classes do.
   Target: the suite at least 5 times the per-image loop.
3. Network passes: a forward pre-hook counts every image that enters the UNet, and hashes each
   (input, timestep) pair. The suite must not evaluate the same input twice, nor more inputs
   than its attacks need when shared inversion trajectories and noised batches run once.
4. Scaling: the suite on growing image counts, each in a fresh process, with its wall time and
   peak resident memory (and peak CUDA memory on a GPU).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import datetime as dt
import hashlib
import json
import math
import multiprocessing
import os
import platform
import resource
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import psutil
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fcre_utils import attacks, data, models, training  # noqa: E402
from fcre_utils.presets import Params, resolve_params  # noqa: E402
from fcre_utils.reconstruction import ddim_invert, ddim_reverse, residual_roundtrip  # noqa: E402
from fcre_utils.runs import environment_record  # noqa: E402
from fcre_utils.suite import run_suite, suite_candidates  # noqa: E402

TRAINING_TARGET = 1.10  # at most this many times the bare loop's time per step
SUITE_TARGET = 5.0  # at least this many times the per-image loop's images per second
LINEAR_TOLERANCE = 0.10  # time is linear when no size deviates more than this from the fitted line
FLAT_TOLERANCE = 0.10  # memory is flat when, beyond the stored results, the peak grows less than this share of the smallest run's peak


# ---------------------------------------------------------------- machine and data

def describe_machine(params: Params) -> dict:
    """CPU, cores, memory and load, with the run environment record (threads, device, versions, commit)."""
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if line.startswith("model name")]
        cpu = names[0] if names else cpu
    environment = environment_record(params)
    return {
        "cpu": cpu,
        "logical_cores": os.cpu_count(),
        "physical_cores": psutil.cpu_count(logical=False),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        **{key: environment[key] for key in ("torch_threads", "device", "python", "platform", "packages", "git_commit", "git_uncommitted_changes")},
    }


def synthetic_images(n: int, size: int, seed: int = 0) -> np.ndarray:
    """Distinct uint8 images (n, size, size): a smooth bright blob on a dark noisy background."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    images = []
    for _ in range(n):
        cx, cy = rng.uniform(0.2, 0.8, 2)
        width = rng.uniform(0.05, 0.2)
        blob = np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * width**2))
        images.append(np.clip(200 * blob + rng.normal(0, 8, (size, size)) + 30, 0, 255).astype(np.uint8))
    return np.stack(images)


def load_images(params: Params, n: int) -> tuple[torch.Tensor, dict]:
    """Return ``n`` model-ready images and a description of where they came from.

    Real PneumoniaMNIST when the folder ``$FCRE_DATA_DIR`` contains it, else synthetic
    images; nothing is downloaded.
    """
    root = data.find_data_dir()
    names = [f"{params.dataset}_union_{params.source_size}.npz", f"{params.dataset}.npz", f"{params.dataset}_{params.source_size}.npz"]
    found = [root / name for name in names if root is not None and (root / name).is_file()]
    if found:
        images, _ = data.read_medmnist_file(found[0])
        if len(images) < n:
            raise ValueError(f"{found[0]} contains {len(images)} images but the benchmark needs {n}; lower the sizes")
        source = {"kind": "real", "path": str(found[0]), "sha256": data.file_sha256(found[0])}
        return data.to_model_tensor(images[:n], params.image_size), source
    source = {"kind": "synthetic", "reason": f"no {names[0]} in ${data.DATA_DIR_VARIABLE}"}
    return data.to_model_tensor(synthetic_images(n, params.source_size), params.image_size), source


# ---------------------------------------------------------------- training

def bare_training(unet, scheduler, members: torch.Tensor, params: Params, epochs: int, device: torch.device) -> tuple[float, list[float]]:
    """Train with a plain loop: shuffled batches, noise at uniform timesteps, AdamW; return seconds and losses."""
    torch.manual_seed(params.seed)
    generator = torch.Generator().manual_seed(params.seed)
    unet = unet.to(device).train()
    members = members.to(device)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=params.learning_rate)
    num_timesteps = scheduler.config.num_train_timesteps
    losses = []

    start = time.perf_counter()
    for _ in range(epochs):
        order = torch.randperm(len(members), generator=generator).to(device)
        total = torch.zeros((), device=device)
        for begin in range(0, len(members), params.batch_size):
            x0 = members[order[begin : begin + params.batch_size]]
            noise = torch.randn_like(x0)
            t = torch.randint(0, num_timesteps, (len(x0),), device=device)
            loss = F.mse_loss(unet(scheduler.add_noise(x0, noise, t), t).sample, noise)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            total += loss.detach() * len(x0)
        losses.append((total / len(members)).item())
    return time.perf_counter() - start, losses


def project_training(members: torch.Tensor, params: Params, epochs: int) -> tuple[float, float, object]:
    """Train with train_ddpm; return the loop's seconds, the whole call's seconds and the EMA model."""
    params = dataclasses.replace(params, epochs=epochs, checkpoint_every=epochs, progress=False)
    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        model, loss_log = training.train_ddpm(models.build_unet(params), models.build_scheduler(params), members, params, Path(folder) / "model")
        call = time.perf_counter() - start
    return float(loss_log.seconds.iloc[-1]), call, model


def benchmark_training(members: torch.Tensor, params: Params, epochs: int, repeats: int) -> tuple[dict, object]:
    """Time train_ddpm and the bare loop alternately; return the record and a trained EMA model."""
    device = models.pick_device()
    steps = epochs * math.ceil(len(members) / params.batch_size)
    project_training(members, params, 1)  # warm-up: first-call costs of both loops stay out of the timings
    bare_training(models.build_unet(params), models.build_scheduler(params), members, params, 1, device)

    runs, model = [], None
    for repeat in range(repeats):
        order = ("project", "bare") if repeat % 2 == 0 else ("bare", "project")
        row = {}
        for name in order:
            if name == "project":
                row["project_loop_s"], row["project_call_s"], model = project_training(members, params, epochs)
            else:
                row["bare_s"], _ = bare_training(models.build_unet(params), models.build_scheduler(params), members, params, epochs, device)
        runs.append(row)
        print(f"training repeat {repeat + 1}/{repeats}: project loop {row['project_loop_s']:.2f} s, bare {row['bare_s']:.2f} s", flush=True)

    # Each ratio pairs runs made one after the other, so a slow drift of the machine's load cancels.
    ratio = statistics.median(r["project_loop_s"] / r["bare_s"] for r in runs)
    record = {
        "members": len(members), "batch_size": params.batch_size, "epochs": epochs, "steps": steps, "repeats": runs,
        "project_ms_per_step": 1000 * statistics.median(r["project_loop_s"] for r in runs) / steps,
        "project_call_ms_per_step": 1000 * statistics.median(r["project_call_s"] for r in runs) / steps,
        "bare_ms_per_step": 1000 * statistics.median(r["bare_s"] for r in runs) / steps,
        "ratio": ratio, "ratio_with_setup_and_checkpoint": statistics.median(r["project_call_s"] / r["bare_s"] for r in runs),
        "target": TRAINING_TARGET, "met": ratio <= TRAINING_TARGET,
    }
    return record, model


# ---------------------------------------------------------------- network passes

class PassCounter:
    """Count the images entering a network's forward, and the distinct (input, timestep) pairs among them."""

    def __init__(self, module: torch.nn.Module):
        self.images = 0
        self.distinct: set[bytes] = set()
        self._handle = module.register_forward_pre_hook(self._count)

    def _count(self, module, args) -> None:
        sample, timestep = args[0], args[1]
        steps = torch.as_tensor(timestep).flatten().cpu()
        if steps.numel() == 1:
            steps = steps.expand(len(sample))
        pixels = sample.detach().cpu().contiguous().numpy()
        self.images += len(sample)
        for image, step in zip(pixels, steps.tolist()):
            self.distinct.add(hashlib.blake2b(image.tobytes() + int(step).to_bytes(8, "little"), digest_size=16).digest())

    def close(self) -> None:
        self._handle.remove()


def timed(function, *args):
    """Return ``(result, seconds)`` of one call."""
    start = time.perf_counter()
    result = function(*args)
    return result, time.perf_counter() - start


# ---------------------------------------------------------------- scoring: attack classes

def attack_list(params: Params) -> list:
    """Return every attack class at the preset's fixed settings, with the suite's batch size."""
    size = params.score_batch_size
    return [
        attacks.NaiveLossAttack(t=params.naive_t, draws=params.naive_draws, seed=params.seed, batch_size=size),
        attacks.NaiveLossAttack(t=params.naive_t, draws=params.naive_draws, seed=params.seed, cutoff=params.lowpass_cutoff, batch_size=size),
        attacks.SecMIAttack(t=params.secmi_t, stride=params.ddim_stride, batch_size=size),
        attacks.SecMIAttack(t=params.secmi_t, stride=params.ddim_stride, cutoff=params.lowpass_cutoff, batch_size=size),
        attacks.PIAAttack(t=params.pia_t, batch_size=size),
        attacks.PIAAttack(t=params.pia_t, cutoff=params.lowpass_cutoff, batch_size=size),
        attacks.PIAAttack(t=params.pia_t, normalized=True, batch_size=size),
        attacks.SimAAttack(t=params.sima_t, batch_size=size),
        attacks.FCREAttack(t=params.fcre_t, stride=params.ddim_stride, protocol="x0", low=params.band_low, high=params.band_high, batch_size=size),
        attacks.FCREAttack(t=params.fcre_t, stride=params.ddim_stride, protocol="residual", low=params.band_low, high=params.band_high, batch_size=size),
    ]


def benchmark_attacks(unet, alphas_cumprod, images: torch.Tensor, n_reference: int, params: Params) -> list[dict]:
    """Images per second of each attack batched and image by image, with its measured NFE."""
    rows = []
    for attack in attack_list(params):
        counter = PassCounter(unet)
        scores, seconds = timed(attack.score, unet, alphas_cumprod, images)
        measured_nfe = counter.images / len(images)
        counter.close()

        single = dataclasses.replace(attack, batch_size=1)
        reference, reference_seconds = timed(lambda: np.concatenate([single.score(unet, alphas_cumprod, images[i : i + 1]) for i in range(n_reference)]))
        # The naive attack draws its noise per call, so image by image it meets other noise.
        same = None if isinstance(attack, attacks.NaiveLossAttack) else bool(np.allclose(scores[:n_reference], reference, rtol=1e-4, atol=1e-7))
        rows.append({
            "attack": attack.name, "t": attack.t, "nfe_declared": attack.nfe, "nfe_measured": measured_nfe,
            "images_per_s": len(images) / seconds, "reference_images_per_s": n_reference / reference_seconds,
            "ratio": (len(images) / seconds) / (n_reference / reference_seconds), "scores_match_reference": same,
        })
        print(f"{attack.name} t={attack.t}: {rows[-1]['images_per_s']:.1f} images/s, {rows[-1]['ratio']:.1f}x the per-image loop", flush=True)
    return rows


# ---------------------------------------------------------------- scoring: the suite

def benchmark_manifest(n: int, n_members_available: int) -> pd.DataFrame:
    """Half members (images the model trained on), half non-members; every fourth image calibrates."""
    index = np.arange(n)
    member = index % 2 == 0
    if member.sum() > n_members_available:
        raise ValueError(f"{n} images need {member.sum()} members but the model trained on {n_members_available}; lower the sizes")
    return pd.DataFrame({"image_id": index, "member": member, "split": np.where(index % 4 < 2, "calibration", "evaluation")})


def suite_images(members: torch.Tensor, others: torch.Tensor, n: int) -> torch.Tensor:
    """Interleave members and non-members to match :func:`benchmark_manifest`."""
    if (n + 1) // 2 > len(members) or n // 2 > len(others):
        raise ValueError(f"{n} images need {(n + 1) // 2} members and {n // 2} non-members, but there are {len(members)} and {len(others)}; "
                         "lower the sizes or raise --train-members")
    images = torch.empty((n, *members.shape[1:]))
    images[0::2] = members[: (n + 1) // 2]
    images[1::2] = others[: n // 2]
    return images


def reference_suite_image(unet, alphas_cumprod, image: torch.Tensor, params: Params) -> None:
    """Score one image with every candidate setting of the suite, each setting on its own (batch size 1)."""
    families, cutoffs, fcre_timesteps, bands = suite_candidates(params)
    stride = params.ddim_stride
    settings = []
    for t in families["naive"]:
        settings += [attacks.NaiveLossAttack(t=t, draws=params.naive_draws, seed=params.seed, cutoff=c, batch_size=1) for c in [None, *cutoffs]]
    for t in families["secmi"]:
        settings += [attacks.SecMIAttack(t=t, stride=stride, cutoff=c, batch_size=1) for c in [None, *cutoffs]]
    for t in families["pia"]:
        settings += [attacks.PIAAttack(t=t, cutoff=c, batch_size=1) for c in [None, *cutoffs]]
        settings.append(attacks.PIAAttack(t=t, normalized=True, batch_size=1))
    settings += [attacks.SimAAttack(t=t, batch_size=1) for t in families["sima"]]
    for attack in settings:
        attack.score(unet, alphas_cumprod, image)

    # FCRE: one reconstruction per protocol and t; every band and both metrics are read from it.
    image = image.to(next(unet.parameters()).device)
    with torch.inference_mode():
        for t in fcre_timesteps:
            x_t = ddim_invert(unet, image, t, stride, alphas_cumprod)[t]
            pairs = [(image, ddim_reverse(unet, x_t, t, stride, alphas_cumprod)[-1]), (x_t, residual_roundtrip(unet, x_t, t, stride, alphas_cumprod))]
            for original, reconstruction in pairs:
                for low, high in bands:
                    attacks.band_similarity(original.cpu(), reconstruction.cpu(), low, high)


def distinct_needs(params: Params) -> int:
    """Count the distinct network inputs per image that the suite's candidate settings need.

    Each input is named by the state it evaluates and its timestep, so work that two attacks
    share is counted once. Shared are the DDIM inversion of x0 to the largest t, which passes
    through every smaller t, and the reverse process from each t. The residual round trip steps
    back up from the first reverse state with the prediction the reverse process makes there.
    PIA's ``eps_theta(x0, 0)`` is the inversion's first input, and both naive variants read one
    noised batch per draw.
    """
    families, _, _, _ = suite_candidates(params)
    stride, largest = params.ddim_stride, max(params.timesteps)
    inputs = {("x0", 0)} | {("inverted", s) for s in range(stride, largest, stride)}
    for t in params.timesteps:
        inputs.add(("inverted", t))  # the first reverse step
        inputs |= {(f"reverse from {t}", s) for s in range(stride, t, stride)}
        inputs.add((f"reverse from {t}", t - stride))  # the round trip's step back up (timestep 0 when t = stride)
    inputs |= {(f"naive draw {d}", t) for t in families["naive"] for d in range(params.naive_draws)}
    inputs |= {("x0", 0)} | {(f"{name} start", t) for t in families["pia"] for name in ("pia", "pian")}
    inputs |= {("x0", t) for t in families["sima"]}
    return len(inputs)


def benchmark_suite(unet, alphas_cumprod, images: torch.Tensor, manifest: pd.DataFrame, n_reference: int, params: Params) -> dict:
    """Images per second of run_suite against the per-image loop, and its network passes."""
    counter = PassCounter(unet)
    result, seconds = timed(run_suite, unet, alphas_cumprod, images, manifest, params)
    passes, distinct = counter.images / len(images), len(counter.distinct) / len(images)
    counter.close()
    print(f"suite: {len(images) / seconds:.2f} images/s on {len(images)} images, {passes:.1f} passes per image", flush=True)

    counter = PassCounter(unet)
    _, reference_seconds = timed(lambda: [reference_suite_image(unet, alphas_cumprod, images[i : i + 1], params) for i in range(n_reference)])
    reference_passes = counter.images / n_reference
    counter.close()

    rate, reference_rate = len(images) / seconds, n_reference / reference_seconds
    needs = distinct_needs(params)
    print(f"suite reference: {reference_rate:.3f} images/s, {reference_passes:.0f} passes per image", flush=True)
    return {
        "images": len(images), "reference_images": n_reference, "candidate_settings": len(result.selection),
        "images_per_s": rate, "reference_images_per_s": reference_rate, "ratio": rate / reference_rate,
        "target": SUITE_TARGET, "met": rate / reference_rate >= SUITE_TARGET,
        "passes_per_image": passes, "distinct_inputs_per_image": distinct, "distinct_needs_per_image": needs,
        "reported_passes_per_image": result.baseline_passes + result.reconstruction_passes,
        "reference_passes_per_image": reference_passes,
        "passes_met": passes <= needs and passes == distinct,
    }


# ---------------------------------------------------------------- scaling

def scaling_child(model_dir: str, n: int, n_members: int, preset: str, threads: int | None, batch_size: int) -> dict:
    """Run the suite on ``n`` images, ``batch_size`` per batch, in this (fresh) process; return its time and peak memory."""
    if threads:
        torch.set_num_threads(threads)
    params = resolve_params(preset, {"progress": False, "score_batch_size": batch_size})
    unet, scheduler = models.load_model(model_dir)
    images, _ = load_images(params, n_members + n)
    manifest = benchmark_manifest(n, n_members)
    batch = suite_images(images[:n_members], images[n_members:], n)
    baseline_mb = psutil.Process().memory_info().rss / 2**20
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()

    with RssSampler() as sampler:
        _, seconds = timed(run_suite, unet, scheduler.alphas_cumprod, batch, manifest, params)
    return {
        "images": n, "seconds": seconds, "seconds_per_image": seconds / n, "rss_before_mb": baseline_mb,
        "suite_peak_rss_mb": sampler.peak_mb,
        "process_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # kilobytes on Linux
        "peak_cuda_mb": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None,
    }


class RssSampler:
    """Sample this process's resident memory every 5 ms in a thread and keep the maximum.

    NOTE: a peak shorter than the interval can be missed; ``ru_maxrss`` never misses one but
    also covers the imports and loading before the suite.
    """

    def __init__(self, interval_s: float = 0.005):
        self.interval_s = interval_s
        self.peak_mb = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        process = psutil.Process()
        while not self._stop.is_set():
            self.peak_mb = max(self.peak_mb, process.memory_info().rss / 2**20)
            self._stop.wait(self.interval_s)

    def __enter__(self) -> "RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def benchmark_scaling(model_dir: Path, sizes: list[int], n_members: int, preset: str, threads: int | None, batch_size: int, params: Params) -> dict:
    """Run :func:`scaling_child` once per size, each in a new process, and fit time = a + b n."""
    rows = []
    for n in sizes:
        with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
            rows.append(pool.submit(scaling_child, str(model_dir), n, n_members, preset, threads, batch_size).result())
        print(f"scaling: {n} images in {rows[-1]['seconds']:.1f} s, peak RSS {rows[-1]['suite_peak_rss_mb']:.0f} MB", flush=True)

    counts = np.array([row["images"] for row in rows], dtype=float)
    seconds = np.array([row["seconds"] for row in rows])
    slope, intercept = np.polyfit(counts, seconds, 1)
    deviation = float(np.max(np.abs(seconds - (intercept + slope * counts)) / seconds))

    # Each image keeps its reconstructions: x0, eps_0 and three states per t, in float32.
    stored_mb_per_image = (2 + 3 * len(params.timesteps)) * params.image_size**2 * 4 / 2**20
    peaks = np.array([row["suite_peak_rss_mb"] for row in rows])
    extra_growth = float(peaks[-1] - peaks[0] - stored_mb_per_image * (counts[-1] - counts[0]))
    return {
        "batch_size": batch_size,
        "runs": rows,
        "time_fit": {"seconds_per_image": slope, "intercept_s": intercept, "max_relative_deviation": deviation,
                     "target": LINEAR_TOLERANCE, "met": deviation <= LINEAR_TOLERANCE},
        "memory_fit": {"peak_rss_mb_per_image": float(np.polyfit(counts, peaks, 1)[0]), "stored_results_mb_per_image": stored_mb_per_image,
                       "peak_rss_growth_mb": float(peaks[-1] - peaks[0]), "growth_beyond_stored_results_mb": extra_growth,
                       "target": FLAT_TOLERANCE, "met": bool(extra_growth <= FLAT_TOLERANCE * peaks[0])},
    }


# ---------------------------------------------------------------- record

def write_record(record: dict, out: Path, docs: Path | None) -> Path:
    """Write ``<out>/<name>.json`` and ``.md`` (never replacing a record) and render ``docs``."""
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / f"{record['name']}.json", out / f"{record['name']}.md"
    for path in (json_path, md_path):
        if path.exists():
            raise FileExistsError(f"{path} already exists and is kept; choose another --name")
    json_path.write_text(json.dumps(record, indent=2, default=_plain) + "\n")
    body = render(record)
    md_path.write_text(body)
    if docs is not None:
        listing = sorted(path.stem for path in out.glob("*.json"))
        relative = os.path.relpath(out, docs.parent)
        docs.write_text(DOCS_HEADER + body + "\n## Every record\n\n" + "".join(f"- [{name}]({relative}/{name}.md)\n" for name in listing))
        print(f"{docs} now shows {record['name']}; earlier records stay in {out}", flush=True)
    return json_path


def _plain(value):
    """Convert numpy scalars, which json cannot write, to Python numbers and booleans."""
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


DOCS_HEADER = """# Benchmarks

What the package costs next to plain PyTorch loops, measured by `benchmarks/run_benchmarks.py`:

```bash
FCRE_DATA_DIR=../shared/data .venv/bin/python benchmarks/run_benchmarks.py --out benchmarks/results
```

Every run writes a new record (`benchmarks/results/<name>.json` and `.md`) and this page shows
the newest. The flags set the sizes (`--help` lists them); the defaults took 3.7 minutes on 2
lightly loaded CPU cores. Timings from a machine shared with other jobs are slower and noisier,
so the record keeps the load average at the start and at the end.

How each number is measured:

- **Training**: `train_ddpm` and a bare loop (same network, batch, AdamW, noise and steps; no EMA,
  no checkpoints, no accelerate) run alternately in one process. The ratio is the median over
  the pairs of runs of the training loops' times; the second ratio adds `train_ddpm`'s setup and
  its final checkpoint.
- **Attacks**: each attack class scores the images with its batch size, and then image by image
  with batch size 1 (the per-image loop). The measured NFE counts the images that enter the UNet.
- **Suite**: `run_suite` (reconstructions included) against a per-image loop that runs every
  candidate setting on its own, as the attack classes do; FCRE reconstructs once per protocol and
  t and reads every band from it. Passes are counted by a forward pre-hook that also hashes each
  (input, timestep) pair, so "distinct inputs" shows whether any input was evaluated twice.
  "Distinct needs" counts what the candidates need when the DDIM trajectory and the noised
  batches run once.
- **Scaling**: the suite on growing image counts, each in a fresh process with a batch size below
  the smallest count, and the peak resident memory a thread samples every 5 ms during the suite.
  The suite keeps every image's reconstructions, so memory grows by "stored results" per image.
  The network runs batch by batch and SSIM 64 images at a time, so nothing else should grow once
  the calibration half of the images fills an SSIM chunk (128 images or more).
  Time counts as linear when no size deviates more than 10% from the fitted line, and memory as
  flat when the peak grows, beyond the stored results, by less than 10% of the smallest run's.

"""


def render(record: dict) -> str:
    """Format a record as markdown."""
    machine, train, suite = record["machine"], record["training"], record["suite"]
    time_fit, memory_fit = record["scaling"]["time_fit"], record["scaling"]["memory_fit"]
    lines = [
        f"## Record `{record['name']}`", "",
        f"Created {record['created_utc']} by `{' '.join(record['command'])}` in {record['total_seconds'] / 60:.1f} min"
        + (f". Note: {record['note']}" if record.get("note") else "") + ".", "",
        "| machine | |", "| --- | --- |",
        f"| CPU | {machine['cpu']} ({machine['physical_cores']} physical, {machine['logical_cores']} logical cores) |",
        f"| torch threads | {machine['torch_threads']} |",
        f"| device | {machine['device']}" + (f" ({machine['gpu']})" if machine["gpu"] else "") + " |",
        f"| memory | {machine['memory_gb']} GB |",
        f"| load average (1, 5, 15 min) | start {machine['load_average_at_start']}, end {machine['load_average_at_end']} |",
        f"| packages | " + ", ".join(f"{k} {v}" for k, v in machine["packages"].items()) + f", Python {machine['python']} |",
        f"| commit | {machine['git_commit']}" + (" (with uncommitted changes)" if machine["git_uncommitted_changes"] is True else "") + " |",
        f"| model | preset `{record['settings']['preset']}`: {record['settings']['image_size']} px, channels {record['settings']['block_out_channels']}, {record['settings']['parameters']:,} parameters |",
        f"| data | {record['data']['kind']}" + (f" (`{Path(record['data']['path']).name}`)" if record["data"]["kind"] == "real" else "") + " |",
        "",
        "### Summary", "",
        "| measurement | value | target | met |", "| --- | --- | --- | --- |",
        f"| training time per step, `train_ddpm` / bare loop | {train['ratio']:.3f} | at most {train['target']:.2f} | {_yes(train['met'])} |",
        f"| suite images per second / per-image loop | {suite['ratio']:.1f} | at least {suite['target']:.0f} | {_yes(suite['met'])} |",
        f"| suite UNet passes per image / distinct needs | {suite['passes_per_image']:.1f} / {suite['distinct_needs_per_image']} "
        f"(distinct inputs {suite['distinct_inputs_per_image']:.1f}) | passes <= needs, no input twice | {_yes(suite['passes_met'])} |",
        f"| suite time, largest deviation from a line through the sizes | {time_fit['max_relative_deviation']:.1%} | at most {time_fit['target']:.0%} | {_yes(time_fit['met'])} |",
        f"| suite peak RSS growth over the sizes, beyond the stored results | {memory_fit['growth_beyond_stored_results_mb']:.0f} MB "
        f"| at most {memory_fit['target']:.0%} of the smallest peak | {_yes(memory_fit['met'])} |",
        "",
        "### Training", "",
        f"{train['members']} members, batch {train['batch_size']}, {train['epochs']} epochs ({train['steps']} steps) per run, "
        f"{len(train['repeats'])} runs of each loop. Medians: `train_ddpm` {train['project_ms_per_step']:.1f} ms per step "
        f"({train['project_call_ms_per_step']:.1f} ms with setup and the final checkpoint), bare loop {train['bare_ms_per_step']:.1f} ms; "
        f"median ratio of the paired runs {train['ratio']:.3f} ({train['ratio_with_setup_and_checkpoint']:.3f} with setup and checkpoint).", "",
        "### Attacks", "",
        f"{record['attack_images']} images batched, {record['reference_images']} image by image.", "",
        pd.DataFrame(record["attacks"]).to_markdown(index=False, floatfmt=".2f"), "",
        "### Suite", "",
        f"{suite['images']} images, {suite['candidate_settings']} candidate settings; per-image loop on {suite['reference_images']} images.", "",
        f"- `run_suite`: {suite['images_per_s']:.2f} images/s; per-image loop: {suite['reference_images_per_s']:.3f} images/s; ratio {suite['ratio']:.1f}.",
        f"- UNet passes per image: {suite['passes_per_image']:.1f} counted, {suite['distinct_inputs_per_image']:.1f} distinct inputs, "
        f"{suite['distinct_needs_per_image']} distinct needs, {suite['reported_passes_per_image']:.1f} reported by `SuiteResult`; "
        f"the per-image loop runs {suite['reference_passes_per_image']:.0f}.", "",
        "### Scaling", "",
        f"`run_suite` with {record['scaling']['batch_size']} images per batch, each size in a fresh process.", "",
        pd.DataFrame(record["scaling"]["runs"]).to_markdown(index=False, floatfmt=".2f"), "",
        f"Time fit: {time_fit['seconds_per_image']:.3f} s per image, intercept {time_fit['intercept_s']:.2f} s, "
        f"largest deviation from the line {time_fit['max_relative_deviation']:.1%}. "
        f"Peak RSS during the suite grows {memory_fit['peak_rss_mb_per_image']:.3f} MB per image "
        f"({memory_fit['peak_rss_growth_mb']:.0f} MB over the sizes); the stored reconstructions take "
        f"{memory_fit['stored_results_mb_per_image']:.3f} MB per image.", "",
    ]
    return "\n".join(lines)


def _yes(flag: bool) -> str:
    return "yes" if flag else "**no**"


# ---------------------------------------------------------------- command line

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results", help="folder of the records (default: benchmarks/results)")
    parser.add_argument("--docs", type=Path, default=ROOT / "docs" / "benchmarks.md", help="markdown page that shows the newest record")
    parser.add_argument("--no-docs", action="store_true", help="write the record only, leave the docs page as it is")
    parser.add_argument("--name", default=None, help="record name (default: bench-<UTC time>)")
    parser.add_argument("--note", default="", help="free text stored with the record, such as why it was run")
    parser.add_argument("--preset", default="quick", help="preset whose network shape and settings are measured (default: quick)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--train-members", type=int, default=128, help="training images (default: 128, the quick preset's members)")
    parser.add_argument("--train-epochs", type=int, default=6, help="epochs per timed training run (default: 6)")
    parser.add_argument("--train-repeats", type=int, default=5, help="timed runs of each training loop (default: 5)")
    parser.add_argument("--attack-images", type=int, default=128, help="images each attack class scores batched (default: 128)")
    parser.add_argument("--suite-images", type=int, default=128, help="images the suite scores (default: 128)")
    parser.add_argument("--reference-images", type=int, default=4, help="images of every per-image loop (default: 4)")
    parser.add_argument("--sizes", default="128,192,256",
                        help="image counts of the scaling runs, comma-separated; from 128 on, the 64 calibration images fill an SSIM chunk (default: 128,192,256)")
    parser.add_argument("--scaling-batch-size", type=int, default=32,
                        help="score_batch_size of the scaling runs, below the smallest size so memory can stay flat (default: 32)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    name = args.name or dt.datetime.now(dt.timezone.utc).strftime("bench-%Y%m%d-%H%M%S")
    if (args.out / f"{name}.json").exists():
        raise FileExistsError(f"{args.out / f'{name}.json'} already exists and is kept; choose another --name")
    sizes = sorted(int(size) for size in args.sizes.split(","))
    largest = max([args.attack_images, args.suite_images, *sizes])
    if (largest + 1) // 2 > args.train_members:
        raise ValueError(f"{largest} images are half members, but --train-members={args.train_members}; raise it to {(largest + 1) // 2} or lower the sizes")
    params = resolve_params(args.preset, {"progress": False})
    started = time.perf_counter()
    machine = describe_machine(params)

    # The members come first; the images after them never enter training (non-members).
    n_others = max([args.attack_images, args.suite_images, *sizes])
    images, source = load_images(params, args.train_members + n_others)
    members, others = images[: args.train_members], images[args.train_members :]

    train_record, model = benchmark_training(members, params, args.train_epochs, args.train_repeats)
    device = models.pick_device()
    unet = model.to(device).eval()
    alphas_cumprod = models.build_scheduler(params).alphas_cumprod

    attack_rows = benchmark_attacks(unet, alphas_cumprod, suite_images(members, others, args.attack_images), args.reference_images, params)
    manifest = benchmark_manifest(args.suite_images, args.train_members)
    suite_record = benchmark_suite(unet, alphas_cumprod, suite_images(members, others, args.suite_images), manifest, args.reference_images, params)

    with tempfile.TemporaryDirectory() as folder:
        models.save_model(model, models.build_scheduler(params), Path(folder) / "model")
        scaling = benchmark_scaling(Path(folder) / "model", sizes, args.train_members, args.preset, args.threads, args.scaling_batch_size, params)

    machine["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    record = {
        "name": name, "note": args.note, "created_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": [Path(sys.executable).name, *sys.argv], "total_seconds": time.perf_counter() - started,
        "machine": machine, "data": source,
        "settings": {"preset": args.preset, "image_size": params.image_size, "block_out_channels": params.block_out_channels,
                     "parameters": models.count_parameters(model), "timesteps": params.timesteps, "ddim_stride": params.ddim_stride,
                     "score_batch_size": params.score_batch_size, "naive_draws": params.naive_draws},
        "training": train_record, "attack_images": args.attack_images, "reference_images": args.reference_images,
        "attacks": attack_rows, "suite": suite_record, "scaling": scaling,
    }
    path = write_record(record, args.out, None if args.no_docs else args.docs)
    print(f"wrote {path} in {record['total_seconds'] / 60:.1f} min", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
