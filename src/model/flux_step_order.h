#pragma once
// Where in one transformer step a weight is first read, as a rank: 0 for everything the step reads before its first
// block (the embedders and every AdaLN modulation, which are computed up front), 1 + i for double block i,
// 1 + num_layers + i for single block i, and the last rank for the final projection. Names in any of the spellings
// LoRA files and checkpoints use (internal/BFL, diffusers, kohya's underscores, XLabs): a LoRA read in this order
// arrives as fast as a step consumes it. A name it does not place is rank 0 (needed first: always safe).
#include <cstdint>
#include <string>

#include "model/flux_config.h"

namespace fluxswap {

int64_t flux_step_rank(const std::string& name, const FluxConfig& config);
// Ranks are 0 .. flux_step_ranks(config) - 1.
inline int64_t flux_step_ranks(const FluxConfig& config) { return config.num_layers + config.num_single_layers + 2; }

}  // namespace fluxswap
