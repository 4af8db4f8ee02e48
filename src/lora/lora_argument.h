#pragma once
// The command-line form of a LoRA: `path[:weight]` (weight 1 when absent; the last ':' followed by a number
// separates them, so paths containing ':' still work).
#include <string>

namespace fluxswap {

struct LoraArgument {
  std::string path;
  float weight = 1.0f;
};

LoraArgument parse_lora_argument(const std::string& text);

}  // namespace fluxswap
