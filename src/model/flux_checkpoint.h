#pragma once
// Finding a FLUX transformer on disk: a diffusers pipeline folder, its transformer/ folder, a Hugging Face cache
// entry, a single-file checkpoint in diffusers or BFL naming (optionally under a `model.diffusion_model.`-style
// prefix), or a config.json beside weights. The result names the weights, their naming and the config.
#include <string>

#include "io/safetensors.h"
#include "model/flux_config.h"

namespace fluxswap {

struct FluxCheckpoint {
  std::string path;         // what the user gave
  std::string weights_path; // the .safetensors or .safetensors.index.json that was opened
  FluxNaming naming = FluxNaming::Diffusers;
  std::string prefix;       // prepended to every key in the file, e.g. "model.diffusion_model."
  std::string config_source;  // the config.json read, or "inferred from tensor shapes"
  FluxConfig config;
  SafetensorsCollection weights;
};

FluxCheckpoint open_flux_checkpoint(const std::string& path);

// A snapshot folder of a Hugging Face cache entry (`.../models--org--name`), following refs/main when present.
// Returns the path unchanged when it is not a cache entry.
std::string resolve_hf_cache_path(const std::string& path);

}  // namespace fluxswap
