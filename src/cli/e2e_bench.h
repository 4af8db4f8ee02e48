#pragma once
// `fluxswap bench --e2e`: the whole text-to-image pipeline (FluxPipeline::generate: tokenize, CLIP-L + T5-XXL,
// 28 flow-matching steps through the transformer, VAE decode, 8-bit image) at FLUX.1-dev size on RANDOM weights
// made on the device, warm (one generation first), median of `runs`. Only the tokenizers come from files.
#include <cstdint>
#include <nlohmann/json.hpp>
#include <string>

#include "backend/backend.h"

namespace fluxswap {

struct EndToEndOptions {
  std::string tokenizers;  // a pipeline folder with tokenizer/ and tokenizer_2/ (empty: the test fixtures')
  int runs = 5, steps = 28, size = 1024;
  bool fp8 = false, fp8_attention = false;
  int64_t lora_rank = 0;  // a random rank-r LoRA on every block linear, active during the runs (0: none)
  std::string lora_mode = "merged", lora_dir = "/tmp";
};

nlohmann::json bench_end_to_end(Backend& backend, const EndToEndOptions& options);

}  // namespace fluxswap
