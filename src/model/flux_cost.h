#pragma once
// The work of one transformer forward: FLOPs (a multiply-add counts 2) and weight bytes, for rooflines and for
// turning measured times into TFLOP/s.
#include <cstdint>

#include "model/flux_config.h"

namespace fluxswap {

struct FluxStepCost {
  double linear_flops = 0;     // every token through every block linear, embedders and final projection
  double attention_flops = 0;  // QK^T and PV: 4 * S^2 * D per layer
  double weight_params = 0;    // all parameters (each read once per step)
  double total_flops() const { return linear_flops + attention_flops; }
};

FluxStepCost flux_step_cost(const FluxConfig& config, int64_t batch, int64_t img_tokens, int64_t txt_tokens);

}  // namespace fluxswap
