"""Command line: ``python -m fcre_utils run --preset NAME [--set key=value ...] [--run-dir DIR]``.

``python -m fcre_utils run --resume DIR`` continues an interrupted or failed run.
``python -m fcre_utils sweep GRID.yaml [--out DIR]`` runs the series once per point of a parameter
grid (see :mod:`fcre_utils.sweeps`); ``sweep --resume OUT`` continues a sweep.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

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
    return parser


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
