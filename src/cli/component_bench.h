#pragma once
// Component benchmarks for `fluxswap bench --components`: FLUX.1's text encoders and VAE decoder at their real
// sizes, on random weights made on the device (random_component_weights.h), timed against diffusers on an H100
// (bf16, eager). Method as for the transformer (bench/README.md): one eager warm-up run, then the forward is
// recorded once and its replays are timed (eager runs if recording fails, said in the output); median of `runs`.
// Eager runs are timed as well (diffusers' numbers are eager), and each result has a per-op breakdown from one
// profiled eager run, a finiteness check of the output, and the component's weights and peak device memory. The
// backend's peak never resets: a peak is exact when the component raises it, else reported as an upper bound, so
// give each call a fresh backend for exact peaks.
#include <nlohmann/json.hpp>

#include "backend/backend.h"

namespace fluxswap {

// CLIP-L text model on 77 tokens, then T5-XXL encode of 512 tokens (batch 1, random valid token ids), one model at
// a time so only one set of weights is resident. Prints a block per model; returns {"clip": {...}, "t5": {...}}.
// `runs` >= 1.
nlohmann::json bench_text_encoders(Backend& backend, int runs);

// FLUX.1 VAE decode of one `size` x `size` image (size a multiple of 8) from normal(0, 1) latents. The diffusers
// reference is known for 1024 only; other sizes are reported without a ratio.
nlohmann::json bench_vae_decode(Backend& backend, int size, int runs);

}  // namespace fluxswap
