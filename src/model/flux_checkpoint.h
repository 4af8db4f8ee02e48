#pragma once
// Finding a FLUX transformer on disk: a diffusers pipeline folder, its transformer/ folder, a Hugging Face cache
// entry, a single-file checkpoint in diffusers or BFL naming (optionally under a `model.diffusion_model.`-style
// prefix), or a config.json beside weights. The result names the weights, their naming and the config.
//
// Single files may store the linear weights in FP8 (F8_E4M3 or F8_E5M2), with or without ComfyUI's per-tensor
// `<module>.scale_weight` ("scaled fp8": the weight is the stored value times that scale); load_flux_weights then
// builds an FP8-only transformer (flux_weights.h).
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
  // The block linears' weights are stored in FP8 (F8_E4M3 or F8_E5M2): load_flux_weights gives an FP8-only model.
  bool fp8_linears = false;
  FluxConfig config;
  SafetensorsCollection weights;
};

FluxCheckpoint open_flux_checkpoint(const std::string& path);

// A snapshot folder of a Hugging Face cache entry (`.../models--org--name`), following refs/main when present.
// Returns the path unchanged when it is not a cache entry.
std::string resolve_hf_cache_path(const std::string& path);

}  // namespace fluxswap
