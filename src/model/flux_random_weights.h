#pragma once
// Random transformer weights in the internal layout, for the demo without a checkpoint and for tests. Values are
// never zero: scaled normals with the fan-in scaling real checkpoints roughly have, norm scales near 1.
#include <cstdint>

#include "backend/backend.h"
#include "model/flux_weights.h"

namespace fluxswap {

FluxWeights random_flux_weights(const FluxConfig& config, Backend& backend, uint64_t seed);

}  // namespace fluxswap
