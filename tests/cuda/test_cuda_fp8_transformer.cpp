// FP8 mode of the transformer on the GPU against the CPU reference of the same mode (tests/test_fp8_transformer.cpp
// checks that one against the fixtures): the tiny model plain, with a runtime LoRA (the bf16 branch accumulated by
// the FP8 GEMM) and with a merged one (requantised), and unload back to the FP8 base exactly.
// Tolerance: the GPU quantises bf16 activations, the CPU float32 ones, so a few e4m3 codes land on the other side
// of a rounding boundary, in the block linears and (since the modulation linears run in FP8 too) in every shift,
// scale and gate; max|a-b|/max|b| <= 7e-2 and cosine >= 0.999 (measured 0.028-0.058 and >= 0.99932, printed).
#include "cuda_test_util.h"
#include "../fixture_transformer.h"
#include "gpu_fixture_model.h"
#include "lora/lora_controller.h"

namespace fluxswap::test {
namespace {

constexpr double kMaxRelError = 7e-2, kMinCosine = 0.999;

TEST(CudaFp8Transformer, MatchesTheCpuFp8ReferenceWithAndWithoutLora) {
  FLUXSWAP_REQUIRE_FIXTURES();
  FLUXSWAP_CUDA_BACKEND(gpu);
  FixtureTransformer cpu("tiny");
  cpu.transformer->set_fp8(true);
  GpuModel g(*gpu);
  g.transformer.set_fp8(true);
  auto compare = [&](const char* what) {
    g.forward();
    const Tensor a = g.result(), b = cpu.run();
    const double err = max_rel_error(a, b), cos = cosine_similarity(a, b);
    std::printf("[ fp8      ] tiny %s: GPU vs CPU max rel error %.3g, cosine %.6f\n", what, err, cos);
    EXPECT_LE(err, kMaxRelError) << what;
    EXPECT_GE(cos, kMinCosine) << what;
    return a;
  };
  const Tensor base = compare("base");
  for (LoraMode mode : {LoraMode::Runtime, LoraMode::Merged}) {
    {
      LoraController on_gpu(g.transformer, mode), on_cpu(*cpu.transformer, mode);
      on_gpu.set_adapters({{g.lora("a_peft"), 0.7f}, {g.lora("b_peft"), -0.5f}});
      on_cpu.set_adapters({{cpu.lora("a_peft"), 0.7f}, {cpu.lora("b_peft"), -0.5f}});
      const Tensor with = compare(mode == LoraMode::Runtime ? "runtime LoRA" : "merged LoRA");
      EXPECT_GT(max_rel_error(with, base), 1e-2) << "the LoRA changed nothing";
    }
    // The controller gone (slots removed, merged weights restored and requantised): the FP8 base, bit for bit.
    g.forward();
    EXPECT_EQ(max_rel_error(g.result(), base), 0.0) << "unload";
  }
}

}  // namespace
}  // namespace fluxswap::test
