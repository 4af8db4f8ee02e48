// Transformer blocks streamed from host memory (FluxTransformer::stream_blocks, the "streamed" memory plan) on the
// CPU reference: the same bits as a resident transformer for any choice of streamed blocks and prefetch depth, the
// plan's measurement of streamed blocks, and LoRAs under streaming: runtime slots stay on the device, merged ones are
// refused. (The tiny pipeline never needs a streamed plan: CLIP's embedding and the VAE's buffers outweigh its
// transformer at any size; FLUX-sized plans are tested in test_memory_plan.cpp, host-loaded blocks on the GPU.)
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>

#include "core/error.h"
#include "fp8_checkpoint_writer.h"
#include "lora/lora_controller.h"
#include "model/flux_transformer_io.h"
#include "pipeline/flux_pipeline.h"
#include "pipeline_golden_params.h"
#include "test_support.h"

namespace fluxswap {
namespace {

using test::same_bits;
using test::error_of;

double max_rel_diff(const Tensor& a, const Tensor& b) {
  double worst = 0, scale = 0;
  for (int64_t i = 0; i < a.numel(); ++i) scale = std::max(scale, double(std::fabs(b.ptr<float>()[i])));
  for (int64_t i = 0; i < a.numel(); ++i)
    worst = std::max(worst, double(std::fabs(a.ptr<float>()[i] - b.ptr<float>()[i])));
  return worst / scale;
}

size_t block_count(FluxPipeline& p) {
  const FluxConfig& c = p.transformer().config();
  return size_t(c.num_layers + c.num_single_layers);
}

TEST(BlockStreaming, AnyStreamedBlocksGiveTheSameBits) {
  FLUXSWAP_REQUIRE_FIXTURES();
  auto be = make_cpu_backend();
  auto pipe = FluxPipeline::from_pretrained(test::tiny_pipeline_dir(), *be);
  const GenerateParams p = test::tiny_golden_params();
  const GenerateResult resident = pipe->generate(p);
  const size_t n = block_count(*pipe);
  ASSERT_GE(n, 3u);
  FluxTransformer& t = pipe->transformer();
  const uint64_t all_bytes = [&] {
    uint64_t s = 0;
    for (uint64_t b : t.block_weight_bytes()) s += b;
    return s;
  }();

  std::vector<bool> every_other(n), none(n, false), first_only(n, false);
  for (size_t b = 0; b < n; ++b) every_other[b] = b % 2 == 0;
  first_only[0] = true;
  for (const auto& [mask, depth] : {std::pair{every_other, 1}, {every_other, 2}, {none, 2}, {first_only, 1}}) {
    t.stream_blocks(mask, depth);
    ASSERT_TRUE(t.streaming().active());
    EXPECT_EQ(t.streaming().depth(), depth);
    size_t streamed = 0;
    for (size_t b = 0; b < n; ++b) {
      EXPECT_EQ(t.streaming().streamed(b), !mask[b]) << "block " << b;
      streamed += !mask[b];
    }
    EXPECT_EQ(t.streaming().streamed_blocks(), streamed);
    // Only depth + 1 buffers on the device, each as large as the largest streamed block (256-byte aligned tensors).
    EXPECT_GT(t.streaming().bytes_per_forward(), 0u);
    EXPECT_LE(t.streaming().bytes_per_forward(), all_bytes + n * 64 * 256);
    EXPECT_LE(t.streaming().buffer_bytes(), uint64_t(depth + 1) * t.streaming().bytes_per_forward());
    for (int i = 0; i < 2; ++i) {
      const GenerateResult r = pipe->generate(p);
      EXPECT_TRUE(same_bits(r.latents, resident.latents)) << "depth " << depth << ", image " << i;
      EXPECT_EQ(r.images[0].pixels, resident.images[0].pixels);
    }
    // The plan's view of the transformer: streamed blocks count what they upload.
    const std::vector<uint64_t> sizes = t.block_weight_bytes();
    for (size_t b = 0; b < n; ++b) EXPECT_GT(sizes[b], 0u);
  }
  t.stream_blocks({}, 0);
  EXPECT_FALSE(t.streaming().active());
  EXPECT_TRUE(same_bits(pipe->generate(p).latents, resident.latents));
  // Other masks are checked against the model.
  EXPECT_NE(error_of([&] { t.stream_blocks(std::vector<bool>(n + 1, false), 1); }).find("blocks"), std::string::npos);
  EXPECT_NE(error_of([&] { t.stream_blocks(none, 0); }).find("prefetch depth"), std::string::npos);
}

// An FP8 checkpoint with every other block loaded into host memory and streamed, against the same file uploaded:
// the same bits, with FP8 attention or without, composing the gated residuals or taking the GPU's path (projections
// added in their GEMMs: resident, the step's gated factors made up front; streamed, each op makes its own once its
// block has arrived). The GPU twin (tests/cuda/test_cuda_block_streaming.cpp) allows for cuDNN's FP8 attention.
TEST(BlockStreaming, Fp8CheckpointStreamedGivesTheUploadedBits) {
  FLUXSWAP_REQUIRE_FIXTURES();
  test::TempDir tmp;
  const test::Fp8File file = test::write_fp8_checkpoint(tmp.path().string(), true, "model.diffusion_model.");
  const FluxCheckpoint ck = open_flux_checkpoint(file.path);
  auto goldens = SafetensorsFile::open(test::fixtures_dir() + "/tiny/transformer_goldens.safetensors");
  const FluxHostInputs inputs = read_flux_inputs(*goldens);
  const size_t n = size_t(ck.config.num_layers + ck.config.num_single_layers);
  std::vector<bool> resident(n), on_host(n);
  for (size_t b = 0; b < n; ++b) resident[b] = b % 2 == 1, on_host[b] = !resident[b];
  for (const bool in_gemm : {false, true})
    for (const bool fp8_attention : {false, true}) {
      SCOPED_TRACE(std::string(in_gemm ? "in the GEMMs" : "composed") + (fp8_attention ? ", FP8 attention" : ""));
      auto be = make_cpu_backend(in_gemm);
      FluxTransformer uploaded(ck.config, load_flux_weights(ck, *be), *be);
      FluxTransformer streamed(ck.config, load_flux_weights(ck, *be, nullptr, on_host), *be);
      streamed.stream_blocks(resident, 1);
      ASSERT_TRUE(streamed.streaming().active());
      for (FluxTransformer* t : {&uploaded, &streamed}) t->set_precision(true, fp8_attention);
      EXPECT_TRUE(same_bits(run_flux_transformer(streamed, inputs), run_flux_transformer(uploaded, inputs)));
    }
}

TEST(BlockStreaming, PlansMeasureWhatStreamedBlocksUpload) {
  FLUXSWAP_REQUIRE_FIXTURES();
  auto be = make_cpu_backend();
  auto pipe = FluxPipeline::from_pretrained(test::tiny_pipeline_dir(), *be);
  const GenerateParams p = test::tiny_golden_params();
  const GenerateResult unlimited = pipe->generate(p);
  const FluxWorkload work = pipe->workload_for(p);
  auto request = [&] {
    return measured_plan_request({1, work, 0}, pipe->transformer(), pipe->t5(), pipe->clip(), pipe->vae(),
                                 be->memory_in_use());
  };
  const MemoryPlanRequest before = request();
  const size_t n = block_count(*pipe);
  std::vector<bool> mask(n, true);
  mask[1] = mask[n - 1] = false;
  pipe->transformer().stream_blocks(mask, 2);
  const MemoryPlanRequest streamed = request();
  ASSERT_EQ(streamed.transformer.block_bytes.size(), n);
  EXPECT_EQ(streamed.transformer.shared_bytes, before.transformer.shared_bytes);
  for (size_t b = 0; b < n; ++b) {
    if (mask[b]) {
      EXPECT_EQ(streamed.transformer.block_bytes[b], before.transformer.block_bytes[b]) << "block " << b;
      continue;
    }
    // A streamed block counts what it uploads: its tensors, each starting on a 256-byte boundary.
    EXPECT_EQ(streamed.transformer.block_bytes[b], pipe->transformer().streaming().block_upload_bytes(b));
    EXPECT_GE(streamed.transformer.block_bytes[b], before.transformer.block_bytes[b]);
    EXPECT_LT(streamed.transformer.block_bytes[b], before.transformer.block_bytes[b] + 64 * 256);
  }
  // Precision is chosen before streaming.
  EXPECT_NE(error_of([&] { pipe->transformer().set_fp8(true); }).find("streams its blocks"), std::string::npos);
  // Without a budget everything comes back.
  EXPECT_EQ(pipe->set_memory_budget({}), nullptr);
  EXPECT_FALSE(pipe->transformer().streaming().active());
  EXPECT_TRUE(same_bits(pipe->generate(p).latents, unlimited.latents));
}

TEST(BlockStreaming, RuntimeLorasStayOnTheDeviceMergedAreRefused) {
  FLUXSWAP_REQUIRE_FIXTURES();
  auto be = make_cpu_backend();
  auto pipe = FluxPipeline::from_pretrained(test::tiny_pipeline_dir(), *be);
  const GenerateParams p = test::tiny_golden_params();
  const FluxConfig& c = pipe->transformer().config();
  const auto a = std::make_shared<LoraAdapter>(load_lora_adapter(test::fixtures_dir() + "/tiny/lora_a_peft.safetensors", c));
  const auto b = std::make_shared<LoraAdapter>(load_lora_adapter(test::fixtures_dir() + "/tiny/lora_b_peft.safetensors", c));
  const size_t n = block_count(*pipe);
  std::vector<bool> every_other(n);
  for (size_t i = 0; i < n; ++i) every_other[i] = i % 2 == 1;

  Tensor with_a, with_b;
  {
    // Slots made before streaming live inside [W | up] and move out of the streamed weights.
    LoraController runtime(pipe->transformer(), LoraMode::Runtime, 8);
    runtime.set_adapters({{a, 1.0f}});
    with_a = pipe->generate(p).latents;
    runtime.set_adapters({{b, 1.0f}});
    with_b = pipe->generate(p).latents;
    pipe->transformer().stream_blocks(every_other, 2);
    // [x | x down^T] [W | up]^T and W x + up (down x) sum in another order: float32 rounding apart.
    EXPECT_LT(max_rel_diff(pipe->generate(p).latents, with_b), 1e-4);
    runtime.set_adapters({{a, 1.0f}});  // a swap refills the moved slots
    EXPECT_LT(max_rel_diff(pipe->generate(p).latents, with_a), 1e-4);
    const std::string merged = error_of([&] {
      LoraController m(pipe->transformer(), LoraMode::Merged);
      m.set_adapters({{a, 1.0f}});
    });
    EXPECT_NE(merged.find("streams from host memory"), std::string::npos) << merged;
    EXPECT_NE(merged.find("use runtime mode"), std::string::npos) << merged;
  }
  // Slots made while streaming are separate matrices from the start.
  LoraController runtime(pipe->transformer(), LoraMode::Runtime, 8);
  runtime.set_adapters({{b, 1.0f}});
  EXPECT_LT(max_rel_diff(pipe->generate(p).latents, with_b), 1e-4);
  pipe->transformer().stream_blocks({}, 0);
  EXPECT_LT(max_rel_diff(pipe->generate(p).latents, with_b), 1e-4);
}

}  // namespace
}  // namespace fluxswap
