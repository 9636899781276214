#!/usr/bin/env bash
# Prints the directory holding stories260K: ../shared/models (beside the checkout), models/ (filled by
# scripts/fetch-model.sh) or $KVDRIFT_MODELS_DIR. Fails with how to get it when none has it.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
for dir in "$root/../shared/models/stories260K" "$root/models/stories260K" "${KVDRIFT_MODELS_DIR:-/nonexistent}/stories260K"; do
  if [ -f "$dir/stories260K.bin" ] && [ -f "$dir/tok512.bin" ]; then
    (cd "$dir" && pwd)
    exit 0
  fi
done
echo "error: stories260K not found in ../shared/models/stories260K, models/stories260K or \$KVDRIFT_MODELS_DIR; run scripts/fetch-model.sh" >&2
exit 1
