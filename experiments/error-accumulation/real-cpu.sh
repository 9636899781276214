#!/usr/bin/env bash
# The real-model study end to end (README.md here): runs the sweep (resuming whatever is finished),
# collects it, scores the answers, and writes the figures and tables the README shows.
#   experiments/error-accumulation/real-cpu.sh [BUILD_DIR]     # ~1 h on 2 cores; BUILD_DIR default build
set -euo pipefail
cd "$(dirname "$0")/../.."
kvdrift="${1:-build}/kvdrift"
sweep=experiments/error-accumulation/real-cpu.yaml
runs=out/sweeps/error-accumulation-real-cpu/runs
out=out/study-real-cpu
figures=docs/figures

# One thread per worker: the two workers fill the two cores.
KVDRIFT_THREADS=1 "$kvdrift" sweep submit "$sweep"
"$kvdrift" sweep collect "$sweep"
mkdir -p "$out"
for dataset in gsm8k math500; do
  run=$(ls -d "$runs"/*"$dataset"*/run.h5)
  ln -sfn "$(realpath "$run")" "$out/$dataset.h5"
  "$kvdrift" score "$out/$dataset.h5"
  # Headline methods at matched bits; KVarN's ablations; the causal wrappers.
  "$kvdrift" plot "$out/$dataset.h5" -o "$out/$dataset-methods" --quantizer kivi --quantizer kivi-paper \
    --quantizer quarot --quantizer kvarn --quantizer rtn-token --quantizer rtn-channel
  "$kvdrift" plot "$out/$dataset.h5" -o "$out/$dataset-ablations" --quantizer kvarn \
    --quantizer kvarn-no-rotation --quantizer kvarn-no-varn --quantizer kvarn-no-sink
  "$kvdrift" plot "$out/$dataset.h5" -o "$out/$dataset-causal" --quantizer kivi-paper --quantizer kivi-paper-ts \
    --quantizer kivi-paper-td --quantizer kvarn --quantizer kvarn-ts --quantizer kvarn-td
done
# Every quantizer of both runs in one table (summary figures with their intervals).
"$kvdrift" plot "$out/gsm8k.h5" "$out/math500.h5" -o "$out/all"
rm -f "$out/causal_effect.csv"
.venv/bin/python analysis/causal_effect.py "$out/gsm8k.h5" "$out/math500.h5" -o "$out/causal_effect.csv"
for figure in drift_curves token_scale survival; do
  cp "$out/gsm8k-methods/$figure.png" "$figures/study_$figure.png"
done
cp "$out/gsm8k-causal/drift_curves.png" "$figures/study_causal_drift_curves.png"
cp "$out/gsm8k-ablations/drift_curves.png" "$figures/study_ablation_drift_curves.png"
echo "tables: $out/all/report.md, $out/causal_effect.csv; figures: $figures/study_*.png"
