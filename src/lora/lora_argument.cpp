#include "lora/lora_argument.h"

#include <cmath>
#include <cstdlib>

#include "core/error.h"

namespace fluxswap {

LoraArgument parse_lora_argument(const std::string& text) {
  const size_t colon = text.rfind(':');
  if (colon != std::string::npos && colon + 1 < text.size()) {
    const std::string tail = text.substr(colon + 1);
    char* end = nullptr;
    const float w = std::strtof(tail.c_str(), &end);
    if (end && *end == '\0') {
      if (!std::isfinite(w)) throw Error("--lora " + text + ": the weight must be a finite number");
      if (colon == 0) throw Error("--lora " + text + ": no file before the weight");
      return {text.substr(0, colon), w};
    }
  }
  if (text.empty()) throw Error("--lora needs a file");
  return {text, 1.0f};
}

}  // namespace fluxswap
