#!/usr/bin/env bash
# The real-model study end to end (README.md here): runs its three sweeps (each resumes whatever is
# finished), scores the replies, and writes the figures and tables the README shows.
#   experiments/error-accumulation/real-cpu.sh [BUILD_DIR]     # BUILD_DIR default build
# On 2 cores: the drift sweep (real-cpu.yaml) 66 min on the machine it first ran on and ~80 min
# on a 2-core AMD EPYC one; there, the accuracy sweep ~50 min and the protocol variants ~95 min.
set -euo pipefail
cd "$(dirname "$0")/../.."
kvdrift="${1:-build}/kvdrift"
here=experiments/error-accumulation
out=out/study-real-cpu
figures=docs/figures

# The run log of sweep $1's point(s) whose directory name matches $2 (points are named by their values).
run_of() { ls -d "out/sweeps/error-accumulation-$1/runs/"*$2*/run.h5; }
# The datasets by their prompt field, as the point names carry it.
declare -A field=([gsm8k]=question [math500]=problem)
python=.venv/bin/python

# One thread per worker: the two workers fill the two cores.
for sweep in real-cpu real-cpu-accuracy real-cpu-protocol; do
  KVDRIFT_THREADS=1 "$kvdrift" sweep submit "$here/$sweep.yaml"
  "$kvdrift" sweep collect "$here/$sweep.yaml"
done
mkdir -p "$out"
both=()
for dataset in gsm8k math500; do
  ln -sfn "$(realpath "$(run_of real-cpu "_${field[$dataset]}_")")" "$out/$dataset.h5"
  ln -sfn "$(realpath "$(run_of real-cpu-accuracy "_${field[$dataset]}_")")" "$out/$dataset-accuracy.h5"
  "$kvdrift" score "$out/$dataset-accuracy.h5"
  both+=("$out/$dataset.h5")
done

# Figures over the 32 prompts of both runs (--pool): headline methods at matched bits; KVarN's
# ablations; the causal wrappers. The tables stay per run.
"$kvdrift" plot --overwrite "${both[@]}" --pool -o "$out/methods" --quantizer kivi --quantizer kivi-paper \
  --quantizer quarot --quantizer kvarn --quantizer rtn-token --quantizer rtn-channel
"$kvdrift" plot --overwrite "${both[@]}" --pool -o "$out/ablations" --quantizer kvarn \
  --quantizer kvarn-no-rotation --quantizer kvarn-no-varn --quantizer kvarn-no-sink
"$kvdrift" plot --overwrite "${both[@]}" --pool -o "$out/causal" --quantizer kivi-paper --quantizer kivi-paper-ts \
  --quantizer kivi-paper-td --quantizer kvarn --quantizer kvarn-ts --quantizer kvarn-td
# Every quantizer of both runs in one table (summary figures with their intervals); the accuracy
# runs' table carries the scores of the replies.
"$kvdrift" plot --overwrite "${both[@]}" -o "$out/all"
"$kvdrift" plot --overwrite "$out/gsm8k-accuracy.h5" "$out/math500-accuracy.h5" -o "$out/accuracy"
# Paired comparisons: what the causal wrappers remove; claim (c), KVarN against KIVI (both) and QuaRot.
rm -f "$out/causal_effect.csv" "$out/paired_causal".* "$out/paired_methods".*
$python analysis/causal_effect.py "${both[@]}" -o "$out/causal_effect.csv"
$python analysis/causal_effect.py "${both[@]}" --pair kvarn:kvarn-ts --pair kvarn:kvarn-td \
  --figure "$out/paired_causal"
$python analysis/causal_effect.py "${both[@]}" --pair kivi-paper:kvarn --pair kivi:kvarn --pair quarot:kvarn \
  --figure "$out/paired_methods"

# Protocol variants: per setting, both datasets' runs scored, tabled, and KVarN against KIVI-paper.
declare -A setting=([chunked]=_chunked_ [sampled]=_0.6_0.95_ [3bit]=_full_0_0_1_)
for name in chunked sampled 3bit; do
  runs=()
  for dataset in gsm8k math500; do
    run=$(run_of real-cpu-protocol "${setting[$name]}*_${field[$dataset]}_")
    "$kvdrift" score "$run"
    ln -sfn "$(realpath "$run")" "$out/protocol-$name-$dataset.h5"
    runs+=("$out/protocol-$name-$dataset.h5")
  done
  "$kvdrift" plot --overwrite "${runs[@]}" --pool -o "$out/protocol-$name"
  rm -f "$out/protocol-$name-paired".* "$out/protocol-$name-effect.csv"
  $python analysis/causal_effect.py "${runs[@]}" --pair kivi-paper:kvarn -o "$out/protocol-$name-effect.csv" \
    --figure "$out/protocol-$name-paired"
done

for figure in drift_curves token_scale survival; do
  cp "$out/methods/$figure.png" "$figures/study_$figure.png"
done
cp "$out/causal/drift_curves.png" "$figures/study_causal_drift_curves.png"
cp "$out/ablations/drift_curves.png" "$figures/study_ablation_drift_curves.png"
cp "$out/paired_methods.png" "$figures/study_paired_kvarn.png"
cp "$out/paired_causal.png" "$figures/study_paired_causal.png"
cp "$out/protocol-chunked/drift_curves.png" "$figures/study_chunked_drift_curves.png"
cp "$out/protocol-chunked-paired.png" "$figures/study_chunked_paired_kvarn.png"
echo "tables: $out/all/report.md, $out/accuracy/report.md, $out/protocol-*/report.md, $out/causal_effect.csv," \
  "$out/protocol-*-effect.csv; figures: $figures/study_*.png"
