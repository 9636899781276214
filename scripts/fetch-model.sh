#!/usr/bin/env bash
# Downloads the stories260K test model (llama2.c format) from its public home, the karpathy/tinyllamas
# repository on the Hugging Face hub, into models/stories260K/. Only needed where ../shared/models
# is absent; the tests and the demo look there first.
set -euo pipefail
cd "$(dirname "$0")/.."
BASE_URL="${KVDRIFT_TINYLLAMAS_URL:-https://huggingface.co/karpathy/tinyllamas/resolve/main/stories260K}"
DEST=models/stories260K
# sha256 of the published files (see ../shared/models/README.md)
declare -A SHA256=(
  [stories260K.bin]=b0a507e7ad0f626624f17112325e66691f9076d622e1d3274d103d00299f2696
  [tok512.bin]=037cb335abb25d1fa9e8ecae30ed2a3a8ace9302862ebcdc05d51a6bbb10c312
)
mkdir -p "$DEST"
for file in stories260K.bin tok512.bin; do
  if [ -f "$DEST/$file" ] && echo "${SHA256[$file]}  $DEST/$file" | sha256sum -c --status; then
    continue
  fi
  echo "fetch-model.sh: downloading $BASE_URL/$file" >&2
  if ! curl -fL --retry 2 --connect-timeout 20 -o "$DEST/$file.part" "$BASE_URL/$file"; then
    rm -f "$DEST/$file.part"
    echo "fetch-model.sh: error: could not download $BASE_URL/$file (no network access to the Hugging Face hub?)." >&2
    echo "fetch-model.sh: copy stories260K.bin and tok512.bin into $DEST/ by hand, or set KVDRIFT_MODELS_DIR to a directory holding stories260K/." >&2
    exit 1
  fi
  if ! echo "${SHA256[$file]}  $DEST/$file.part" | sha256sum -c --status; then
    rm -f "$DEST/$file.part"
    echo "fetch-model.sh: error: $file from $BASE_URL has the wrong sha256 (expected ${SHA256[$file]})" >&2
    exit 1
  fi
  mv "$DEST/$file.part" "$DEST/$file"
done
echo "fetch-model.sh: stories260K is in $DEST" >&2
