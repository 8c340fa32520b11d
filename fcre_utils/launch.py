"""Command line for several processes or GPUs: train a run's models and score its images.

Run it under ``accelerate launch``, which starts one process per GPU (or CPU worker)::

    accelerate launch --multi_gpu --num_processes 4 -m fcre_utils.launch train --run-dir DIR --preset paper
    accelerate launch --multi_gpu --num_processes 4 -m fcre_utils.launch score --run-dir DIR

``train`` creates the run directory as notebook 01 does (parameters, environment, manifests) and
trains the model and, with ``train_control``, the control model. ``score`` writes what notebooks
02 and 04 write except the figures: the cached reconstructions, the selection, score and metrics
tables of both models, and ``summary.md``. Only the main process writes files.

``batch_size`` is the batch of each process (see :mod:`fcre_utils.training`). On a machine
without GPUs, accelerate 1.16's ``--cpu`` flag starts one process unless mpirun is installed
(``--mpirun_hostfile``). ``--multi_gpu`` with the environment variable ``ACCELERATE_USE_CPU=true``
starts several CPU processes, which then communicate over gloo.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from accelerate import Accelerator

from . import distributed, metrics, models, runs, training
from .presets import Params, preset_names, resolve_params
from .reconstruction import Reconstructions
from .runner import absolute_paths, parse_overrides, prepare_run_dir, write_summary

SCORE_FILES = ("selection.csv", "scores.csv", "metrics.csv", "metrics.md")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="accelerate launch -m fcre_utils.launch", description="train and score a run on several processes")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="create a run directory and train its model and control model")
    train.add_argument("--run-dir", required=True, help="new or empty directory for the run; with --resume, the run to continue")
    train.add_argument("--preset", default=None, help=f"parameter set: {', '.join(preset_names())} (default: quick)")
    train.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override one parameter; the value is read as YAML (repeatable)")
    train.add_argument("--resume", action="store_true", help="continue the interrupted training of the run in --run-dir")

    score = commands.add_parser("score", help="reconstruct and attack the images of a trained run")
    score.add_argument("--run-dir", required=True, help="run directory trained by the train command or notebook 01")
    return parser


def train(run_dir: Path, preset: str | None, overrides: list[str], resume: bool) -> None:
    """Create the run (unless resuming) and train its models; see the module docstring."""
    if resume:
        if preset or overrides:
            raise ValueError("--resume continues the run with the parameters in its params.yaml, so leave out --preset and --set")
        params = runs.load_run(run_dir)
    else:
        preset = preset or "quick"
        values = absolute_paths(parse_overrides(overrides))
        params = resolve_params(preset, values)
        prepare_run_dir(run_dir, preset)  # every process checks the folder before the main process writes to it
    accelerator = Accelerator(mixed_precision=params.mixed_precision)
    accelerator.wait_for_everyone()
    if not resume and accelerator.is_main_process:
        runs.start_run(run_dir, preset, values)
        runs.create_manifest(run_dir, params)
    accelerator.wait_for_everyone()

    manifest, images = runs.load_split_images(run_dir, params)
    members = images[runs.rows(manifest, member=True)]
    _train_one(accelerator, params, members, run_dir, "", resume)
    if params.train_control:
        _train_one(accelerator, params, runs.load_control_images(run_dir, params), run_dir, "control_", resume)


def _train_one(accelerator: Accelerator, params: Params, images, run_dir: Path, prefix: str, resume: bool) -> None:
    scheduler = models.build_scheduler(params)
    _, loss_log = training.train_ddpm(models.build_unet(params), scheduler, images, params, run_dir / f"{prefix}model", resume=resume)
    if accelerator.is_main_process:
        # a resumed log repeats every earlier epoch, so it may replace the one of an earlier attempt
        runs.atomic_write_text(run_dir / f"{prefix}training_log.csv", loss_log.to_csv(index=False), overwrite=resume)


def score(run_dir: Path) -> None:
    """Reconstruct and attack the run's images with its model(s); see the module docstring."""
    params = runs.load_run(run_dir)
    prefixes = ["", "control_"] if params.train_control else [""]
    existing = [run_dir / f"{prefix}{name}" for prefix in prefixes for name in SCORE_FILES if (run_dir / f"{prefix}{name}").exists()]
    if existing:
        raise FileExistsError(f"{str(existing[0])!r} already exists, so this run was scored already; its files are kept, start a new run to score again")

    accelerator = Accelerator(mixed_precision=params.mixed_precision)
    manifest, images = runs.load_split_images(run_dir, params)
    for prefix in prefixes:
        unet, scheduler = models.load_model(run_dir / f"{prefix}model", device=accelerator.device)
        recon = _reconstructions(accelerator, run_dir / f"{prefix}reconstructions.pt", unet, scheduler.alphas_cumprod, images, params)
        result = distributed.run_suite_sharded(accelerator, unet, scheduler.alphas_cumprod, images, manifest, params, recon)
        if accelerator.is_main_process:
            table = metrics.attack_table(result.scores, params.bootstrap_resamples, params.seed)
            runs.write_table(result.selection, run_dir / f"{prefix}selection.csv")
            runs.write_table(result.scores, run_dir / f"{prefix}scores.csv")
            runs.write_table(table, run_dir / f"{prefix}metrics.csv")
            runs.atomic_write_text(run_dir / f"{prefix}metrics.md", metrics.format_table(table).to_markdown(index=False) + "\n")
    if accelerator.is_main_process:
        write_summary(run_dir)


def _reconstructions(accelerator: Accelerator, path: Path, unet, alphas_cumprod, images, params: Params) -> Reconstructions:
    """Load the cached reconstructions at ``path``, or compute them on every process and save them."""
    if path.is_file():
        recon = Reconstructions.from_dict(runs.load_tensors(path))
        if len(recon.x0) != len(images):
            raise ValueError(f"{str(path)!r} contains {len(recon.x0)} images but the manifest lists {len(images)}; start a new run directory")
        return recon
    recon = distributed.reconstruct_sharded(accelerator, unet, images, params, alphas_cumprod)
    if accelerator.is_main_process:
        runs.save_tensors(recon.to_dict(), path)
    return recon


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    runs.configure_logging()
    try:
        if args.command == "train":
            train(Path(args.run_dir), args.preset, args.overrides, args.resume)
        else:
            score(Path(args.run_dir))
    except (KeyError, TypeError, ValueError, FileExistsError, FileNotFoundError) as error:
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        print(f"error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
