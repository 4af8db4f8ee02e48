#pragma once
// Random transformer weights as a pre-quantised FP8 checkpoint loads them (FluxWeights::fp8_only): the block linears
// and the modulation linears in e4m3 with one float32 scale per row, everything else bf16. Made on the device without
// ever holding the bf16 model, so a FLUX.1-dev-sized one (about 12 GB) can be built under a 24 GB budget.
#include <cstdint>

#include "backend/backend.h"
#include "model/flux_weights.h"

namespace fluxswap {

// The values are random_flux_weights(config, backend, seed) quantised per row, as set_fp8 would quantise them.
// Needs a backend with FP8 (quantize_fp8_rows).
FluxWeights random_flux_weights_fp8(const FluxConfig& config, Backend& backend, uint64_t seed);

}  // namespace fluxswap
