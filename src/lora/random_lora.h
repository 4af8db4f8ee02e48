#pragma once
// A random LoRA in PEFT/diffusers format (separate q/k/v, `lora_adapter_metadata` with rank and alpha) on every
// block linear of a FLUX transformer, as diffusers' own benchmarks target them: for swap and overhead benchmarks
// at FLUX.1-dev size, where no real adapter can be downloaded. bf16 values, never zero.
#include <cstdint>
#include <string>

#include "model/flux_config.h"

namespace fluxswap {

// Returns the number of bytes written.
size_t write_random_lora(const std::string& path, const FluxConfig& config, int64_t rank, uint64_t seed);
// The tensor bytes such a file holds (its header adds well under 1 MB): for checking there is room first.
uint64_t random_lora_data_bytes(const FluxConfig& config, int64_t rank);

}  // namespace fluxswap
