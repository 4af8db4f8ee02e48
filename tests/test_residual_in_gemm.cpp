// The GPU's way of adding the blocks' FP8 output projections onto the residual (inside the GEMM: the gate folded into
// the weight scales, the bias times the gate, a step's factors made up front), followed on
// the CPU reference (make_cpu_backend(true)): the same math as the composition up to float32 rounding order. A wrong
// gate (another chunk of the modulation), a projection left out of the step's factors, or a residual added twice or
// never moves the output by far more than the bounds (a wrong chunk for one projection: 0.012-0.054).
#include <gtest/gtest.h>

#include <cstdio>

#include "core/compare.h"
#include "fixture_transformer.h"
#include "test_support.h"

namespace fluxswap {
namespace {

struct Precision {
  const char* name;
  bool fp8_attention;
  // With FP8 a last-bit difference in the residual can flip an e4m3 code downstream (a code step is ~6%); with FP8
  // attention too, q, k and v codes: measured up to 1.4e-4 on "small".
  double bound;
};

class ResidualInGemm : public ::testing::TestWithParam<std::string> {};

TEST_P(ResidualInGemm, IsTheComposition) {
  FLUXSWAP_REQUIRE_FIXTURES();
  for (const Precision& p : {Precision{"FP8", false, 1e-5}, Precision{"FP8 + FP8 attention", true, 1e-3}}) {
    SCOPED_TRACE(p.name);
    test::FixtureTransformer composed(GetParam()), fused(GetParam(), true);
    composed.transformer->set_precision(true, p.fp8_attention);
    fused.transformer->set_precision(true, p.fp8_attention);
    ASSERT_TRUE(fused.backend->fp8_residual_in_gemm());
    const Tensor want = composed.run(), got = fused.run();
    const double err = max_rel_error(got, want);
    std::printf("%s %s: residual in the GEMM vs composed, max rel error %.3g\n", GetParam().c_str(), p.name, err);
    EXPECT_LE(err, p.bound);
    // The products are summed in another order (gate and scales applied after), so some output moves by an ulp: a
    // result equal bit for bit would mean the fused path did not run.
    EXPECT_GT(err, 0.0);
  }
}

INSTANTIATE_TEST_SUITE_P(Fixtures, ResidualInGemm, ::testing::Values("tiny", "small", "tiny_schnell"));

}  // namespace
}  // namespace fluxswap
