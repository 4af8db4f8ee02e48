#pragma once
// Which text encoder a LoRA file's key belongs to, in the namings FLUX LoRAs use (LORA_FORMATS.md): CLIP-L under
// kohya's / OneTrainer's `lora_te1_` (or `lora_te_`), PEFT's `text_encoder.` and ComfyUI's
// `text_encoders.clip_l.transformer.`; T5-XXL (and any other encoder) under `lora_te2_` / `lora_te3_`,
// `text_encoder_2.` and ComfyUI's other `text_encoders.` entries.
#include <optional>
#include <string>

namespace fluxswap {

enum class TextEncoderOf { None, Clip, Other };

TextEncoderOf text_encoder_of(const std::string& key);

struct ClipLoraStem {
  std::string module;  // the transformers module, "text_model.encoder.layers.0.self_attn.q_proj"
  bool peft = false;   // named the PEFT way (`text_encoder.`): the `text_encoder.` LoraConfig in the metadata scales it
};
// The CLIP linear a stem (a key without its `.lora_down.weight`-style suffix) of text_encoder_of() == Clip names;
// nullopt when it names none (an embedding, `text_projection`, a misspelt path).
std::optional<ClipLoraStem> clip_lora_stem(const std::string& stem);

}  // namespace fluxswap
