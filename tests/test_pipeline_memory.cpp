// Components on demand under a memory budget, on the CPU reference: offload/onload round trips of the text encoders
// and the VAE, the plan a loaded pipeline gets from its real sizes, images that stay bit-identical when the text
// encoders come and go, and the error for a budget that would need the transformer streamed.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <tuple>

#include "core/error.h"
#include "lora/lora_controller.h"
#include "pipeline/flux_pipeline.h"
#include "pipeline_golden_params.h"
#include "test_support.h"

namespace fluxswap {
namespace {

using test::same_bits;
using test::error_of;

std::vector<uint8_t> bytes_of(const Tensor& t) {
  const auto* p = static_cast<const uint8_t*>(t.data());
  return {p, p + t.nbytes()};
}

TEST(ComponentOffload, TextEncodersAndVaeComeBackBitIdentical) {
  FLUXSWAP_REQUIRE_FIXTURES();
  auto be = make_cpu_backend();
  auto pipe = FluxPipeline::from_pretrained(test::tiny_pipeline_dir(), *be);
  const EncodedPrompts before = pipe->encode_prompts({"a red fox in the snow"}, 32);
  const Tensor latents = Tensor::zeros(DType::F32, {1, 16, 4 * pipe->vae().config().latent_channels});
  for (int64_t i = 0; i < latents.numel(); ++i) latents.ptr<float>()[i] = float((i * 37) % 11) / 5.0f - 1.0f;
  const std::vector<uint8_t> image_before = bytes_of(pipe->vae().decode_to_rgb8(latents, 8, 8));

  const uint64_t t5_bytes = pipe->t5().weight_bytes(), clip_bytes = pipe->clip().weight_bytes();
  EXPECT_GT(t5_bytes, 0u);
  pipe->t5().offload();
  pipe->t5().offload();  // idempotent
  pipe->clip().offload();
  pipe->vae().offload();
  EXPECT_FALSE(pipe->t5().resident());
  EXPECT_FALSE(pipe->clip().resident());
  EXPECT_FALSE(pipe->vae().resident());
  // The same bytes come back (each weight padded to 256 bytes in the host copy).
  EXPECT_GE(pipe->t5().weight_bytes(), t5_bytes);
  EXPECT_LT(pipe->t5().weight_bytes(), t5_bytes + 256 * 64);
  EXPECT_GE(pipe->clip().weight_bytes(), clip_bytes);
  const Tensor ids = Tensor::zeros(DType::I32, {1, 8});
  EXPECT_NE(error_of([&] { pipe->t5().encode(ids, Tensor::empty(DType::F32, {1, 8, 40})); }).find("offloaded"),
            std::string::npos);
  EXPECT_NE(error_of([&] { pipe->vae().decode_to_rgb8(latents, 8, 8); }).find("offloaded"), std::string::npos);

  for (int round = 0; round < 2; ++round) {  // the second offload reuses the host copy
    pipe->t5().onload();
    pipe->t5().onload();
    pipe->clip().onload();
    pipe->vae().onload();
    EXPECT_TRUE(pipe->t5().resident());
    const EncodedPrompts after = pipe->encode_prompts({"a red fox in the snow"}, 32);
    EXPECT_TRUE(same_bits(after.prompt_embeds, before.prompt_embeds));
    EXPECT_TRUE(same_bits(after.pooled, before.pooled));
    EXPECT_EQ(bytes_of(pipe->vae().decode_to_rgb8(latents, 8, 8)), image_before);
    pipe->t5().offload();
    pipe->clip().offload();
    pipe->vae().offload();
  }
}

TEST(ComponentOffload, StorageBytesCountSharedAllocationsOnce) {
  const Tensor a = Tensor::empty(DType::F32, {10, 4});
  const Tensor top = a.narrow(0, 0, 5), bottom = a.narrow(0, 5, 5), b = Tensor::empty(DType::BF16, {3});
  EXPECT_EQ(tensor_storage_bytes({&top, &bottom, &b}), 160u + 6u);
  EXPECT_EQ(tensor_storage_bytes({&bottom}), 80u);
  const Tensor undefined;
  EXPECT_EQ(tensor_storage_bytes({&undefined}), 0u);
}

// The request measured from the loaded tiny pipeline, with no reserve: its components are kilobytes.
MemoryPlanRequest tiny_request(FluxPipeline& pipe, const FluxWorkload& work, Backend& be) {
  return measured_plan_request({1, work, 0}, pipe.transformer(), pipe.t5(), pipe.clip(), pipe.vae(),
                               be.memory_in_use());
}

TEST(PipelineMemoryBudget, MeasuresTheLoadedComponents) {
  FLUXSWAP_REQUIRE_FIXTURES();
  auto be = make_cpu_backend();
  auto pipe = FluxPipeline::from_pretrained(test::tiny_pipeline_dir(), *be);
  const FluxWorkload work = pipe->workload_for(test::tiny_golden_params());
  EXPECT_EQ(work.width, 32);
  EXPECT_EQ(work.batch, 1);
  const MemoryPlanRequest r = tiny_request(*pipe, work, *be);
  // Every transformer tensor once, float32 on the CPU, split into its blocks and the shared rest.
  uint64_t by_name = 0;
  for (const auto& [name, t] : pipe->transformer().weights().by_name) by_name += t.nbytes();
  EXPECT_EQ(r.transformer.weight_bytes(), by_name);
  const FluxConfig& c = pipe->transformer().config();
  ASSERT_EQ(r.transformer.block_bytes.size(), size_t(c.num_layers + c.num_single_layers));
  for (uint64_t b : r.transformer.block_bytes) EXPECT_GT(b, 0u);
  EXPECT_EQ(r.transformer.format, WeightFormat::BF16);
  EXPECT_EQ(r.t5.weight_bytes, pipe->t5().weight_bytes());
  EXPECT_EQ(r.clip.weight_bytes, pipe->clip().weight_bytes());
  // 49,408 x 24 token embeddings dominate the tiny CLIP.
  EXPECT_GE(r.clip.weight_bytes, 49408u * 24u * 4u);
  EXPECT_GT(r.t5.activation_bytes, 0u);
  EXPECT_EQ(r.reserve_bytes, 0u);
  // Runtime LoRA slots not made yet are added as computed.
  FluxWorkload with_lora = work;
  with_lora.lora_rank = 4;
  EXPECT_GT(tiny_request(*pipe, with_lora, *be).transformer.shared_bytes, r.transformer.shared_bytes);
}

TEST(PipelineMemoryBudget, OnDemandTextEncodersGiveTheSameImage) {
  FLUXSWAP_REQUIRE_FIXTURES();
  auto be = make_cpu_backend();
  auto pipe = FluxPipeline::from_pretrained(test::tiny_pipeline_dir(), *be);
  const GenerateParams p = test::tiny_golden_params();
  const GenerateResult unlimited = pipe->generate(p);
  EXPECT_EQ(pipe->memory_plan(), nullptr);

  // The smallest budget that keeps the transformer: T5 and the VAE come and go. (CLIP's 49,408-token embedding is
  // the largest weight of the tiny pipeline, so its encode sets the peak whether it stays or not, and it stays.)
  const FluxWorkload work = pipe->workload_for(p);
  const uint64_t budget = smallest_budget_with_resident_transformer(tiny_request(*pipe, work, *be));
  const MemoryPlan* plan = pipe->set_memory_budget({budget, work, 0});
  ASSERT_NE(plan, nullptr);
  EXPECT_EQ(plan->component("transformer").placement, Placement::Resident);
  EXPECT_EQ(plan->component("t5").placement, Placement::OnDemand) << plan->to_string();
  EXPECT_LE(plan->peak_bytes, budget);
  auto placed_as_planned = [&] {
    EXPECT_EQ(pipe->t5().resident(), plan->component("t5").placement == Placement::Resident);
    EXPECT_EQ(pipe->clip().resident(), plan->component("clip").placement == Placement::Resident);
    EXPECT_EQ(pipe->vae().resident(), plan->component("vae").placement == Placement::Resident);
  };
  placed_as_planned();

  for (int i = 0; i < 2; ++i) {  // the second image after a full round trip
    const GenerateResult budgeted = pipe->generate(p);
    EXPECT_TRUE(same_bits(budgeted.latents, unlimited.latents));
    ASSERT_EQ(budgeted.images.size(), 1u);
    EXPECT_EQ(budgeted.images[0].pixels, unlimited.images[0].pixels);
    placed_as_planned();  // on-demand ones left after their phase
  }

  // encode_prompts on its own leaves them off the device too.
  pipe->encode_prompts({"x"}, 16);
  EXPECT_FALSE(pipe->t5().resident());

  // No budget again: everything back, the same image.
  EXPECT_EQ(pipe->set_memory_budget({}), nullptr);
  EXPECT_TRUE(pipe->t5().resident());
  EXPECT_TRUE(pipe->clip().resident());
  EXPECT_TRUE(pipe->vae().resident());
  EXPECT_EQ(pipe->generate(p).images[0].pixels, unlimited.images[0].pixels);
}

TEST(PipelineMemoryBudget, BelowTheResidentBudgetTheTransformerComesPerImage) {
  FLUXSWAP_REQUIRE_FIXTURES();
  auto be = make_cpu_backend();
  auto pipe = FluxPipeline::from_pretrained(test::tiny_pipeline_dir(), *be);
  const GenerateParams p = test::tiny_golden_params();
  const GenerateResult unlimited = pipe->generate(p);
  const FluxWorkload work = pipe->workload_for(p);
  MemoryPlanRequest request = tiny_request(*pipe, work, *be);
  const uint64_t smallest = smallest_budget_with_resident_transformer(request);
  // The largest budget below that whose plan uploads the transformer per image (rather than streaming blocks).
  uint64_t budget = 0;
  for (uint64_t b = smallest - 1; b > smallest / 2 && !budget; b -= std::max<uint64_t>(1, smallest / 1000)) {
    request.budget_bytes = b;
    try {
      if (plan_memory(request).component("transformer").placement == Placement::OnDemand) budget = b;
    } catch (const Error&) {
    }
  }
  ASSERT_GT(budget, 0u) << "no budget below " << smallest << " plans the transformer on demand";
  const MemoryPlan* plan = pipe->set_memory_budget({budget, work, 0});
  ASSERT_NE(plan, nullptr);
  EXPECT_EQ(plan->component("transformer").placement, Placement::OnDemand) << plan->to_string();
  for (int i = 0; i < 2; ++i) {
    const GenerateResult r = pipe->generate(p);
    EXPECT_EQ(r.images[0].pixels, unlimited.images[0].pixels);
    EXPECT_TRUE(same_bits(r.latents, unlimited.latents));
    EXPECT_FALSE(pipe->transformer().resident()) << "it leaves after its phase";
  }
  // Merged LoRAs would be written into weights that are not there: refused. Runtime slots are sized from the weights
  // (which come back for it); a bf16 model keeps them inside its weights ([W | up]), which then cannot leave: the
  // generation says so before anything moves (an FP8 checkpoint's slots are separate and stay on the device).
  {
    const auto adapter = std::make_shared<LoraAdapter>(load_lora_adapter(
        test::fixtures_dir() + "/tiny/lora_a_peft.safetensors", pipe->transformer().config()));
    LoraController merged(pipe->transformer(), LoraMode::Merged);
    EXPECT_NE(error_of([&] { merged.set_adapters({{adapter, 1.0f}}); }).find("use runtime mode"), std::string::npos);
    LoraController runtime(pipe->transformer(), LoraMode::Runtime, 4);
    EXPECT_TRUE(pipe->transformer().resident());
    runtime.set_adapters({{adapter, 1.0f}});
    EXPECT_NE(error_of([&] { pipe->generate(p); }).find("runtime LoRA slots live inside its weights"),
              std::string::npos);
  }
  {  // a controller that goes while the weights are away (merged: nothing applied) leaves them be
    ASSERT_NO_THROW(pipe->generate(p));
    ASSERT_FALSE(pipe->transformer().resident());
    LoraController merged(pipe->transformer(), LoraMode::Merged);
  }
  EXPECT_EQ(pipe->generate(p).images[0].pixels, unlimited.images[0].pixels) << "after the LoRA went";
  // No budget again: resident again, the same image.
  EXPECT_EQ(pipe->set_memory_budget({}), nullptr);
  EXPECT_TRUE(pipe->transformer().resident());
  EXPECT_EQ(pipe->generate(p).images[0].pixels, unlimited.images[0].pixels);

  // With the default reserve (1 GB of what a GPU needs besides the weights) a few megabytes are far too little, and
  // from_pretrained says so before loading anything.
  const std::string too_small = error_of([&] { FluxPipeline::from_pretrained(test::tiny_pipeline_dir(), *be, {{1000000, work}}); });
  EXPECT_NE(too_small.find("is too small"), std::string::npos) << too_small;
}

TEST(PipelineMemoryBudget, FromPretrainedAppliesThePlan) {
  FLUXSWAP_REQUIRE_FIXTURES();
  auto be = make_cpu_backend();
  auto probe = FluxPipeline::from_pretrained(test::tiny_pipeline_dir(), *be);
  const GenerateParams p = test::tiny_golden_params();
  const FluxWorkload work = probe->workload_for(p);
  const uint64_t budget = smallest_budget_with_resident_transformer(tiny_request(*probe, work, *be));
  const GenerateResult unlimited = probe->generate(p);
  probe.reset();

  auto pipe = FluxPipeline::from_pretrained(test::tiny_pipeline_dir(), *be, {{budget, work, 0}});
  ASSERT_NE(pipe->memory_plan(), nullptr);
  EXPECT_FALSE(pipe->t5().resident());
  EXPECT_EQ(pipe->generate(p).images[0].pixels, unlimited.images[0].pixels);
}

// `fluxswap generate --vram` as a user runs it.
std::pair<int, std::string> run_generate(const std::string& args) {
  const std::string cmd = std::string(FLUXSWAP_BINARY) + " generate --device cpu --model " + test::tiny_pipeline_dir() +
                          " -p 'a red fox' --width 32 --height 32 --steps 2 " + args + " 2>&1";
  FILE* pipe = popen(cmd.c_str(), "r");
  if (!pipe) return {-1, ""};
  std::string out;
  char buf[4096];
  while (size_t n = fread(buf, 1, sizeof buf, pipe)) out.append(buf, n);
  return {WEXITSTATUS(pclose(pipe)), out};
}

TEST(PipelineMemoryBudget, GenerateCommandPrintsThePlanOrTheReason) {
  FLUXSWAP_REQUIRE_FIXTURES();
  test::TempDir tmp;
  auto [status, out] = run_generate("--vram 24G -o " + (tmp / "a.png"));
  ASSERT_EQ(status, 0) << out;
  EXPECT_NE(out.find("memory   plan: resident: transformer"), std::string::npos) << out;
  EXPECT_NE(out.find("of 24 GB"), std::string::npos) << out;
  std::tie(status, out) = run_generate("--vram 1M -o " + (tmp / "b.png"));
  EXPECT_EQ(status, 1) << out;
  EXPECT_NE(out.find("is too small"), std::string::npos) << out;
  std::tie(status, out) = run_generate("--vram 24X -o " + (tmp / "c.png"));
  EXPECT_EQ(status, 1) << out;
  EXPECT_NE(out.find("memory budget '24X'"), std::string::npos) << out;
}

}  // namespace
}  // namespace fluxswap
