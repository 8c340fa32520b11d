"""Command line: ``python -m fcre_utils run --preset NAME [--set key=value ...] [--run-dir DIR]``.

``python -m fcre_utils run --resume DIR`` continues an interrupted or failed run.
``python -m fcre_utils sweep GRID.yaml [--out DIR]`` runs the series once per point of a parameter
grid (see :mod:`fcre_utils.sweeps`); ``sweep --resume OUT`` continues a sweep.
``python -m fcre_utils audit --model DIR --members SRC --nonmembers SRC [--out DIR]`` attacks any
diffusers DDPM checkpoint on its owner's images and writes a privacy report
(:func:`fcre_utils.audit.audit`).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from .image_files import RESIZE_MODES, WINDOWS
from .presets import preset_names
from .runner import RunFailed, metrics_summary, parse_overrides, resume_series, run_series
from .sweeps import RESULTS_FILE, resume_sweep, run_sweep, summarise_points


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m fcre_utils", description="FCRE membership inference companion")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="execute the notebook series into a new run directory")
    run.add_argument("--preset", default=None, help=f"parameter set: {', '.join(preset_names())} (default: quick)")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override one parameter; the value is read as YAML (repeatable)")
    run.add_argument("--run-dir", default=None, help="new or empty directory to write into (default: outputs/<preset>-<UTC time>)")
    run.add_argument("--only", default=None, help="comma-separated notebook numbers to run, e.g. 01,02")
    run.add_argument("--resume", default=None, metavar="DIR",
                     help="continue the interrupted or failed run in DIR with its recorded preset and parameters")

    sweep = commands.add_parser("sweep", help="execute the series once per point of a parameter grid and collect one results table")
    sweep.add_argument("grid", nargs="?", default=None, help="grid file (YAML); docs/sweeps.md describes its keys")
    sweep.add_argument("--out", default=None,
                       help="new or empty folder for the point run directories and results.csv (default: outputs/sweep-<grid name>-<UTC time>)")
    sweep.add_argument("--resume", default=None, metavar="OUT",
                       help="continue the sweep in OUT: completed points are skipped, unfinished and failed ones continued")
    add_audit_parser(commands)
    return parser


def add_audit_parser(commands) -> None:
    audit = commands.add_parser("audit", help="attack a diffusers DDPM checkpoint on your own images and write a privacy report")
    audit.add_argument("--model", required=True, metavar="DIR", help="DDPMPipeline folder, or UNet2DModel folder (config.json + safetensors)")
    audit.add_argument("--scheduler", default=None, metavar="PATH",
                       help="scheduler_config.json (or its folder) of a UNet2DModel folder (default: found beside the UNet)")
    audit.add_argument("--members", required=True, metavar="SRC", help="folder or file of images used in training")
    audit.add_argument("--nonmembers", required=True, metavar="SRC", help="folder or file of images not used in training")
    audit.add_argument("--calibration-fraction", type=float, default=0.25, metavar="F",
                       help="share of each set used to choose attack settings and thresholds, in (0, 1) (default: 0.25)")
    audit.add_argument("--attacks", nargs="+", default=None, metavar="NAME",
                       help="attack names or patterns such as 'fcre_*' to report (default: all); every attack still runs")
    audit.add_argument("--out", default=None, metavar="DIR", help="new or empty report folder (default: outputs/audit-<UTC time>)")
    audit.add_argument("--preset", default="paper", help=f"attack settings: {', '.join(preset_names())} (default: paper)")
    audit.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override one attack setting, such as timesteps=[50,100]; the value is read as YAML (repeatable)")
    audit.add_argument("--nifti-axis", type=int, default=2, choices=(0, 1, 2), help="axis along which NIfTI volumes are sliced (default: 2)")
    audit.add_argument("--window", default="minmax", choices=WINDOWS,
                       help="intensity window of DICOM, NIfTI and float images, per image (default: minmax)")
    audit.add_argument("--resize", default="auto", choices=RESIZE_MODES,
                       help="size conversion: pad edges, resize, or auto (pad small gaps, else resize) (default: auto)")
    audit.add_argument("--skip-unreadable", action="store_true", help="leave out unreadable files with a warning instead of stopping")
    audit.add_argument("--device", default="cpu", help="torch device for the model, such as cpu or cuda (default: cpu)")


def run_audit(args: argparse.Namespace) -> int:
    """Run ``audit`` from parsed arguments; print the summary, or the error and return 2."""
    from .audit import DERIVED_PARAMETERS, audit

    try:
        overrides = parse_overrides(args.overrides)
        derived = sorted(set(overrides) & set(DERIVED_PARAMETERS))
        if derived:
            raise ValueError(
                f"--set {derived[0]} cannot be overridden: the audit reads {', '.join(DERIVED_PARAMETERS)} from the "
                "model and the image sets (use --calibration-fraction for the split)"
            )
        attacks = [name for value in args.attacks for name in value.split(",") if name] if args.attacks else None
        report = audit(
            args.model, args.members, args.nonmembers, calibration_fraction=args.calibration_fraction, attacks=attacks,
            out=args.out, scheduler=args.scheduler, preset=args.preset, overrides=overrides, nifti_axis=args.nifti_axis,
            window=args.window, resize=args.resize, skip_unreadable=args.skip_unreadable, device=args.device,
        )
    except (KeyError, TypeError, ValueError, FileExistsError, FileNotFoundError) as error:
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        print(f"error: {message}", file=sys.stderr)
        return 2

    print(f"report: {report.out_dir / 'report.md'} (HTML: {report.out_dir / 'report.html'})")
    print(report.summary)
    return 0


def check_resume_arguments(args: argparse.Namespace) -> None:
    """Raise ValueError when --resume is combined with options that would change the run."""
    conflicting = [name for name, value in (("--preset", args.preset), ("--set", args.overrides),
                                      ("--run-dir", args.run_dir), ("--only", args.only)) if value]
    if conflicting:
        raise ValueError(
            f"--resume continues the run with the preset, parameters and notebooks recorded in "
            f"{args.resume}/run_request.yaml, so it cannot be combined with {', '.join(conflicting)}; "
            "leave them out, or start a new run"
        )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("papermill").setLevel(logging.WARNING)
    if args.command == "audit":
        return run_audit(args)

    try:
        if args.command == "sweep":
            return sweep_command(args)
        if args.resume:
            check_resume_arguments(args)
            run_dir = resume_series(args.resume)
        else:
            overrides = parse_overrides(args.overrides)
            only = args.only.split(",") if args.only else None
            run_dir = run_series(args.preset or "quick", overrides, args.run_dir, only=only)
    except (KeyError, TypeError, ValueError, FileExistsError, FileNotFoundError) as error:
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        print(f"error: {message}", file=sys.stderr)
        return 2
    except RunFailed as error:
        print(f"error: {error}", file=sys.stderr)
        return 1

    print(f"run directory: {run_dir}")
    print(f"summary: {run_dir / 'summary.md'}")
    print(metrics_summary(run_dir))
    return 0


def sweep_command(args: argparse.Namespace) -> int:
    """Run or resume a sweep, print each point's status, and return 1 if a point failed."""
    if args.resume and (args.grid or args.out):
        raise ValueError(
            f"--resume continues the sweep recorded in {args.resume}/sweep.yaml, so it cannot be combined with "
            "a grid file or --out; leave them out, or start a new sweep"
        )
    if not args.resume and not args.grid:
        raise ValueError("give a grid file (python -m fcre_utils sweep GRID.yaml), or --resume OUT to continue a sweep")
    results = resume_sweep(args.resume) if args.resume else run_sweep(args.grid, args.out)

    out = Path(results.run_dir.iloc[0]).parent
    points = summarise_points(results)
    print(f"results: {out / RESULTS_FILE} ({len(results)} rows)")
    print(points.to_markdown(index=False))
    failed = points[points.status == "failed"]
    if len(failed):
        print(f"error: {len(failed)} of {len(points)} points failed: {', '.join(failed.point)}; the error column of "
              f"{out / RESULTS_FILE} and their executed notebooks show why. Fix the cause and continue with "
              f"python -m fcre_utils sweep --resume {out}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
