#pragma once
// Where a LoRA on one of transformers' CLIPTextModel linears lands in ClipTextModel, whose q, k and v projections are
// one fused [3C, C] linear. LoRA files name CLIP modules the transformers way ("text_model.encoder.layers.3.
// self_attn.q_proj"); these functions are the one place that knows how those names map onto the fused layout.
#include <cstdint>
#include <optional>
#include <string>

#include "model/clip_text_model.h"

namespace fluxswap {

struct ClipLinearRef {
  int64_t layer = 0;
  ClipLinear linear = ClipLinear::Qkv;
  int part = 0;  // within Qkv: q, k, v = 0, 1, 2; 0 for the others
};

// "text_model.encoder.layers.3.self_attn.q_proj" (or without "text_model.") -> {3, Qkv, 0}; ".self_attn.out_proj",
// ".mlp.fc1", ".mlp.fc2" likewise. nullopt for anything else (embeddings, layer norms, a projection CLIP-L lacks).
std::optional<ClipLinearRef> parse_clip_linear(const std::string& module);
// The transformers name of ref's projection, with the "text_model." prefix.
std::string clip_linear_module(const ClipLinearRef& ref);

struct ClipLinearRows {
  int64_t row = 0, rows = 0;  // the output rows of the fused linear that ref's projection owns
  int64_t out_features = 0;   // of the whole (fused) linear
  int64_t in_features = 0;
};
ClipLinearRows clip_linear_rows(const ClipLinearRef& ref, const ClipTextConfig& config);

}  // namespace fluxswap
