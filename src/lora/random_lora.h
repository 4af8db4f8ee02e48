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

}  // namespace fluxswap
