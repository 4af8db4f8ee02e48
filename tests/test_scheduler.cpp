// FlowMatch Euler schedules against diffusers' FlowMatchEulerDiscreteScheduler (max abs error <= 1e-6).
#include <gtest/gtest.h>

#include <cmath>

#include "core/error.h"
#include "io/safetensors.h"
#include "pipeline/flow_match_scheduler.h"
#include "test_support.h"

namespace fluxswap {
namespace {

void expect_close(const std::vector<float>& got, const Tensor& want, double tol, const std::string& what) {
  ASSERT_EQ(int64_t(got.size()), want.numel()) << what;
  Tensor w = want.to_f32();
  for (size_t i = 0; i < got.size(); ++i) EXPECT_NEAR(got[i], w.ptr<float>()[i], tol) << what << " [" << i << "]";
}

TEST(Scheduler, DevGoldens) {
  FLUXSWAP_REQUIRE_FIXTURES();
  auto g = SafetensorsFile::open(test::fixtures_dir() + "/scheduler/goldens.safetensors");
  for (auto [steps, seq] : {std::pair{28, 4096}, {4, 64}, {50, 1024}, {20, 6400}}) {
    FlowMatchEulerScheduler s(FlowMatchSchedulerConfig::flux1_dev());
    s.set_timesteps(steps, seq);
    const std::string tag = std::to_string(steps) + "_" + std::to_string(seq);
    expect_close(s.sigmas(), g->tensor("dev_sigmas_" + tag), 1e-6, "sigmas " + tag);
    expect_close(s.timesteps(), g->tensor("dev_timesteps_" + tag), 1e-6, "timesteps " + tag);
  }
}

TEST(Scheduler, SchnellGoldens) {
  FLUXSWAP_REQUIRE_FIXTURES();
  auto g = SafetensorsFile::open(test::fixtures_dir() + "/scheduler/goldens.safetensors");
  FlowMatchEulerScheduler s(FlowMatchSchedulerConfig::flux1_schnell());
  s.set_timesteps(4, 4096);
  expect_close(s.sigmas(), g->tensor("schnell_sigmas_4"), 1e-6, "schnell sigmas");
  expect_close(s.timesteps(), g->tensor("schnell_timesteps_4"), 1e-6, "schnell timesteps");
}

TEST(Scheduler, PipelineConfigFileIsRead) {
  FLUXSWAP_REQUIRE_FIXTURES();
  auto c = FlowMatchSchedulerConfig::from_json_file(test::fixtures_dir() +
                                                    "/tiny/pipeline/scheduler/scheduler_config.json");
  EXPECT_TRUE(c.use_dynamic_shifting);
  EXPECT_DOUBLE_EQ(c.max_shift, 1.15);
  EXPECT_EQ(c.max_image_seq_len, 4096);
}

TEST(Scheduler, EulerStepMovesAlongTheVelocity) {
  FlowMatchEulerScheduler s(FlowMatchSchedulerConfig::flux1_schnell());
  s.set_timesteps(4, 1024);  // sigmas 1, 0.75, 0.5, 0.25, 0
  std::vector<float> x = {1.0f, -2.0f}, v = {4.0f, 8.0f};
  s.step(1, v.data(), x.data(), x.size());
  EXPECT_FLOAT_EQ(x[0], 1.0f - 0.25f * 4.0f);
  EXPECT_FLOAT_EQ(x[1], -2.0f - 0.25f * 8.0f);
  EXPECT_THROW(s.step(4, v.data(), x.data(), x.size()), Error);
}

TEST(Scheduler, MuIsLinearInSequenceLength) {
  FlowMatchEulerScheduler s;
  EXPECT_NEAR(s.mu_for(256), 0.5, 1e-12);
  EXPECT_NEAR(s.mu_for(4096), 1.15, 1e-12);
}

}  // namespace
}  // namespace fluxswap
