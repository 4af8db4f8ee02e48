#pragma once
// The engine's internal weight layout and how each checkpoint naming maps onto it.
//
// Internally every tensor has its BFL name (`double_blocks.N.img_attn.qkv.weight`, `single_blocks.N.linear1`,
// ...): q, k and v are fused into one qkv matrix, a single block's q, k, v and MLP-in projections into one
// `linear1`, and every modulation vector is ordered (shift, scale[, gate]...). diffusers checkpoints store the
// same numbers split per projection and the final-layer modulation as (scale, shift); each internal tensor is
// assembled from row ranges of source tensors. The LoRA loaders use the same table to place adapters.
#include <cstdint>
#include <string>
#include <vector>

#include "model/flux_config.h"

namespace fluxswap {

// Rows [src_row, src_row + rows) of the source tensor `key` land at rows [row, row + rows) of the internal tensor.
struct WeightPart {
  std::string key;
  int64_t row = 0;
  int64_t rows = 0;
  int64_t src_row = 0;
};

struct WeightSpec {
  std::string name;  // internal (BFL) name
  Shape shape;
  std::vector<WeightPart> parts;
};

// Every tensor of the internal layout, with where it comes from in a checkpoint of `naming`.
std::vector<WeightSpec> flux_weight_specs(const FluxConfig& config, FluxNaming naming);

// A linear module of the internal layout as diffusers names it: internal rows [row, row + rows) of `module` are
// the diffusers module `source` (its rows from src_row). Used to place diffusers/PEFT LoRA targets.
struct ModuleAlias {
  std::string source;  // diffusers module, e.g. "transformer_blocks.0.attn.to_k"
  std::string module;  // internal module, e.g. "double_blocks.0.img_attn.qkv"
  int64_t row = 0;
  int64_t rows = 0;
  int64_t src_row = 0;
};
std::vector<ModuleAlias> flux_diffusers_aliases(const FluxConfig& config);

// Which block an internal tensor name belongs to, in execution order (double blocks, then single blocks); false for
// the shared part (embedders, final layer).
bool flux_block_index(const std::string& name, const FluxConfig& config, size_t* index);

}  // namespace fluxswap
