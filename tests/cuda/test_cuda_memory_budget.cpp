// The device memory budget on the GPU: the allocator refuses to go past it with an Error (before cudaMalloc), and the
// tiny pipeline run under a budget at its plan's peak, with components moved on demand, gives exactly the image of
// the unlimited run; a budget too small fails with the budget error and leaves the pipeline usable.
#include <gtest/gtest.h>

#include <cstring>
#include <filesystem>

#include "cuda_test_util.h"
#include "pipeline/flux_pipeline.h"
#include "../pipeline_golden_params.h"
#include "../test_support.h"

namespace fluxswap {
namespace {

using test::same_bits;
using test::error_of;

TEST(CudaMemoryBudget, AllocatorRefusesToExceedTheLimit) {
  FLUXSWAP_CUDA_BACKEND(gpu);
  const Tensor held = gpu->empty(DType::U8, {1 << 20});
  const size_t in_use = gpu->memory_in_use(), peak = gpu->peak_memory();
  gpu->set_memory_limit(in_use + (1 << 20));
  EXPECT_EQ(gpu->memory_limit(), in_use + (1 << 20));
  const std::string msg = error_of([&] { gpu->empty(DType::U8, {2 << 20}); });
  EXPECT_NE(msg.find("budget of " + std::to_string(in_use + (1 << 20)) + " bytes"), std::string::npos) << msg;
  EXPECT_NE(msg.find("allocating 2097152 bytes"), std::string::npos) << msg;
  EXPECT_NE(msg.find("with " + std::to_string(in_use) + " bytes"), std::string::npos) << msg;
  EXPECT_NE(msg.find("empty"), std::string::npos) << msg;  // the op
  EXPECT_EQ(gpu->memory_in_use(), in_use);                 // nothing was counted, nothing leaked
  EXPECT_EQ(gpu->peak_memory(), peak);
  const Tensor fits = gpu->empty(DType::U8, {1 << 19});
  EXPECT_EQ(gpu->memory_in_use(), in_use + (1 << 19));
  // The driver's view includes the CUDA context besides this backend's allocations.
  EXPECT_GT(gpu->device_memory_used(), gpu->memory_in_use());
  gpu->reset_peak_memory();
  EXPECT_EQ(gpu->peak_memory(), gpu->memory_in_use());
  gpu->set_memory_limit(0);
  const Tensor big = gpu->empty(DType::U8, {4 << 20});
  EXPECT_EQ(gpu->memory_limit(), 0u);
}

TEST(CudaMemoryBudget, TinyPipelineAtItsPlannedPeakMatchesTheUnlimitedRun) {
  FLUXSWAP_CUDA_BACKEND(gpu);
  const std::string dir = test::fixtures_dir() + "/tiny";
  if (!std::filesystem::exists(dir + "/pipeline/model_index.json")) GTEST_SKIP() << "no fixtures at " << dir;
  auto g = SafetensorsFile::open(dir + "/pipeline_goldens.safetensors");
  const GenerateParams p = test::golden_generate_params(*g);
  auto pipe = FluxPipeline::from_pretrained(dir + "/pipeline", *gpu);
  const GenerateResult unlimited = pipe->generate(p);  // also creates the library workspaces the plan then sees

  // The smallest budget that keeps the transformer, without the 1 GB reserve (kilobytes of weights): the plan
  // moves components on demand, and its peak is at most the budget.
  const FluxWorkload work = pipe->workload_for(p);
  const MemoryPlanRequest request = measured_plan_request({1, work, 0}, pipe->transformer(), pipe->t5(), pipe->clip(),
                                                          pipe->vae(), gpu->memory_in_use());
  const uint64_t smallest = smallest_budget_with_resident_transformer(request), budget = smallest;
  const MemoryPlan* plan = pipe->set_memory_budget({budget, work, 0});
  ASSERT_NE(plan, nullptr);
  EXPECT_LE(plan->peak_bytes, budget);
  EXPECT_EQ(gpu->memory_limit(), budget);
  EXPECT_EQ(plan->component("t5").placement, Placement::OnDemand) << plan->to_string();
  EXPECT_FALSE(pipe->t5().resident());
  gpu->reset_peak_memory();
  for (int i = 0; i < 2; ++i) {
    const GenerateResult r = pipe->generate(p);
    EXPECT_TRUE(same_bits(r.latents, unlimited.latents));
    EXPECT_EQ(r.images[0].pixels, unlimited.images[0].pixels);
    EXPECT_FALSE(pipe->t5().resident());
    EXPECT_GT(r.encode_memory.pool, 0u);
    EXPECT_GE(r.encode_memory.device, r.encode_memory.pool);
  }
  EXPECT_LE(gpu->peak_memory(), budget);
  std::printf("[ budget   ] tiny pipeline: %s; pool peak %zu bytes\n", plan->to_string().c_str(),
              gpu->peak_memory());

  // A cap below what T5 needs to come back: the budget error, and the pipeline stays usable.
  gpu->set_memory_limit(gpu->memory_in_use() + 256);
  const std::string msg = error_of([&] { pipe->generate(p); });
  EXPECT_NE(msg.find("device memory budget"), std::string::npos) << msg;
  EXPECT_NE(msg.find("would be exceeded"), std::string::npos) << msg;
  EXPECT_FALSE(pipe->t5().resident());
  gpu->set_memory_limit(budget);
  EXPECT_EQ(pipe->generate(p).images[0].pixels, unlimited.images[0].pixels);

  // A budget below what the transformer alone needs is refused by the plan, before anything moves. (Not
  // smallest - 1: after the generations above the measured sizes differ, and that budget may fit a plan again.)
  const std::string refused = error_of([&] { pipe->set_memory_budget({1000, work, 0}); });
  EXPECT_TRUE(refused.find("needs the transformer") != std::string::npos ||
              refused.find("is too small") != std::string::npos)
      << refused;
  EXPECT_EQ(gpu->memory_limit(), budget);
  EXPECT_FALSE(pipe->t5().resident());
}

}  // namespace
}  // namespace fluxswap
