#include "model/clip_lora_target.h"

#include <charconv>
#include <string_view>

namespace fluxswap {

namespace {

struct Projection {
  std::string_view name;
  ClipLinear linear;
  int part;
};
constexpr Projection kProjections[] = {
    {"self_attn.q_proj", ClipLinear::Qkv, 0}, {"self_attn.k_proj", ClipLinear::Qkv, 1},
    {"self_attn.v_proj", ClipLinear::Qkv, 2}, {"self_attn.out_proj", ClipLinear::Out, 0},
    {"mlp.fc1", ClipLinear::Fc1, 0},          {"mlp.fc2", ClipLinear::Fc2, 0},
};

}  // namespace

std::optional<ClipLinearRef> parse_clip_linear(const std::string& module) {
  std::string_view m = module;
  if (m.starts_with("text_model.")) m.remove_prefix(std::string_view("text_model.").size());
  constexpr std::string_view kLayers = "encoder.layers.";
  if (!m.starts_with(kLayers)) return std::nullopt;
  m.remove_prefix(kLayers.size());
  int64_t layer = -1;
  const auto [end, ec] = std::from_chars(m.data(), m.data() + m.size(), layer);
  // Digits only, no sign, no leading zero: a name has exactly one spelling.
  if (ec != std::errc() || end == m.data() || *m.data() == '-' || (*m.data() == '0' && end - m.data() > 1))
    return std::nullopt;
  m.remove_prefix(size_t(end - m.data()));
  if (!m.starts_with(".")) return std::nullopt;
  m.remove_prefix(1);
  for (const Projection& p : kProjections)
    if (m == p.name) return ClipLinearRef{layer, p.linear, p.part};
  return std::nullopt;
}

std::string clip_linear_module(const ClipLinearRef& ref) {
  for (const Projection& p : kProjections)
    if (p.linear == ref.linear && p.part == ref.part)
      return "text_model.encoder.layers." + std::to_string(ref.layer) + "." + std::string(p.name);
  return "text_model.encoder.layers." + std::to_string(ref.layer) + ".?";
}

ClipLinearRows clip_linear_rows(const ClipLinearRef& ref, const ClipTextConfig& config) {
  const int64_t C = config.hidden_size, I = config.intermediate_size;
  switch (ref.linear) {
    case ClipLinear::Qkv: return {ref.part * C, C, 3 * C, C};
    case ClipLinear::Out: return {0, C, C, C};
    case ClipLinear::Fc1: return {0, I, I, C};
    case ClipLinear::Fc2: return {0, C, C, I};
  }
  return {};
}

}  // namespace fluxswap
