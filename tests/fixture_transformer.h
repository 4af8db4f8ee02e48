#pragma once
// A fixture model (tiny, small, tiny_schnell) on the CPU reference backend with its golden inputs, for the LoRA and
// FP8 tests: run() is one forward pass on the stored inputs, lora() parses one of the fixture's LoRA files.
#include <memory>
#include <string>

#include "lora/lora_adapter.h"
#include "model/flux_transformer_io.h"
#include "test_support.h"

namespace fluxswap::test {

struct FixtureTransformer {
  std::unique_ptr<Backend> backend;
  std::string dir;
  FluxCheckpoint checkpoint;
  std::unique_ptr<FluxTransformer> transformer;
  std::shared_ptr<SafetensorsFile> goldens;
  FluxHostInputs inputs;

  // residual_in_gemm: the CPU backend taking the GPU's fused residual projections (make_cpu_backend).
  explicit FixtureTransformer(const std::string& name, bool residual_in_gemm = false)
      : backend(make_cpu_backend(residual_in_gemm)), dir(fixtures_dir() + "/" + name) {
    checkpoint = open_flux_checkpoint(dir + "/transformer_bfl.safetensors");
    transformer = std::make_unique<FluxTransformer>(checkpoint.config, load_flux_weights(checkpoint, *backend), *backend);
    goldens = SafetensorsFile::open(dir + "/transformer_goldens.safetensors");
    inputs = read_flux_inputs(*goldens);
  }
  // `letter_format` as in the file names: "a_peft", "c_kohya", ...
  std::shared_ptr<const LoraAdapter> lora(const std::string& letter_format) const {
    return std::make_shared<LoraAdapter>(
        load_lora_adapter(dir + "/lora_" + letter_format + ".safetensors", checkpoint.config));
  }
  Tensor run() { return run_flux_transformer(*transformer, inputs); }
};

}  // namespace fluxswap::test
