// The whole text-to-image pipeline on the CPU reference against diffusers' FluxPipeline outputs on the tiny
// fixtures: text embeddings and final latents (max|a-b|/max|b| <= 1e-4), the 8-bit image within 1/255.
#include <gtest/gtest.h>

#include <cmath>

#include "core/compare.h"
#include "core/counter_rng.h"
#include "lora/lora_controller.h"
#include "pipeline/flux_pipeline.h"
#include "pipeline_golden_params.h"
#include "test_support.h"

namespace fluxswap {
namespace {

constexpr double kTolerance = 1e-4;

// Largest difference in 8-bit levels between our image and the reference's float image in 0..1.
int max_level_difference(const Rgb8Image& img, const Tensor& reference) {
  Tensor ref = reference.to_f32();
  EXPECT_EQ(int64_t(img.pixels.size()), ref.numel());
  int worst = 0;
  for (size_t i = 0; i < img.pixels.size(); ++i)
    worst = std::max(worst, std::abs(int(img.pixels[i]) - int(std::lround(ref.ptr<float>()[i] * 255.0f))));
  return worst;
}

class PipelineGolden : public ::testing::TestWithParam<std::string> {};

TEST_P(PipelineGolden, TextEmbeddingsLatentsAndImage) {
  FLUXSWAP_REQUIRE_FIXTURES();
  const std::string dir = test::fixtures_dir() + "/" + GetParam();
  auto backend = make_cpu_backend();
  auto pipe = FluxPipeline::from_pretrained(dir + "/pipeline", *backend);
  auto g = SafetensorsFile::open(dir + "/pipeline_goldens.safetensors");
  const auto& meta = g->metadata();

  EncodedPrompts text = pipe->encode_prompts({meta.at("prompt0")}, std::stoi(meta.at("max_sequence_length")));
  EXPECT_LE(max_rel_error(backend->to_host_f32(text.prompt_embeds), g->tensor("prompt_embeds")), kTolerance);
  EXPECT_LE(max_rel_error(backend->to_host_f32(text.pooled), g->tensor("pooled_prompt_embeds")), kTolerance);

  GenerateParams p = test::golden_generate_params(*g);
  int steps_seen = 0;
  p.on_step = [&](int, int, double) { ++steps_seen; };
  GenerateResult r = pipe->generate(p);
  EXPECT_EQ(steps_seen, p.steps);
  EXPECT_LE(max_rel_error(r.latents, g->tensor("latents_out")), kTolerance);
  ASSERT_EQ(r.images.size(), 1u);
  EXPECT_EQ(r.images[0].width, 32);
  EXPECT_LE(max_level_difference(r.images[0], g->tensor("image")), 1);

  // prompt1 with LoRA a (PEFT, weight 1) merged into the transformer.
  LoraController lora(pipe->transformer(), LoraMode::Merged);
  lora.set_adapters(
      {{std::make_shared<LoraAdapter>(load_lora_adapter(dir + "/lora_a_peft.safetensors", pipe->transformer().config())),
        1.0f}});
  p.prompts = {meta.at("prompt1")};
  GenerateResult rl = pipe->generate(p);
  EXPECT_LE(max_level_difference(rl.images[0], g->tensor("image_lora_a_prompt1")), 1);
}

INSTANTIATE_TEST_SUITE_P(Fixtures, PipelineGolden, ::testing::Values("tiny", "tiny_schnell"));

TEST(PipelineNoise, CountsInUnpackedOrderAndPacks) {
  Tensor packed = flux_initial_noise(42, 1, 4, 4, 6);
  EXPECT_EQ(packed.shape(), (Shape{1, 6, 16}));
  // Packed channel c*4 + dy*2 + dx of token i*(w/2) + j is latent (c, 2i + dy, 2j + dx); index c*h*w + y*w + x.
  const int64_t c = 2, i = 1, j = 2, dy = 1, dx = 0, h = 4, w = 6;
  const float want = normal_from_counter(42, uint64_t(c * h * w + (2 * i + dy) * w + (2 * j + dx)));
  EXPECT_EQ(packed.ptr<float>()[(i * (w / 2) + j) * 16 + c * 4 + dy * 2 + dx], want);
}

}  // namespace
}  // namespace fluxswap
