// An FP8 checkpoint (ComfyUI scaled fp8, tests/fp8_checkpoint_writer.h) loaded on the GPU: its e4m3 codes reach the
// device byte for byte and the FP8-only model matches the CPU reference loaded from the same file, with and without
// a runtime LoRA. Tolerance as in test_cuda_fp8_transformer.cpp: the GPU quantises bf16 activations, the CPU float32
// ones, in the block and the modulation linears; max|a-b|/max|b| <= 7e-2 and cosine >= 0.999 (measured 0.040 and
// 0.051, printed).
#include <cuda_runtime.h>

#include <cstring>

#include "../fp8_checkpoint_writer.h"
#include "cuda_test_util.h"
#include "lora/lora_controller.h"
#include "model/flux_transformer_io.h"

namespace fluxswap::test {
namespace {

constexpr double kMaxRelError = 7e-2, kMinCosine = 0.999;

TEST(CudaFp8Checkpoint, Fp8OnlyModelMatchesTheCpuReference) {
  FLUXSWAP_REQUIRE_FIXTURES();
  FLUXSWAP_CUDA_BACKEND(gpu);
  TempDir tmp;
  const Fp8File file = write_fp8_checkpoint(tmp.path().string(), true, "model.diffusion_model.");
  const FluxCheckpoint ck = open_flux_checkpoint(file.path);
  auto cpu = make_cpu_backend();
  FluxTransformer on_cpu(ck.config, load_flux_weights(ck, *cpu), *cpu);
  FluxTransformer on_gpu(ck.config, load_flux_weights(ck, *gpu), *gpu);
  ASSERT_TRUE(on_gpu.fp8());

  const Linear& l = on_gpu.weights().linear("single_blocks.1.linear1");
  ASSERT_FALSE(l.weight.defined());
  const Quantised& q = file.modules.at("single_blocks.1.linear1");
  std::vector<uint8_t> codes(q.codes.nbytes());
  gpu->synchronize();
  ASSERT_EQ(cudaMemcpy(codes.data(), l.weight_fp8.data(), codes.size(), cudaMemcpyDeviceToHost), cudaSuccess);
  EXPECT_EQ(std::memcmp(codes.data(), q.codes.data(), codes.size()), 0);
  const Tensor scales = gpu->to_host_f32(l.weight_scale);
  EXPECT_EQ(scales.ptr<float>()[0], q.scale);

  auto goldens = SafetensorsFile::open(fixtures_dir() + "/tiny/transformer_goldens.safetensors");
  const FluxHostInputs inputs = read_flux_inputs(*goldens);
  auto compare = [&](const char* what) {
    const Tensor a = run_flux_transformer(on_gpu, inputs), b = run_flux_transformer(on_cpu, inputs);
    const double err = max_rel_error(a, b), cos = cosine_similarity(a, b);
    std::printf("[ fp8 file ] tiny %s: GPU vs CPU max rel error %.3g, cosine %.6f\n", what, err, cos);
    EXPECT_LE(err, kMaxRelError) << what;
    EXPECT_GE(cos, kMinCosine) << what;
    return a;
  };
  const Tensor base = compare("base");
  {
    auto adapter = std::make_shared<LoraAdapter>(
        load_lora_adapter(fixtures_dir() + "/tiny/lora_a_peft.safetensors", ck.config));
    LoraController lg(on_gpu, LoraMode::Runtime), lc(on_cpu, LoraMode::Runtime);
    lg.set_adapters({{adapter, 0.8f}});
    lc.set_adapters({{adapter, 0.8f}});
    EXPECT_GT(max_rel_error(compare("runtime LoRA"), base), 1e-2) << "the LoRA changed nothing";
  }
  EXPECT_EQ(max_rel_error(run_flux_transformer(on_gpu, inputs), base), 0.0) << "unload";
}

}  // namespace
}  // namespace fluxswap::test
