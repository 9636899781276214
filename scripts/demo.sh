#!/usr/bin/env bash
# The main job on the default config: `kvdrift run configs/demo.yaml` on SmolLM2-135M-Instruct,
# wherever scripts/find-model.sh finds it. Prints the summary table and the HDF5 path.
# Extra arguments go to `kvdrift run` (e.g. --set decoding.max_new_tokens=16 for a short demo).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
build="${1:-build}"
shift || true
model_dir="$(bash "$root/scripts/find-model.sh" smollm2-135m)"
cd "$root"
"$root/$build/kvdrift" run configs/demo.yaml --overwrite --set "model.path=$model_dir" "$@"
