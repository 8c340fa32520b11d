#!/usr/bin/env bash
# Measure the wall time and peak resident memory of notebooks 02-04 on a finished run, and check
# that the rerun reproduces the run's metrics.csv (and control_metrics.csv when the run has one).
#   FCRE_DATA_DIR=<data folder> bash benchmarks/notebook_memory.sh outputs/quick-<time>
# Notebooks 02-04 rerun one by one, under /usr/bin/time, on a scratch copy of the run's
# parameters, manifests and models, so the run itself is not touched.
set -euo pipefail
run_dir="$(cd "$1" && pwd)"
cd "$(dirname "$0")/.."
scratch="$(mktemp -d)"
cp -r "$run_dir"/{params.yaml,environment.yaml,manifest.csv,data_source.yaml,model} "$scratch"/
for optional in control_manifest.csv control_model; do
    if [ -e "$run_dir/$optional" ]; then cp -r "$run_dir/$optional" "$scratch"/; fi
done

for notebook in 02_reconstruction 03_frequency_analysis 04_attack; do
    if ! /usr/bin/time -o "$scratch/time.txt" -f "%M %e" \
        .venv/bin/papermill -k python3 --cwd notebooks "notebooks/$notebook.ipynb" \
        "$scratch/$notebook.ipynb" -p run_dir "$scratch" >/dev/null 2>"$scratch/$notebook.log"; then
        echo "$notebook failed; its executed copy and log are in $scratch" >&2
        exit 1
    fi
    read -r peak_kb wall_s < <(tail -1 "$scratch/time.txt")
    echo "$notebook peak_rss_mb=$((peak_kb / 1024)) wall_s=$wall_s"
done

# Compare the tables row by row after sorting by attack, so a change of row order alone passes.
for table in metrics.csv control_metrics.csv; do
    [ -e "$run_dir/$table" ] || continue
    .venv/bin/python - "$run_dir/$table" "$scratch/$table" <<'PYTHON'
import sys

import pandas as pd

original, rerun = (pd.read_csv(path).sort_values("attack").reset_index(drop=True) for path in sys.argv[1:])
name = sys.argv[1].rsplit("/", 1)[-1]
if original.equals(rerun):
    print(f"{name} reproduced exactly")
else:
    print(f"{name} differs from the run's:")
    print(original.compare(rerun).to_string())
PYTHON
done
rm -rf "$scratch"
