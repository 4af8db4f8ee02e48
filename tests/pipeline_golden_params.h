#pragma once
// The generation settings a pipeline_goldens.safetensors file was made with (its metadata), for the CPU and GPU
// pipeline golden tests alike.
#include <string>

#include "io/safetensors.h"
#include "pipeline/flux_pipeline.h"
#include "test_support.h"

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

// The tiny fixture pipeline and the settings of its goldens.
inline std::string tiny_pipeline_dir() { return fixtures_dir() + "/tiny/pipeline"; }
inline GenerateParams tiny_golden_params() {
  auto g = SafetensorsFile::open(fixtures_dir() + "/tiny/pipeline_goldens.safetensors");
  return golden_generate_params(*g);
}

}  // namespace fluxswap::test
