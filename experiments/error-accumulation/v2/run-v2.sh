#!/usr/bin/env bash
# The second edition end to end (README.md here): its three sweeps (each resumes whatever is finished),
# the free-running replies scored, then the claims table, accuracy table and figures.
#   experiments/error-accumulation/v2/run-v2.sh [BUILD_DIR]     # BUILD_DIR default build
# Measured on 2 cores (Intel Xeon VM, 2 intra-op threads): v2-smollm2.yaml (k2v2) and v2-smollm2-k4v2.yaml
# about 15 min each (batches of 4 prompts x 15 rows, ~6 steps/s), free-running-smollm2.yaml about 10 min
# (batches of 8 prompts x 5 rows).
set -euo pipefail
cd "$(dirname "$0")/../../.."
kvdrift="${1:-build}/kvdrift"
here=experiments/error-accumulation/v2
out=docs/figures/study-v2  # the claims tables, accuracy table and figures the README shows (committed)
python=.venv/bin/python

for sweep in v2-smollm2 v2-smollm2-k4v2 free-running-smollm2; do
  "$kvdrift" sweep submit "$here/$sweep.yaml" --rerun-failed
done
free_running=(out/sweeps/v2-smollm2-free-running/runs/*/run.h5)
for run in "${free_running[@]}"; do "$kvdrift" score "$run"; done  # replaces an earlier /scores
mkdir -p "$out"
for bits in k2v2 k4v2; do
  $python "$here/claims.py" --accumulation out/sweeps/v2-smollm2-$bits/runs/*/run.h5 \
    --free-running "${free_running[@]}" -o "$out/$bits" --overwrite
  "$kvdrift" plot --overwrite out/sweeps/v2-smollm2-$bits/runs/*/run.h5 --pool --align onset -o out/study-v2/$bits-plot
done
