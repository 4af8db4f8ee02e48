// FP8 mode of the transformer on the CPU reference backend (the same quantised operands the GPU multiplies):
// close to the float32 reference outputs, with LoRA in both modes, and exactly back to the FP8 base on unload.
#include <gtest/gtest.h>

#include "core/compare.h"
#include "lora/lora_controller.h"
#include "fixture_transformer.h"
#include "test_support.h"

namespace fluxswap {
namespace {

// e4m3 keeps 3 mantissa bits: per-element errors of a few percent average out in each dot product. Measured on
// the fixtures: cosine 0.99959-0.99986, max rel error 0.025-0.046; the bounds leave room and still catch a wrong
// scale or layout.
constexpr double kMinCosine = 0.995;
constexpr double kMaxRelError = 0.08;

using Fp8Model = test::FixtureTransformer;

class Fp8Transformer : public ::testing::TestWithParam<std::string> {};

TEST_P(Fp8Transformer, CloseToTheReferenceAndOffAgainIsExact) {
  FLUXSWAP_REQUIRE_FIXTURES();
  Fp8Model m(GetParam());
  const Tensor exact = m.run();
  m.transformer->set_fp8(true);
  const Tensor fp8 = m.run();
  const Tensor ref = m.goldens->tensor("out.base");
  std::printf("%s fp8 vs reference: cosine %.6f, max rel error %.4f\n", GetParam().c_str(),
              cosine_similarity(fp8, ref), max_rel_error(fp8, ref));
  EXPECT_GE(cosine_similarity(fp8, ref), kMinCosine);
  EXPECT_LE(max_rel_error(fp8, ref), kMaxRelError);
  EXPECT_GT(max_rel_error(fp8, exact), 0.0) << "FP8 mode changed nothing: the FP8 path did not run";
  m.transformer->set_fp8(false);
  EXPECT_EQ(max_rel_error(m.run(), exact), 0.0);
}

TEST_P(Fp8Transformer, LoraInBothModesAndUnloadReturnsTheFp8Base) {
  FLUXSWAP_REQUIRE_FIXTURES();
  Fp8Model m(GetParam());
  m.transformer->set_fp8(true);
  const Tensor base = m.run();
  const Tensor ref = m.goldens->tensor("out.lora_a0.7_b-0.5");
  for (LoraMode mode : {LoraMode::Merged, LoraMode::Runtime}) {
    SCOPED_TRACE(mode == LoraMode::Merged ? "merged" : "runtime");
    {
      LoraController lora(*m.transformer, mode);
      lora.set_adapters({{m.lora("a_peft"), 0.7f}, {m.lora("b_peft"), -0.5f}});
      const Tensor with = m.run();
      EXPECT_GE(cosine_similarity(with, ref), kMinCosine);
      EXPECT_LE(max_rel_error(with, ref), kMaxRelError);
      EXPECT_GT(max_rel_error(with, base), 1e-3) << "the LoRA changed nothing";
      lora.clear();
      EXPECT_EQ(max_rel_error(m.run(), base), 0.0);
    }
    EXPECT_EQ(max_rel_error(m.run(), base), 0.0);
  }
}

INSTANTIATE_TEST_SUITE_P(Fixtures, Fp8Transformer, ::testing::Values("tiny", "small", "tiny_schnell"));

}  // namespace
}  // namespace fluxswap
