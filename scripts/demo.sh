#!/usr/bin/env bash
# The main job on the default config: `kvdrift run configs/demo.yaml` on stories260K, wherever
# scripts/find-model.sh finds it. Prints the summary table and the HDF5 path.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
build="${1:-build}"
model_dir="$(bash "$root/scripts/find-model.sh")"
cd "$root"
"$root/$build/kvdrift" run configs/demo.yaml --overwrite \
  --set "model.path=$model_dir/stories260K.bin" --set "model.tokenizer=$model_dir/tok512.bin"
