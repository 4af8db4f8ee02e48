#pragma once
// A fixture transformer (tiny unless named) on a GPU backend with its golden inputs uploaded once (a recording must not upload),
// for the CUDA LoRA and FP8 tests.
#include <memory>
#include <string>

#include "../test_support.h"
#include "io/safetensors.h"
#include "lora/lora_adapter.h"
#include "model/flux_transformer_io.h"

namespace fluxswap::test {

struct GpuModel {
  Backend& be;
  std::string dir;
  FluxCheckpoint checkpoint = open_flux_checkpoint(dir + "/transformer_bfl.safetensors");
  FluxTransformer transformer{checkpoint.config, load_flux_weights(checkpoint, be), be};
  std::shared_ptr<SafetensorsFile> goldens = SafetensorsFile::open(dir + "/transformer_goldens.safetensors");
  FluxInputs in;
  Tensor out;

  explicit GpuModel(Backend& backend, const std::string& name = "tiny") : be(backend), dir(fixtures_dir() + "/" + name) {
    const FluxHostInputs h = read_flux_inputs(*goldens);
    auto up = [&](const Tensor& host, DType type) {
      Tensor d = be.empty(type, host.shape());
      be.copy_from_host(host, d);
      return d;
    };
    in.hidden_states = up(h.hidden_states, DType::BF16);
    in.encoder_hidden_states = up(h.encoder_hidden_states, DType::BF16);
    in.pooled_projections = up(h.pooled_projections, DType::BF16);
    in.timestep = up(h.timestep, DType::F32);
    if (h.guidance.data()) in.guidance = up(h.guidance, DType::F32);
    in.rope = up(flux_rope_table(checkpoint.config, h.txt_ids, h.img_ids), DType::F32);
    out = be.empty(DType::BF16, {h.hidden_states.size(0), h.hidden_states.size(1), checkpoint.config.out_channels()});
  }
  std::shared_ptr<const LoraAdapter> lora(const std::string& name) {
    return std::make_shared<LoraAdapter>(load_lora_adapter(dir + "/lora_" + name + ".safetensors", checkpoint.config));
  }
  void forward() { transformer.forward(in, out); }
  Tensor result() { return be.to_host_f32(out); }
};

}  // namespace fluxswap::test
