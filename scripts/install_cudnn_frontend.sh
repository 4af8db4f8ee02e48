#!/usr/bin/env bash
# Fetches the header-only cuDNN frontend (the C++ graph API the CUDA backend's fused attention is written
# against) into .deps/cudnn_frontend/include. Only the headers of the PyPI wheel are kept; nothing is installed.
#
# Version 1.15.0 (October 2025) was released alongside cuDNN 9.14, the runtime on the GPU machine; the headers
# compile against any cuDNN 9 and query the runtime's version before using newer features.
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=${CUDNN_FRONTEND_VERSION:-1.15.0}
DEST=.deps/cudnn_frontend
if [ -f "$DEST/include/cudnn_frontend.h" ] && [ "$(cat "$DEST/VERSION" 2>/dev/null)" = "$VERSION" ]; then
  exit 0
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# The wheel's headers are the same for every Python and platform tag: pin one so any host can fetch it.
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.11 --implementation cp \
  --platform manylinux_2_28_x86_64 -d "$tmp" "nvidia-cudnn-frontend==$VERSION"
rm -rf "$DEST" && mkdir -p "$DEST"
python3 - "$tmp"/nvidia_cudnn_frontend-*.whl "$DEST" <<'PY'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    for name in z.namelist():
        if name.startswith("include/") and not name.endswith("/"):
            z.extract(name, sys.argv[2])
PY
echo "$VERSION" > "$DEST/VERSION"
echo "cuDNN frontend $VERSION headers in $DEST/include"
