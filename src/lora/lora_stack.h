#pragma once
// Several weighted adapters combined per internal module into one low-rank factor: the pairs' downs stacked
// along the rank, their ups side by side (each in its own row range, zero elsewhere) with weight * scale folded
// in, so  sum_i w_i s_i up_i down_i == up @ down.  Merging adds up @ down to the weight; runtime slots hold
// (down, up) as they are. A split q/k/v LoRA on a fused qkv weight becomes a block-diagonal up, exactly.
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "lora/lora_adapter.h"

namespace fluxswap {

struct ActiveLora {
  std::shared_ptr<const LoraAdapter> adapter;
  float weight = 1.0f;
};

struct StackedLora {
  Tensor down;        // [R, in] float32, host
  Tensor up;          // [out, R] float32, host
  Tensor bias_delta;  // [out] float32, host; undefined when no pair carries a bias
};

// Throws Error naming the adapter and module if a pair does not fit the model (module unknown, rows or
// in_features out of range).
std::map<std::string, StackedLora> stack_loras(const std::vector<ActiveLora>& active, const FluxConfig& config);

}  // namespace fluxswap
