"""Print the README and docs tables of a finished run: attack metrics beside the control model's.

Usage: python benchmarks/results_tables.py outputs/<run>

Reads ``metrics.csv`` and ``control_metrics.csv`` (and, where present, notebook 03's and 05's
tables) and prints markdown, so the numbers quoted in the docs come from one command.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd

from fcre_utils.metrics import format_table


def interval(table: pd.DataFrame, name: str) -> pd.Series:
    return table.apply(lambda r: f"{r[name]:.3f} [{r[name + '_low']:.3f}, {r[name + '_high']:.3f}]", axis=1)


def attack_summary(run_dir: Path) -> pd.DataFrame:
    """Return one row per attack: NFE, AUC, calibrated TPRs, realised FPR at 0.1%, oracle TPR and control AUC."""
    table = pd.read_csv(run_dir / "metrics.csv")
    rows = pd.DataFrame({
        "attack": table.attack, "NFE": table.nfe, "AUC": interval(table, "auc"),
        "TPR@1%FPR": interval(table, "tpr_at_1pct_fpr"), "TPR@0.1%FPR": interval(table, "tpr_at_0_1pct_fpr"),
        "FPR at 0.1% threshold": table.fpr_at_0_1pct_threshold.map("{:.2%}".format),
        "oracle TPR@0.1%FPR": table.oracle_tpr_at_0_1pct_fpr.map("{:.3f}".format),
    })
    control_path = run_dir / "control_metrics.csv"
    if control_path.is_file():
        control = pd.read_csv(control_path)
        rows["control AUC"] = rows.attack.map(dict(zip(control.attack, interval(control, "auc")))).fillna("needs a reference model")
    return rows


def main(run_dir: str) -> None:
    run_dir = Path(run_dir)
    print("## Attacks and control\n")
    print(attack_summary(run_dir).to_markdown(index=False))
    print("\n## Full attack table\n")
    print(format_table(pd.read_csv(run_dir / "metrics.csv")).to_markdown(index=False))
    for name in ("frequency_bands", "difficulty_correlations", "ablation_timestep", "ablation_ddim_steps", "ablation_metric",
                 "ablation_training_length", "ablation_member_count"):
        path = run_dir / f"{name}.csv"
        if path.is_file():
            print(f"\n## {name}\n")
            print(pd.read_csv(path).round(3).to_markdown(index=False))
    times = run_dir / "notebook_times.csv"
    if times.is_file():
        print("\n## Notebook wall times\n")
        print(pd.read_csv(times).assign(minutes=lambda t: (t.seconds / 60).round(1)).to_markdown(index=False))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python benchmarks/results_tables.py outputs/<run>")
    main(sys.argv[1])
