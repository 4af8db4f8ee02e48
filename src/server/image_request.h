#pragma once
// The body of POST /v1/images/generations: OpenAI's Images shape (prompt, n, size, response_format) plus the
// engine's own fields (lora, steps, guidance, seed, timeout). Parsing is strict: every problem is a 400 whose
// message names the field and says what was expected, so a client never gets an image it did not ask for.
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "server/server_options.h"

namespace fluxswap {

struct LoraChoice {
  std::string name;  // as listed by GET /v1/loras
  float scale = 1.0f;
};

struct ImageRequest {
  std::string prompt;
  int n = 1;
  int width = 0, height = 0;  // 0: the model's default size
  int steps = 0;              // 0: the model's default
  float guidance = 3.5f;
  std::optional<uint64_t> seed;  // none: the server draws one and reports it
  std::vector<LoraChoice> loras;
  double timeout_s = 0;  // 0: the server's --timeout-s
};

// Limits on LoRA scales and guidance: wide enough for any real use, narrow enough to catch a misplaced value.
constexpr double kMaxLoraScale = 10.0;
constexpr double kMaxGuidance = 30.0;
constexpr size_t kMaxLorasPerRequest = 8;

// Throws HttpError(400) naming the offending field.
ImageRequest parse_image_request(const std::string& body, const ServerOptions& limits);

}  // namespace fluxswap
