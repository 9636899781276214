#!/usr/bin/env bash
# Fuzzes kvdrift's parsers of untrusted input (tests/fuzz/: libFuzzer, clang, ASan + UBSan).
#   scripts/fuzz.sh [TARGET|all] [SECONDS] [SEED]   default: all, 60 s per target, a random seed
# A SEED makes the mutations repeatable (CI's smoke passes one: the same inputs on every run).
# Builds build-fuzz/ (no LibTorch needed), seeds each target's corpus from the project's configs,
# experiments and models (tests/fuzz/make_seeds.py), then runs each target for SECONDS, keeping what
# it learns in build-fuzz/corpus/TARGET. A crash, sanitizer report, uncaught exception, memory blow-up
# or slow input stops the target with its input saved as build-fuzz/findings/TARGET/...; the script
# then names every finding and exits 1. Turn each finding into a test (tests/fuzz_regression_test.cpp).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
target="${1:-all}"
seconds="${2:-60}"
seed="${3:-0}"  # 0: libFuzzer picks one
build="$root/build-fuzz"
targets=(llama2c_checkpoint safetensors hf_config hf_shard_index tokenizer_bin tokenizer_json tokenizer_encode
         run_config sweep_file prompts)
if [ "$target" != all ] && [[ ! " ${targets[*]} " == *" $target "* ]]; then
  echo "fuzz.sh: error: unknown target '$target' (targets: ${targets[*]})" >&2
  exit 2
fi
if ! [[ "$seconds" =~ ^[1-9][0-9]*$ ]]; then
  echo "fuzz.sh: error: SECONDS must be a positive whole number, got '$seconds'" >&2
  exit 2
fi
if ! [[ "$seed" =~ ^[0-9]+$ ]]; then
  echo "fuzz.sh: error: SEED must be a whole number, got '$seed'" >&2
  exit 2
fi
command -v clang++ >/dev/null || { echo "fuzz.sh: error: clang++ not found (scripts/setup.sh installs it)" >&2; exit 1; }

CC=clang CXX=clang++ cmake -S "$root/tests/fuzz" -B "$build" -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
cmake --build "$build" -j"$(nproc)" -- --no-print-directory >"$build/build.log" 2>&1 ||
  { tail -30 "$build/build.log" >&2; echo "fuzz.sh: error: the fuzz build failed ($build/build.log)" >&2; exit 1; }

stories="$("$root/scripts/find-model.sh" stories260K)"
export KVDRIFT_FUZZ_STORIES_TOKENIZER="$stories/tok512.bin"
rm -rf "$build/seeds"
"$root/.venv/bin/python" "$root/tests/fuzz/make_seeds.py" "$build/seeds" "$stories"
export ASAN_OPTIONS="detect_leaks=1:abort_on_error=1:symbolize=1"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1"

failed=()
for t in "${targets[@]}"; do
  [ "$target" = all ] || [ "$target" = "$t" ] || continue
  mkdir -p "$build/corpus/$t" "$build/findings/$t" "$build/seeds/$t"
  echo "fuzz.sh: $t for ${seconds} s" >&2
  if ! "$build/fuzz_$t" -max_total_time="$seconds" -seed="$seed" -timeout=10 -rss_limit_mb=2048 -max_len=65536 \
      -print_final_stats=1 -artifact_prefix="$build/findings/$t/" "$build/corpus/$t" "$build/seeds/$t" \
      >"$build/$t.log" 2>&1; then
    tail -40 "$build/$t.log" >&2
    failed+=("$t")
  else
    grep -E "^stat::number_of_executed_units|^stat::new_units_added" "$build/$t.log" | tr '\n' ' ' >&2
    echo >&2
  fi
done
if [ ${#failed[@]} -gt 0 ]; then
  echo "fuzz.sh: findings in: ${failed[*]}; inputs: $(ls "$build"/findings/*/* 2>/dev/null | tr '\n' ' ')" >&2
  exit 1
fi
echo "fuzz.sh: no findings" >&2
