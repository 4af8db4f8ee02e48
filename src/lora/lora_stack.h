#pragma once
// Several weighted adapters combined per internal module: each pair of each adapter gets a rank range within its
// module's stacked rank (downs stacked along the rank, ups side by side, each in its own row range), so that
//   sum_i alpha_i up_i down_i  (alpha = user weight x format scale)
// is exactly one low-rank product per module. Merging adds the pairs one by one; runtime slots hold the stacked
// layout. A split q/k/v LoRA on a fused qkv weight is a block-diagonal up, exactly. Nothing is copied here: this
// is the validated plan the controller executes on the device.
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

struct PlacedPair {
  size_t adapter = 0;  // index into the active list
  size_t pair = 0;     // index into that adapter's pairs
  float alpha = 1.0f;  // weight x scale
  int64_t rank_offset = 0;
};

struct ModuleStack {
  Shape weight_shape;  // [out, in]
  int64_t rank = 0;    // sum of the pairs' ranks
  bool has_bias = false;
  std::vector<PlacedPair> pairs;
};

// Throws Error naming the adapter and module if a pair does not fit the model (module unknown, rows or in_features
// out of range, rank mismatch between up and down).
std::map<std::string, ModuleStack> stack_loras(const std::vector<ActiveLora>& active, const FluxConfig& config);

}  // namespace fluxswap
