#!/usr/bin/env bash
# Prints the directory holding a model: scripts/find-model.sh [stories260K|smollm2-135m|qwen2.5-coder-1.5b] (default
# stories260K). Looks in ../shared/models (beside the checkout), models/ (filled by
# scripts/fetch-model.sh) and $KVDRIFT_MODELS_DIR. Fails with how to get it when none has it.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
name="${1:-stories260K}"
case "$name" in
  stories260K) folder=stories260K; files=(stories260K.bin tok512.bin) ;;
  smollm2-135m) folder=smollm2-135m-instruct; files=(config.json model.safetensors tokenizer.json kvdrift-provenance.json) ;;
  qwen2.5-coder-1.5b) folder=qwen2.5-coder-1.5b-instruct; files=(config.json model.safetensors tokenizer.json kvdrift-provenance.json) ;;
  *) echo "error: unknown model '$name' (expected stories260K, smollm2-135m or qwen2.5-coder-1.5b)" >&2; exit 1 ;;
esac
for dir in "$root/../shared/models/$folder" "$root/models/$folder" "${KVDRIFT_MODELS_DIR:-/nonexistent}/$folder"; do
  complete=1
  for file in "${files[@]}"; do [ -f "$dir/$file" ] || complete=0; done
  if [ "$complete" = 1 ]; then
    (cd "$dir" && pwd)
    exit 0
  fi
done
echo "error: $name not found in ../shared/models/$folder, models/$folder or \$KVDRIFT_MODELS_DIR; run scripts/fetch-model.sh $name" >&2
exit 1
