// The CPU reference transformer against the diffusers reference outputs, from both checkpoint namings and from
// every kind of model path. Tolerance: max|a-b|/max|b| <= 1e-4 (float32 vs float32; seen ~6e-6).
#include <gtest/gtest.h>

#include "core/compare.h"
#include "core/error.h"
#include "model/flux_transformer_io.h"
#include "test_support.h"

namespace fluxswap {
namespace {

constexpr double kTolerance = 1e-4;

Tensor forward_cpu(const std::string& model_path, const std::string& goldens_path) {
  auto backend = make_cpu_backend();
  FluxCheckpoint ck = open_flux_checkpoint(model_path);
  WeightLoadReport report;
  FluxTransformer tr(ck.config, load_flux_weights(ck, *backend, &report), *backend);
  EXPECT_TRUE(report.unused_keys.empty()) << model_path << ": unused " << report.unused_keys.front();
  auto goldens = SafetensorsFile::open(goldens_path);
  return run_flux_transformer(tr, read_flux_inputs(*goldens));
}

struct GoldenCase {
  std::string model, naming;
};

class TransformerGolden : public ::testing::TestWithParam<GoldenCase> {};

TEST_P(TransformerGolden, MatchesReferenceBaseOutput) {
  FLUXSWAP_REQUIRE_FIXTURES();
  const std::string dir = test::fixtures_dir() + "/" + GetParam().model;
  Tensor out = forward_cpu(dir + "/transformer_" + GetParam().naming + ".safetensors",
                           dir + "/transformer_goldens.safetensors");
  auto goldens = SafetensorsFile::open(dir + "/transformer_goldens.safetensors");
  const double err = max_rel_error(out, goldens->tensor("out.base"));
  EXPECT_LE(err, kTolerance) << GetParam().model << " " << GetParam().naming;
}

INSTANTIATE_TEST_SUITE_P(Fixtures, TransformerGolden,
                         ::testing::Values(GoldenCase{"tiny", "diffusers"}, GoldenCase{"tiny", "bfl"},
                                           GoldenCase{"small", "diffusers"}, GoldenCase{"small", "bfl"},
                                           GoldenCase{"tiny_schnell", "diffusers"},
                                           GoldenCase{"tiny_schnell", "bfl"}),
                         [](const auto& info) { return info.param.model + "_" + info.param.naming; });

TEST(TransformerGoldenPaths, PipelineFolderAndTransformerFolderAndConfigJson) {
  FLUXSWAP_REQUIRE_FIXTURES();
  const std::string dir = test::fixtures_dir() + "/tiny";
  auto goldens = SafetensorsFile::open(dir + "/transformer_goldens.safetensors");
  for (const std::string path : {dir + "/pipeline", dir + "/pipeline/transformer",
                                 dir + "/pipeline/transformer/config.json"}) {
    Tensor out = forward_cpu(path, dir + "/transformer_goldens.safetensors");
    EXPECT_LE(max_rel_error(out, goldens->tensor("out.base")), kTolerance) << path;
  }
}

TEST(TransformerGoldenPaths, BothNamingsGiveTheSameWeights) {
  FLUXSWAP_REQUIRE_FIXTURES();
  auto backend = make_cpu_backend();
  const std::string dir = test::fixtures_dir() + "/tiny";
  FluxWeights a = load_flux_weights(open_flux_checkpoint(dir + "/transformer_diffusers.safetensors"), *backend);
  FluxWeights b = load_flux_weights(open_flux_checkpoint(dir + "/transformer_bfl.safetensors"), *backend);
  ASSERT_EQ(a.by_name.size(), b.by_name.size());
  for (const auto& [name, t] : a.by_name) {
    ASSERT_TRUE(b.by_name.count(name)) << name;
    EXPECT_EQ(max_rel_error(t, b.by_name.at(name)), 0.0) << name;
  }
}

TEST(TransformerGoldenPaths, GuidanceIsRequiredForDevModels) {
  FLUXSWAP_REQUIRE_FIXTURES();
  auto backend = make_cpu_backend();
  const std::string dir = test::fixtures_dir() + "/tiny";
  FluxCheckpoint ck = open_flux_checkpoint(dir + "/transformer_bfl.safetensors");
  FluxTransformer tr(ck.config, load_flux_weights(ck, *backend), *backend);
  auto goldens = SafetensorsFile::open(dir + "/transformer_goldens.safetensors");
  FluxHostInputs in = read_flux_inputs(*goldens);
  in.guidance = Tensor();
  try {
    run_flux_transformer(tr, in);
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("guidance"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace fluxswap
