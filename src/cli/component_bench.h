#pragma once
// Component benchmarks for `fluxswap bench --components`: FLUX.1's text encoders and VAE decoder at their real
// sizes, on random weights made on the device (random_component_weights.h), timed against diffusers on an H100
// (bf16, eager). Method as for the transformer (bench/README.md): one eager warm-up run, then the forward is
// recorded once and its replays are timed (eager runs if recording fails, said in the output); median of `runs`,
// a per-op breakdown from one profiled eager run, and the component's peak device memory.
#include <nlohmann/json.hpp>

#include "backend/backend.h"

namespace fluxswap {

// T5-XXL encode of 512 tokens and CLIP-L text model of 77 tokens (batch 1, random valid token ids), one model at a
// time so only one set of weights is resident. Prints a block per model; returns
// {"t5": {...}, "clip": {...}} with each model's timings, reference, per-op times and memory.
nlohmann::json bench_text_encoders(Backend& backend, int runs);

// FLUX.1 VAE decode of one `size` x `size` image (size a multiple of 8) from normal(0, 1) latents. The diffusers
// reference is known for 1024 only; other sizes are reported without a ratio.
nlohmann::json bench_vae_decode(Backend& backend, int size, int runs);

}  // namespace fluxswap
