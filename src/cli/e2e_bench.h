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
  std::string lora_mode = "merged", lora_dir;  // empty: choose_scratch_dir's rule
  // A device memory budget ("24G", parse_memory_budget; empty: none). The backend is capped at it before anything is
  // built, components planned on demand leave the device as soon as they are made, and the same pipeline is then
  // timed again without the budget for comparison. With fp8 the transformer is built FP8-only (as an FP8 checkpoint
  // loads: no bf16 copy), so its LoRA runs in runtime slots.
  std::string vram;
  // "nf4": T5 is made in bf16, encodes the prompt once, is quantised to NF4 (T5Encoder::quantize_nf4) and runs so; the
  // cosine of its embeddings against the bf16 ones is reported. "bf16": as made.
  std::string t5 = "bf16";
};

nlohmann::json bench_end_to_end(Backend& backend, const EndToEndOptions& options);

}  // namespace fluxswap
