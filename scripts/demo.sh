#!/usr/bin/env bash
# The main job on the default setting: until the side-by-side engine lands, greedy generation of
# stories260K from BOS. The text is written to out/demo.txt and printed.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
build="${1:-build}"
model_dir="$(bash "$root/scripts/find-model.sh")"
mkdir -p "$root/out"
"$root/$build/kvdrift" generate --model "$model_dir/stories260K.bin" --tokenizer "$model_dir/tok512.bin" \
  --steps 200 > "$root/out/demo.txt"
cat "$root/out/demo.txt"
echo "demo: output written to out/demo.txt" >&2
