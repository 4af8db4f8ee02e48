#!/usr/bin/env bash
# Prepares .device/ (git-ignored) for a run on the lent GPU machine, the same way every session:
#   1. builds the CUDA-enabled binaries here for sm_90a only (the device's H100/H200; a fast build),
#   2. copies them plus the non-system, non-CUDA shared libraries that `ldd` lists (OpenBLAS, gfortran, ...),
#   3. copies the golden fixtures the device tests read.
# Then call the device tool with carry [".device"] and a command starting `source .device/env.sh;`.
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD=${BUILD:-build-device}
LAUNCHER=""
command -v ccache >/dev/null 2>&1 && LAUNCHER="-DCMAKE_CXX_COMPILER_LAUNCHER=ccache -DCMAKE_CUDA_COMPILER_LAUNCHER=ccache"
cmake -S . -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release -DFLUXSWAP_CUDA=ON -DFLUXSWAP_PYTHON=OFF $LAUNCHER \
  -DCMAKE_CUDA_ARCHITECTURES=90a >/dev/null
ninja -C "$BUILD" -j2 ${TARGETS:-fluxswap fluxswap_tests fluxswap_cuda_tests}

rm -rf .device && mkdir -p .device/bin .device/lib .device/fixtures
for exe in fluxswap fluxswap_tests fluxswap_cuda_tests; do
  [ -f "$BUILD/$exe" ] && cp "$BUILD/$exe" .device/bin/
done
# System libraries (glibc, libstdc++, libgcc) and the CUDA libraries are present on the device machine.
for exe in .device/bin/*; do
  ldd "$exe" | awk '$3 ~ /^\// {print $3}'
done | sort -u | grep -Ev '/(libc|libm|libdl|librt|libpthread|libstdc\+\+|libgcc_s|ld-linux[^/]*)\.so|/libcu|/libnv' |
  while read -r lib; do cp -L "$lib" .device/lib/; done

# Only what the device tests read: the carried tree must stay under 64 MiB.
FIX=${FIXTURES:-../shared/fixtures}
if [ -d "$FIX" ]; then
  for d in tiny small tiny_schnell; do
    mkdir -p ".device/fixtures/$d"
    cp "$FIX/$d"/{config.json,transformer_bfl.safetensors,transformer_goldens.safetensors} "$FIX/$d"/lora_*.safetensors \
      ".device/fixtures/$d/"
    [ -f "$FIX/$d/pipeline_goldens.safetensors" ] && cp "$FIX/$d/pipeline_goldens.safetensors" ".device/fixtures/$d/"
    [ -d "$FIX/$d/pipeline" ] && cp -r "$FIX/$d/pipeline" ".device/fixtures/$d/"
  done
fi
# OpenBLAS alone is 36 MB: the payload travels xz-compressed and env.sh unpacks it on the device.
tar -C .device -cJf .device/payload.tar.xz bin lib fixtures
rm -rf .device/bin .device/lib .device/fixtures
cat > .device/env.sh <<'ENV'
[ -d .device/bin ] || tar -C .device -xJf .device/payload.tar.xz
export LD_LIBRARY_PATH="$PWD/.device/lib:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"
export FLUXSWAP_FIXTURES="$PWD/.device/fixtures"
export PATH="$PWD/.device/bin:$PATH"
ENV
du -sh .device
