// The whole transformer on the CUDA backend against the reference outputs of the fixture models (BFL-named
// checkpoints), with either attention implementation. Tolerance: max|a-b|/max|b| <= 2e-2 (bf16 weights and
// activations through every block, against a float32 reference).
#include "../test_support.h"
#include "cuda_test_util.h"
#include "model/flux_transformer_io.h"

namespace fluxswap::test {
namespace {

constexpr double kTolerance = 2e-2;

struct GoldenCase {
  const char* model;
  const char* attention;
};

class CudaGolden : public ::testing::TestWithParam<GoldenCase> {};

TEST_P(CudaGolden, MatchesReferenceBaseOutput) {
  FLUXSWAP_REQUIRE_FIXTURES();
  FLUXSWAP_CUDA_BACKEND(gpu, GetParam().attention);
  const std::string dir = fixtures_dir() + "/" + GetParam().model;
  FluxCheckpoint ck = open_flux_checkpoint(dir + "/transformer_bfl.safetensors");
  FluxTransformer tr(ck.config, load_flux_weights(ck, *gpu), *gpu);
  auto goldens = SafetensorsFile::open(dir + "/transformer_goldens.safetensors");
  const Tensor out = run_flux_transformer(tr, read_flux_inputs(*goldens));
  const double err = max_rel_error(out, goldens->tensor("out.base"));
  EXPECT_LE(err, kTolerance) << GetParam().model << " with " << GetParam().attention << " attention";
  std::printf("[ golden   ] %s, %s attention: max rel error %.3g\n", GetParam().model, GetParam().attention, err);
}

INSTANTIATE_TEST_SUITE_P(Models, CudaGolden,
                         ::testing::Values(GoldenCase{"tiny", "cudnn"}, GoldenCase{"small", "cudnn"},
                                           GoldenCase{"tiny_schnell", "cudnn"}, GoldenCase{"tiny", "naive"},
                                           GoldenCase{"small", "naive"}, GoldenCase{"tiny_schnell", "naive"}),
                         [](const auto& info) {
                           return std::string(info.param.model) + "_" + info.param.attention;
                         });

}  // namespace
}  // namespace fluxswap::test
