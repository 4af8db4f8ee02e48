#!/usr/bin/env bash
# Configures and builds everything into build/ (CUDA included when nvcc exists: compile-only without a GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="/usr/local/cuda/bin:$PATH"
CUDA=OFF
command -v nvcc >/dev/null 2>&1 && CUDA=ON
LAUNCHER=""
command -v ccache >/dev/null 2>&1 && LAUNCHER="-DCMAKE_CXX_COMPILER_LAUNCHER=ccache -DCMAKE_CUDA_COMPILER_LAUNCHER=ccache"
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release $LAUNCHER -DFLUXSWAP_CUDA=${FLUXSWAP_CUDA:-$CUDA} >/dev/null
ninja -C build -j"${JOBS:-2}"
