#!/usr/bin/env bash
# Installs every system dependency of kvdrift from Debian 12 packages. Idempotent and
# non-interactive: when every package is already installed it does nothing.
set -euo pipefail

PACKAGES=(
  build-essential cmake git pkg-config
  libtorch-dev libopenblas0-pthread   # LibTorch (CPU); OpenBLAS pthread build keeps matmuls fast
  libhdf5-dev libyaml-cpp-dev libcli11-dev libfmt-dev libspdlog-dev
  libeigen3-dev nlohmann-json3-dev libpcre2-dev zlib1g-dev
  libgtest-dev libbenchmark-dev
  python3-h5py python3-matplotlib python3-numpy
  slurm-wlm munge                     # the single-node Slurm the sweep tests start (scripts/slurm/)
)

missing=()
for pkg in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then
    SUDO="sudo"
  else
    echo "setup.sh: missing packages (${missing[*]}) and not root (no sudo); install them as root" >&2
    exit 1
  fi
fi
echo "setup.sh: installing ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
