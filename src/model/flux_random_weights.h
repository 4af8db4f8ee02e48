#pragma once
// Random transformer weights in the internal layout, generated on the backend's device: for the demo without a
// checkpoint, tests, and benchmarks at FLUX.1-dev size. Never zeros (zeros hide bugs and run faster than real data):
// normals with 1/sqrt(fan-in) scale, norm scales near 1.
#include <cstdint>

#include "backend/backend.h"
#include "model/flux_weights.h"

namespace fluxswap {

FluxWeights random_flux_weights(const FluxConfig& config, Backend& backend, uint64_t seed);

}  // namespace fluxswap
