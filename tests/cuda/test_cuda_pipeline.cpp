// The whole text-to-image pipeline on the GPU against diffusers' FluxPipeline outputs on the tiny fixtures (bf16:
// embeddings and final latents within 2e-2 of max|ref|, the 8-bit image within 12 levels anywhere, 1.5 on average).
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>

#include "cuda_test_util.h"
#include "lora/lora_controller.h"
#include "pipeline/flux_pipeline.h"
#include "../pipeline_golden_params.h"

namespace fluxswap {
namespace {

std::string fixtures() {
  if (const char* env = std::getenv("FLUXSWAP_FIXTURES")) return env;
  return FLUXSWAP_FIXTURES;
}

struct LevelStats {
  int max = 0;
  double mean = 0;
};

LevelStats level_difference(const Rgb8Image& img, const Tensor& reference) {
  Tensor ref = reference.to_f32();
  LevelStats s;
  for (size_t i = 0; i < img.pixels.size(); ++i) {
    const int d = std::abs(int(img.pixels[i]) - int(std::lround(ref.ptr<float>()[i] * 255.0f)));
    s.max = std::max(s.max, d);
    s.mean += d;
  }
  s.mean /= double(img.pixels.size());
  return s;
}

class CudaPipelineGolden : public ::testing::TestWithParam<std::string> {};

TEST_P(CudaPipelineGolden, EmbeddingsLatentsAndImage) {
  FLUXSWAP_CUDA_BACKEND(gpu);
  const std::string dir = fixtures() + "/" + GetParam();
  if (!std::filesystem::exists(dir + "/pipeline/model_index.json")) GTEST_SKIP() << "no fixtures at " << dir;
  auto pipe = FluxPipeline::from_pretrained(dir + "/pipeline", *gpu);
  auto g = SafetensorsFile::open(dir + "/pipeline_goldens.safetensors");
  const auto& meta = g->metadata();

  EncodedPrompts text = pipe->encode_prompts({meta.at("prompt0")}, std::stoi(meta.at("max_sequence_length")));
  const double embeds_err = max_rel_error(gpu->to_host_f32(text.prompt_embeds), g->tensor("prompt_embeds"));
  const double pooled_err = max_rel_error(gpu->to_host_f32(text.pooled), g->tensor("pooled_prompt_embeds"));
  EXPECT_LE(embeds_err, 2e-2);
  EXPECT_LE(pooled_err, 2e-2);

  GenerateParams p = test::golden_generate_params(*g);
  GenerateResult r = pipe->generate(p);
  const double latents_err = max_rel_error(r.latents, g->tensor("latents_out"));
  const LevelStats image = level_difference(r.images[0], g->tensor("image"));
  EXPECT_LE(latents_err, 2e-2);
  EXPECT_LE(image.max, 12);
  EXPECT_LE(image.mean, 1.5);

  LoraController lora(pipe->transformer(), LoraMode::Merged);
  lora.set_adapters({{std::make_shared<LoraAdapter>(
                          load_lora_adapter(dir + "/lora_a_peft.safetensors", pipe->transformer().config())),
                      1.0f}});
  p.prompts = {meta.at("prompt1")};
  const LevelStats lora_image = level_difference(pipe->generate(p).images[0], g->tensor("image_lora_a_prompt1"));
  EXPECT_LE(lora_image.max, 12);
  EXPECT_LE(lora_image.mean, 1.5);
  std::printf("[ golden   ] %s pipeline on GPU: prompt_embeds %.3g, pooled %.3g, latents %.3g, image max %d mean %.2f "
              "levels, with LoRA a: max %d mean %.2f levels\n",
              GetParam().c_str(), embeds_err, pooled_err, latents_err, image.max, image.mean, lora_image.max,
              lora_image.mean);
}

INSTANTIATE_TEST_SUITE_P(Fixtures, CudaPipelineGolden, ::testing::Values("tiny", "tiny_schnell"));

}  // namespace
}  // namespace fluxswap
