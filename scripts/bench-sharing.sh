#!/usr/bin/env bash
# Decode speed alone and beside one busy process, for the ways OpenMP threads can wait (docs/performance.md,
# "Sharing the machine"): libgomp's default (spin, then sleep), sleeping at once (OMP_WAIT_POLICY=PASSIVE),
# and kvdrift's own choice (no variable set: it measures the machine at start). Each row is measured in this
# one command, alternating, so the ratios compare like with like. Run it on an otherwise quiet machine.
#   scripts/bench-sharing.sh [MODEL] [ROUNDS]
set -euo pipefail
cd "$(dirname "$0")/.."
model=${1:-models/smollm2-135m-instruct}
rounds=${2:-2}
kvdrift=${KVDRIFT:-build/kvdrift}
[[ -x $kvdrift ]] || { echo "bench-sharing.sh: no $kvdrift: run make build first" >&2; exit 1; }
unset OMP_WAIT_POLICY GOMP_SPINCOUNT KVDRIFT_THREADS
declare -A total
tokens_per_second() {  # prints "batch1 batch32" tokens/s
  env "$@" "$kvdrift" --threads 2 bench decode --model "$model" --batch 1,32 --steps 48 --warmup 8 2>/dev/null |
    awk '$1=="1"{b1=$5} $1=="32"{b32=$5} END{print b1, b32}'
}
policies=("spin (libgomp default)|GOMP_SPINCOUNT=300000" "sleep (OMP_WAIT_POLICY=PASSIVE)|OMP_WAIT_POLICY=PASSIVE"
          "kvdrift's choice|KVDRIFT_BENCH=1")
for ((round = 1; round <= rounds; ++round)); do
  for setting in quiet busy; do
    spinner=
    if [[ $setting == busy ]]; then python3 -c "while True: pass" & spinner=$!; sleep 1; fi
    for policy in "${policies[@]}"; do
      read -r b1 b32 < <(tokens_per_second "${policy#*|}")
      total["${policy%%|*}|$setting|1"]=$(python3 -c "print(${total["${policy%%|*}|$setting|1"]:-0} + $b1)")
      total["${policy%%|*}|$setting|32"]=$(python3 -c "print(${total["${policy%%|*}|$setting|32"]:-0} + $b32)")
    done
    [[ -n $spinner ]] && kill "$spinner"
  done
done
echo "decode tokens/s, $model, 2 intra-op threads, mean of $rounds rounds; busy = one other process spinning"
printf '%-34s %9s %9s %7s   %9s %9s %7s\n' "OpenMP threads wait by" "quiet b1" "busy b1" "ratio" "quiet b32" "busy b32" "ratio"
for policy in "${policies[@]}"; do
  name=${policy%%|*}
  python3 - "$name" "$rounds" "${total["$name|quiet|1"]}" "${total["$name|busy|1"]}" "${total["$name|quiet|32"]}" \
    "${total["$name|busy|32"]}" <<'PY'
import sys
name, rounds = sys.argv[1], int(sys.argv[2])
q1, b1, q32, b32 = (float(v) / rounds for v in sys.argv[3:])
print(f"{name:<34} {q1:9.1f} {b1:9.1f} {b1 / q1:6.2f}x   {q32:9.1f} {b32:9.1f} {b32 / q32:6.2f}x")
PY
done
