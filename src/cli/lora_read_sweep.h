#pragma once
// `fluxswap bench --lora-read-sweep`: one LoRA file from the page cache to the device, every way the engine can
// take it, timed alone (no parsing into pairs, no apply): the floor of a swap from a file on this host.
#include <nlohmann/json.hpp>
#include <string>

#include "backend/backend.h"

namespace fluxswap {

// Prints a row per configuration and returns them (each with "mode" and medians of 3). Needs a backend that reads
// files into its own host memory (host_buffer_allocator(): the CUDA backend's pinned pool).
nlohmann::json lora_read_sweep(const std::string& file, Backend& be);

}  // namespace fluxswap
