#include "lora/text_encoder_lora_keys.h"

#include <string_view>

#include "model/clip_lora_target.h"

namespace fluxswap {

namespace {

struct Prefix {
  std::string_view text;
  TextEncoderOf encoder;
  bool underscored;  // kohya joins the module path with underscores
  bool peft;
};
// Longer prefixes before the shorter ones they extend ("text_encoders.clip_l." before "text_encoders.").
constexpr Prefix kPrefixes[] = {
    {"lora_te1_", TextEncoderOf::Clip, true, false},
    {"lora_te_", TextEncoderOf::Clip, true, false},
    {"text_encoder.", TextEncoderOf::Clip, false, true},
    {"text_encoders.clip_l.transformer.", TextEncoderOf::Clip, false, false},
    {"lora_te2_", TextEncoderOf::Other, true, false},
    {"lora_te3_", TextEncoderOf::Other, true, false},
    {"text_encoder_2.", TextEncoderOf::Other, false, false},
    {"text_encoders.", TextEncoderOf::Other, false, false},
};

const Prefix* prefix_of(const std::string& key) {
  for (const Prefix& p : kPrefixes)
    if (key.starts_with(p.text)) return &p;
  return nullptr;
}

// kohya's "text_model_encoder_layers_3_self_attn_q_proj" -> "text_model.encoder.layers.3.self_attn.q_proj". A CLIP
// linear sits in a layer's "self_attn" or "mlp" block: the underscore after the block's name was the last dot.
std::string dotted_kohya_path(std::string_view p) {
  constexpr std::string_view kLayers = "text_model_encoder_layers_";
  if (!p.starts_with(kLayers)) return std::string(p);
  p.remove_prefix(kLayers.size());
  const size_t digits_end = p.find('_');
  if (digits_end == std::string_view::npos) return std::string(p);
  std::string rest(p.substr(digits_end + 1));
  for (std::string_view block : {"self_attn_", "mlp_"})
    if (rest.starts_with(block)) rest[block.size() - 1] = '.';
  return "text_model.encoder.layers." + std::string(p.substr(0, digits_end)) + "." + rest;
}

}  // namespace

TextEncoderOf text_encoder_of(const std::string& key) {
  const Prefix* p = prefix_of(key);
  return p ? p->encoder : TextEncoderOf::None;
}

std::optional<ClipLoraStem> clip_lora_stem(const std::string& stem) {
  const Prefix* p = prefix_of(stem);
  if (!p || p->encoder != TextEncoderOf::Clip) return std::nullopt;
  const std::string_view path = std::string_view(stem).substr(p->text.size());
  const std::optional<ClipLinearRef> ref =
      parse_clip_linear(p->underscored ? dotted_kohya_path(path) : std::string(path));
  if (!ref) return std::nullopt;
  return ClipLoraStem{clip_linear_module(*ref), p->peft};
}

}  // namespace fluxswap
