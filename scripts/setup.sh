#!/usr/bin/env bash
# Installs everything kvdrift needs on Debian 12: the system packages (apt), and the project's Python
# virtual environment .venv/ from the pinned requirements.txt (torch 2.x from PyPI, whose bundled
# LibTorch the C++ build links against; transformers and gguf for the model conversion and the forward
# oracle; numpy, h5py, matplotlib, pyyaml for the analysis). Idempotent and non-interactive: when
# everything is in place it installs nothing.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"

PACKAGES=(
  build-essential cmake git pkg-config
  libhdf5-dev libyaml-cpp-dev libcli11-dev libfmt-dev libspdlog-dev
  libeigen3-dev nlohmann-json3-dev libpcre2-dev zlib1g-dev
  libgtest-dev libbenchmark-dev
  slurm-wlm munge                     # the single-node Slurm the sweep tests start (scripts/slurm/)
  clang libclang-rt-14-dev            # libFuzzer and the sanitizers' runtimes (scripts/fuzz.sh)
  bubblewrap                          # bwrap: the HumanEval sandbox of score.py (docs/analysis.md)
)

missing=()
for pkg in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done

SUDO=""
if [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1; then SUDO="sudo"; fi
apt_install() {
  if [ "$(id -u)" -ne 0 ] && [ -z "$SUDO" ]; then
    echo "setup.sh: error: missing Debian packages ($*) and not root (no sudo); install them as root" >&2
    exit 1
  fi
  echo "setup.sh: installing $*" >&2
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends "$@" >&2
}
if [ ${#missing[@]} -gt 0 ]; then apt_install "${missing[@]}"; fi

# The virtual environment. Any Python 3.10+ with venv and ensurepip will do; Debian's needs python3-venv.
venv="$root/.venv"
requirements="$root/requirements.txt"
stamp="$venv/.requirements.sha256"
want="$(sha256sum "$requirements" | cut -d' ' -f1)"
if [ -x "$venv/bin/python" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
python="${KVDRIFT_BASE_PYTHON:-python3}"
if ! "$python" -c 'import sys, venv, ensurepip; assert sys.version_info >= (3, 10)' 2>/dev/null; then
  python=/usr/bin/python3
  "$python" -c 'import venv, ensurepip' 2>/dev/null || apt_install python3-venv
fi
if [ ! -x "$venv/bin/python" ]; then
  echo "setup.sh: creating $venv with $("$python" --version 2>&1)" >&2
  "$python" -m venv "$venv"
fi
echo "setup.sh: installing requirements.txt into .venv (torch with its CUDA libraries: about 4 GB)" >&2
if ! "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-input -r "$requirements"; then
  echo "setup.sh: error: pip could not install requirements.txt into $venv (is PyPI reachable?)" >&2
  exit 1
fi
echo "$want" > "$stamp"
