"""Command line: ``python -m fcre_utils run --preset NAME [--set key=value ...] [--run-dir DIR]``.

``python -m fcre_utils run --resume DIR`` continues an interrupted or failed run.
"""

from __future__ import annotations

import argparse
import logging
import sys

from .presets import preset_names
from .runner import RunFailed, metrics_summary, parse_overrides, resume_series, run_series


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


if __name__ == "__main__":
    sys.exit(main())
