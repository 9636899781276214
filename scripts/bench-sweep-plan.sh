#!/usr/bin/env bash
# `kvdrift sweep plan` of a 10,000-point grid (100 seeds x 100 lengths over a two-quantizer stories260K
# base), side by side for two kvdrift binaries, alternating, so the ratio compares like with like
# (docs/sweep.md, "Cost"). Prints each plan's own time: fresh plans (10,000 configs written) and
# re-plans (every point built and checked again, nothing written). Run it on an otherwise quiet machine.
#   scripts/bench-sweep-plan.sh BASELINE_KVDRIFT [CANDIDATE_KVDRIFT] [ROUNDS]
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
baseline=${1:?usage: bench-sweep-plan.sh BASELINE_KVDRIFT [CANDIDATE_KVDRIFT] [ROUNDS]}
candidate=${2:-$root/build/kvdrift}
rounds=${3:-3}
stories=${STORIES260K:-$root/../shared/models/stories260K}
[[ -f $stories/stories260K.bin ]] || { echo "bench-sweep-plan.sh: no $stories/stories260K.bin (set STORIES260K)" >&2; exit 1; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cat > "$work/base.yaml" <<YAML
model: {path: $stories/stories260K.bin, tokenizer: $stories/tok512.bin}
prompts: {source: inline, texts: ["Once upon a time"]}
decoding: {max_new_tokens: 16, stop_at_eos: false}
quantizers:
  - {name: kivi-2bit, method: kivi, params: {group_size: 8, residual_length: 16}}
  - {name: kvarn, method: kvarn, params: {preset: k2v2, tile_size: 8}}
output: {path: unused.h5}
YAML
{
  echo "name: big"; echo "root: out"; echo "base: base.yaml"; echo "grid:"
  echo "  decoding.seed: [$(seq -s ', ' 0 99)]"
  echo "  decoding.max_new_tokens: [$(seq -s ', ' 8 107)]"
  echo "launcher: {kind: local}"
} > "$work/sweep.yaml"
seconds() { "$1" sweep plan "$work/sweep.yaml" | sed -n 's/^planned [0-9]* points in \([0-9.]*\) s.*/\1/p'; }
declare -A sum
for kind in fresh replan; do
  for ((r = 0; r < rounds; r++)); do
    order=("$baseline" "$candidate")
    ((r % 2)) && order=("$candidate" "$baseline")  # ABBA: a drift over the rounds favours neither
    for binary in "${order[@]}"; do
      [[ $kind == fresh ]] && rm -rf "$work/out" && sync
      [[ $kind == replan && ! -d $work/out ]] && seconds "$binary" > /dev/null
      t=$(seconds "$binary")
      sum[$kind,$binary]=$(awk -v a="${sum[$kind,$binary]:-0}" -v b="$t" 'BEGIN{print a + b}')
      echo "$kind $binary ${t} s"
    done
  done
  awk -v b="${sum[$kind,$baseline]}" -v c="${sum[$kind,$candidate]}" -v n="$rounds" -v k="$kind" \
    'BEGIN{printf "%s: baseline %.2f s, candidate %.2f s (mean of %d), candidate/baseline %.2f\n", k, b/n, c/n, n, c/b}'
done
