#!/usr/bin/env bash
# Builds the safetensors libFuzzer target into build-fuzz/, seeds a corpus, and fuzzes for FUZZ_SECONDS
# (default 30). Exits non-zero if the fuzzer finds a crash, leak, sanitizer report or timeout.
set -euo pipefail
cd "$(dirname "$0")/.."

CXX=${CXX:-clang++}
OUT=build-fuzz
mkdir -p "$OUT/corpus"

"$CXX" -std=c++20 -O1 -g -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined \
  -Isrc src/io/safetensors.cpp src/io/safetensors_header_fast.cpp src/core/dtype.cpp src/core/tensor.cpp fuzz/safetensors_fuzz.cpp \
  -o "$OUT/safetensors_fuzz"

# Small valid files, written with struct/json only (no numpy here).
python3 - "$OUT/corpus" <<'PY'
import json, struct, sys
out = sys.argv[1]
def write(name, tensors, meta=None):
    header, data = {}, b""
    if meta is not None:
        header["__metadata__"] = meta
    for key, dtype, shape, payload in tensors:
        header[key] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + len(payload)]}
        data += payload
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    with open(f"{out}/seed_{name}.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + data)
write("empty", [])
write("one", [("w", "F32", [2], struct.pack("<2f", 1.5, -2.0))])
write("meta", [("a.weight", "BF16", [2, 2], b"\x80\x3f" * 4)], {"format": "pt", "k": "v"})
write("mixed", [("x", "F8_E4M3", [3], b"\x01\x02\x03"), ("i", "I64", [1], struct.pack("<q", -7)),
                ("e", "F16", [0, 4], b""), ("s", "U8", [], b"\x09"), ("b", "BOOL", [2], b"\x00\x01")])
PY
if [ -d ../shared/fixtures/tiny ]; then
  cp ../shared/fixtures/tiny/lora_*.safetensors "$OUT/corpus/"
fi

cat > "$OUT/safetensors.dict" <<'DICT'
"dtype"
"shape"
"data_offsets"
"__metadata__"
"BF16"
"F8_E4M3"
"I64"
"F32"
"[0,0]"
"\x00\x00\x00\x00\x00\x00\x00"
DICT

"$OUT/safetensors_fuzz" "$OUT/corpus" -dict="$OUT/safetensors.dict" -max_total_time="${FUZZ_SECONDS:-30}" \
  -timeout=10 -rss_limit_mb=2048 -artifact_prefix="$OUT/" -print_final_stats=1
