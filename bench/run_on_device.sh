#!/usr/bin/env bash
# The GPU machine's side of a session: run after `scripts/device_bundle.sh` here, through the device tool with carry
# [".device"] and the command `bench/run_on_device.sh JOB...`. Each job logs to $OUT/<job>.log (and JSON where the
# bench writes it) and prints a short summary last, so the reply's tail holds the figures.
#   tests      the whole CUDA test suite
#   ordering   cuDNN's FP8 attention alone and between its neighbours (with cuDNN's own log in $OUT)
#   bf16       the bf16 step alone with its per-op profile (the issue 4 figure)
#   fp8lora    FP8 + FP8 attention with a merged rank-64 LoRA (the issue 6 step figure)
#   fp8ab      fp8lora's step without the quality run, alternating processes with the gated residual added inside
#              the output projections' GEMMs (default) and without (FLUXSWAP_FUSED_RESIDUAL=0), two of each
#   bf16lora   bf16 with a runtime rank-64 LoRA: swaps and per-step overhead
#   parsefirst bf16lora's under-step swaps with the LoRA's keys mapped before its read starts (default) and at once
#              (FLUXSWAP_LORA_PARSE_FIRST=0), alternating processes, two of each
#   bf16merged bf16 with a merged rank-64 LoRA: swaps and per-step overhead
#   e2e        the whole pipeline, FP8 + FP8 attention + merged rank-64 LoRA, median of 5
#   ttfi       time to first image: a FLUX.1-dev-sized random pipeline written to /dev/shm, then `generate` twice
set -uo pipefail
source .device/env.sh
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,temperature.gpu,power.draw --format=csv,noheader
# The SM clock, power and temperature every 100 ms while a job runs ($OUT/<job>.smi): in-step kernels run 10-15%
# below their standalone speed, and a power-capped clock would say why.
sample_start() {
  nvidia-smi --query-gpu=clocks.sm,power.draw,temperature.gpu --format=csv,noheader,nounits -lms 100 \
    > "$OUT/$1.smi" 2>/dev/null &
  sampler=$!
}
sample_stop() {
  kill "$sampler" 2>/dev/null
  wait "$sampler" 2>/dev/null
}
sample_summary() {
  local f="$OUT/$1.smi"
  local clocks power temp
  clocks=$(awk -F', *' '$2 > 250 {print $1}' "$f" | sort -n | awk '{a[NR] = $1} END {if (NR) print NR, a[int((NR + 1) / 2)], a[1]}')
  power=$(awk -F', *' '$2 > 250 {print $2}' "$f" | sort -n | awk '{a[NR] = $1} END {if (NR) print a[int((NR + 1) / 2)]}')
  temp=$(awk -F', *' '$3 > t {t = $3} END {print t + 0}' "$f")
  if [ -n "$clocks" ]; then
    set -- $clocks
    echo "$1 samples over 250 W: SM clock median $2 MHz (min $3), power median $power W, max $temp C"
  else
    echo "no samples over 250 W"
  fi
}
# One FP8 + FP8 attention step benchmark without the quality run into $OUT/<name>.{json,log} (switches come from the
# caller's environment), then its figures on one line: fp8_step NAME [ARGS...].
fp8_step() {
  local name=$1
  shift
  fluxswap bench --sizes 1024 --steps 20 --fp8 --fp8-fast-accum --fp8-attention --quality-steps 0 "$@" \
    --json "$OUT/$name.json" > "$OUT/$name.log" 2>&1
  grep -E '\+ FP8 attention:|FP8 attention, the 28-step|LoRA per step with the modulation|rror' "$OUT/$name.log" |
    cut -c1-110 | tr '\n' '|'
}
summary=()
for job in "$@"; do
  start=$(date +%s)
  sample_start "$job"
  case "$job" in
    tests)
      fluxswap_cuda_tests 2>&1 | tee "$OUT/tests.log" |
        grep -E "^\[  (FAILED|PASSED) |tests ran|^\[ residual \]|^\[ timing   \] (attention|linear|layer_norm)" ;;
    ordering)
      CUDNN_LOGLEVEL_DBG=3 CUDNN_LOGDEST_DBG="$OUT/cudnn.log" \
        fluxswap_cuda_tests --gtest_filter='CudnnFp8AttentionOrdering.*:*CudaFp8Attention*:*CudaFp8JoinedRows*' 2>&1 |
        tee "$OUT/ordering.log" | grep -E "ordering\] (fp8|bf16|same|[0-9]+ of)|FluxSize|FAILED|PASSED"
      gzip -f "$OUT/cudnn.log" 2>/dev/null ;;
    bf16)
      fluxswap bench --sizes 1024 --steps 20 --json "$OUT/bf16.json" > "$OUT/bf16.log" 2>&1
      grep -E "ms/step|per-op" "$OUT/bf16.log" | cut -c1-900 | head -10 ;;
    fp8lora)
      fluxswap bench --sizes 1024 --steps 20 --fp8 --fp8-fast-accum --fp8-attention --quality-steps 28 \
        --lora-rank 64 --lora-mode merged --swaps 4 --json "$OUT/fp8lora.json" > "$OUT/fp8lora.log" 2>&1
      grep -E "ms/step|cosine|swap|bit" "$OUT/fp8lora.log" | head -30 ;;
    fp8ab)
      for round in 1 2; do
        for fused in 0 1; do
          echo "round $round fused $fused: $(FLUXSWAP_FUSED_RESIDUAL=$fused fp8_step "fp8ab-r$round-f$fused" \
            --lora-rank 64 --lora-mode merged --swaps 1)"
        done
      done ;;
    bf16lora)
      fluxswap bench --sizes 1024 --steps 10 --no-profile --lora-rank 64 --lora-mode runtime --swaps 8 \
        --json "$OUT/bf16lora.json" > "$OUT/bf16lora.log" 2>&1
      grep -E "ms/step|swap|bit|gate" "$OUT/bf16lora.log" | head -30 ;;
    parsefirst)
      for round in 1 2; do
        for first in 0 1; do
          FLUXSWAP_LORA_PARSE_FIRST=$first fluxswap bench --sizes 1024 --steps 10 --no-profile --lora-rank 64 \
            --lora-mode runtime --swaps 8 --json "$OUT/parsefirst-r$round-p$first.json" \
            > "$OUT/parsefirst-r$round-p$first.log" 2>&1
          echo "round $round parse first $first: $(grep -E 'under-step swap 1,|under the next step' \
            "$OUT/parsefirst-r$round-p$first.log" | sed -E 's/.*adapter started[^)]*\) ([0-9.]+).*step launched ([0-9.]+).*/started \1 launched \2/; s/.*(= the step.*)\(output.*/\1/' | tr '\n' ' ')"
        done
      done ;;
    bf16merged)
      fluxswap bench --sizes 1024 --steps 10 --no-profile --lora-rank 64 --lora-mode merged --swaps 8 \
        --json "$OUT/bf16merged.json" > "$OUT/bf16merged.log" 2>&1
      grep -E "ms/step|swap|bit" "$OUT/bf16merged.log" | head -30 ;;
    e2e)
      fluxswap bench --e2e --sizes 1024 --e2e-runs 5 --tokenizers .device/fixtures/tiny/pipeline --fp8 --fp8-fast-accum --fp8-attention --lora-rank 64 \
        --lora-mode merged --json "$OUT/e2e.json" > "$OUT/e2e.log" 2>&1
      grep -E "s per image|median|denoise" "$OUT/e2e.log" | head -10 ;;
    ttfi)
      # Issue 6's time to first image (bench/README.md): a FLUX.1-dev-sized random pipeline in the page cache, then
      # `generate` from process start to the PNG on disk, twice.
      fluxswap make-random-model --out /dev/shm/M --size dev --transformer-dtype fp8 > "$OUT/ttfi-make.log" 2>&1 ||
        tail -3 "$OUT/ttfi-make.log"
      for run in 1 2; do
        t0=$(date +%s.%N)
        fluxswap generate --model /dev/shm/M --fp8-attention -p "a photo of a cat" -o /tmp/ttfi.png \
          > "$OUT/ttfi-$run.log" 2>&1
        t1=$(date +%s.%N)
        echo "run $run: $(awk -v a="$t0" -v b="$t1" 'BEGIN {printf "%.2f", b - a}') s from process start to the PNG" \
          "($(grep -cE '^step' "$OUT/ttfi-$run.log") step lines; $(grep -iE 'error' "$OUT/ttfi-$run.log" | head -1))"
      done
      rm -rf /dev/shm/M ;;
    *) echo "unknown job $job" ;;
  esac
  sample_stop
  summary+=("$job: $(( $(date +%s) - start )) s; $(sample_summary "$job")")
done
printf '%s\n' "${summary[@]}"
