#!/usr/bin/env bash
# Installs what fluxswap needs to build and test on Debian 12 (the development and CI machines), from Debian's
# packages and PyPI only. Safe to run again: it installs only what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

PACKAGES=(cmake ninja-build g++ pkg-config nlohmann-json3-dev libopenblas-dev libcli11-dev libgtest-dev
          libsentencepiece-dev libpng-dev clang libclang-rt-14-dev python3 libcpp-httplib-dev
          pybind11-dev python3-dev python3-numpy ccache)
missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

# The CUDA backend compiles where the CUDA toolkit is installed (nvcc on PATH or in /usr/local/cuda); the cuDNN
# frontend is a header-only library shipped in a PyPI wheel.
if command -v nvcc >/dev/null 2>&1 || [ -x /usr/local/cuda/bin/nvcc ]; then
  [ -x scripts/install_cudnn_frontend.sh ] && scripts/install_cudnn_frontend.sh
fi
echo "dependencies ready"
