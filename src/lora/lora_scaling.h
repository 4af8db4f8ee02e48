#pragma once
// The scale s of  dW = s * up @ down  as each LoRA format defines it (LORA_FORMATS.md section 2):
// PEFT's `lora_adapter_metadata` LoraConfig wins when present; otherwise a per-module `.alpha` tensor gives
// s = alpha / rank; a missing (or, as kohya reads it, zero) alpha means s = 1.
#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "io/safetensors.h"
#include "lora/lora_key_mapping.h"

namespace fluxswap {

// The parts of a PEFT LoraConfig that set the scale, from the safetensors header key `lora_adapter_metadata`.
struct PeftScaling {
  bool present = false;
  std::optional<double> alpha;  // lora_alpha
  std::optional<int64_t> rank;  // r
  // PEFT regex patterns over module names (diffusers naming, without `transformer.`), in file order: the first
  // match wins, as in PEFT.
  std::vector<std::pair<std::string, double>> alpha_pattern;
  std::vector<std::pair<std::string, int64_t>> rank_pattern;
  bool rslora = false;  // s = alpha / sqrt(r)

  // The LoraConfig of `component` ("transformer", whose fields may also be unprefixed, or "text_encoder"). Throws
  // Error naming the file if the metadata is not a JSON object or a field has the wrong type.
  static PeftScaling from_metadata(const SafetensorsFile& file, const std::string& component = "transformer");
};

// The scale of one pair. `rank` = down's row count; `alpha` = the `.alpha` tensor's value when there is one;
// `down_key` names the pair in messages. Throws Error when PEFT metadata declares a rank the tensors don't have.
float lora_pair_scale(LoraFormat format, const LoraTarget& target, int64_t rank, std::optional<double> alpha,
                      const PeftScaling& peft, const std::string& path, const std::string& down_key);

}  // namespace fluxswap
