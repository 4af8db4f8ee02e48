#pragma once
// The generation settings a pipeline_goldens.safetensors file was made with (its metadata), for the CPU and GPU
// pipeline golden tests alike.
#include <string>

#include "io/safetensors.h"
#include "pipeline/flux_pipeline.h"

namespace fluxswap::test {

inline GenerateParams golden_generate_params(const SafetensorsFile& goldens) {
  const auto& meta = goldens.metadata();
  GenerateParams p;
  p.prompts = {meta.at("prompt0")};
  p.width = std::stoi(meta.at("width"));
  p.height = std::stoi(meta.at("height"));
  p.steps = std::stoi(meta.at("steps"));
  p.max_sequence_length = std::stoi(meta.at("max_sequence_length"));
  p.guidance = meta.at("guidance") == "none" ? 0.0f : std::stof(meta.at("guidance"));
  p.latents = goldens.tensor("latents_in");
  return p;
}

}  // namespace fluxswap::test
