// The executable as a user runs it: exit codes, files written, and the message for a bad input.
#include <gtest/gtest.h>

#include <array>
#include <cstdio>
#include <fstream>
#include <random>
#include <set>

#include "core/compare.h"
#include "io/safetensors.h"
#include "model/flux_checkpoint.h"
#include "pipeline/png_image.h"
#include "test_support.h"

namespace fluxswap {
namespace {

struct CommandResult {
  int status;
  std::string output;
};

CommandResult run_fluxswap(const std::string& args) {
  const std::string cmd = std::string(FLUXSWAP_BINARY) + " " + args + " 2>&1";
  FILE* pipe = popen(cmd.c_str(), "r");
  CommandResult r{-1, ""};
  if (!pipe) return r;
  std::array<char, 4096> buf;
  while (size_t n = fread(buf.data(), 1, buf.size(), pipe)) r.output.append(buf.data(), n);
  r.status = pclose(pipe);
  return r;
}

TEST(Cli, GenerateWritesAPngWithItsParameters) {
  FLUXSWAP_REQUIRE_FIXTURES();
  test::TempDir tmp;
  const std::string fx = test::fixtures_dir() + "/tiny";
  CommandResult r = run_fluxswap("generate --device cpu --model " + fx + "/pipeline -p 'a red fox' --width 32 --height 48 --steps 2 "
              "--seed 7 --lora " + fx + "/lora_a_peft.safetensors:0.5 -o " + (tmp / "fox.png"));
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_NE(r.output.find("LoRA tensors applied"), std::string::npos) << r.output;
  std::map<std::string, std::string> text;
  Rgb8Image img = read_png(tmp / "fox.png", &text);
  EXPECT_EQ(img.width, 32);
  EXPECT_EQ(img.height, 48);
  const std::string& params = text["parameters"];
  EXPECT_EQ(params.rfind("a red fox\nSteps: 2, Sampler: Euler", 0), 0u) << params;
  EXPECT_NE(params.find("Seed: 7"), std::string::npos) << params;
  EXPECT_NE(params.find("Size: 32x48"), std::string::npos) << params;
  EXPECT_NE(params.find("Lora: lora_a_peft:0.5"), std::string::npos) << params;
}

TEST(Cli, GenerateBatchWritesOneDifferentImagePerSample) {
  FLUXSWAP_REQUIRE_FIXTURES();
  test::TempDir tmp;
  const std::string fx = test::fixtures_dir() + "/tiny";
  CommandResult r = run_fluxswap("generate --device cpu --model " + fx + "/pipeline -p 'a red fox' --batch 2 --width 32 "
                                 "--height 32 --steps 2 -o " + (tmp / "fox.png"));
  ASSERT_EQ(r.status, 0) << r.output;
  const Rgb8Image a = read_png(tmp / "fox-0.png"), b = read_png(tmp / "fox-1.png");
  EXPECT_EQ(a.pixels.size(), b.pixels.size());
  EXPECT_NE(a.pixels, b.pixels);
}

// A LoRA file with a CLIP (kohya lora_te1_) and a T5 (lora_te3_) part: CLIP's is applied and changes the image,
// T5's is named in a warning, and none of it needs a transformer LoRA controller. Beside a transformer LoRA in one
// file, both halves are applied.
TEST(Cli, GenerateAppliesClipLorasAloneOrBesideTheTransformersAndWarnsAboutT5Keys) {
  FLUXSWAP_REQUIRE_FIXTURES();
  test::TempDir tmp;
  const std::string fx = test::fixtures_dir() + "/tiny";
  const int64_t hidden = 24, inter = 37;  // the tiny pipeline's CLIP (text_encoder/config.json)
  Tensor down = Tensor::empty(DType::F32, {4, hidden}), up = Tensor::empty(DType::F32, {inter, 4});
  std::mt19937 rng(5);
  test::fill_normal(down, rng, 0.5f);
  test::fill_normal(up, rng, 0.2f);
  const std::string stem = "lora_te1_text_model_encoder_layers_1_mlp_fc1";
  write_safetensors(tmp / "clip.safetensors", {{stem + ".lora_down.weight", down},
                                               {stem + ".lora_up.weight", up},
                                               {"lora_te3_encoder_block_0_layer_0_SelfAttention_q.lora_down.weight", down}});
  const std::string gen = "generate --device cpu --model " + fx + "/pipeline -p 'a red fox' --width 32 --height 32 "
                          "--steps 2 --seed 7 ";
  CommandResult r = run_fluxswap(gen + "--lora " + (tmp / "clip.safetensors") + " -o " + (tmp / "lora.png"));
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_NE(r.output.find("0 LoRA tensors applied to 0 transformer layers"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("2 to 1 CLIP text-encoder linears"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("warning  " + (tmp / "clip.safetensors") + ": 1 tensors not applied"), std::string::npos)
      << r.output;
  r = run_fluxswap(gen + "-o " + (tmp / "base.png"));
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_NE(read_png(tmp / "lora.png").pixels, read_png(tmp / "base.png").pixels);

  // The same CLIP pair inside a transformer LoRA (the kohya fixture), in runtime mode: both halves applied, and the
  // image differs from the transformer half's alone.
  auto kohya = SafetensorsFile::open(fx + "/lora_c_kohya.safetensors");
  std::vector<std::pair<std::string, Tensor>> mixed = {{stem + ".lora_down.weight", down},
                                                       {stem + ".lora_up.weight", up}};
  for (const auto& k : kohya->keys()) mixed.emplace_back(k, kohya->tensor(k));
  write_safetensors(tmp / "mixed.safetensors", mixed);
  r = run_fluxswap(gen + "--lora-mode runtime --lora " + (tmp / "mixed.safetensors") + " -o " + (tmp / "mixed.png"));
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_NE(r.output.find(std::to_string(kohya->keys().size()) + " LoRA tensors applied to"), std::string::npos)
      << r.output;
  EXPECT_NE(r.output.find("(runtime mode)"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("2 to 1 CLIP text-encoder linears"), std::string::npos) << r.output;
  r = run_fluxswap(gen + "--lora-mode runtime --lora " + fx + "/lora_c_kohya.safetensors -o " + (tmp / "kohya.png"));
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_NE(read_png(tmp / "mixed.png").pixels, read_png(tmp / "kohya.png").pixels);
  EXPECT_NE(read_png(tmp / "kohya.png").pixels, read_png(tmp / "base.png").pixels);
}

TEST(Cli, TransformerConformanceCommandReproducesTheGolden) {
  FLUXSWAP_REQUIRE_FIXTURES();
  test::TempDir tmp;
  const std::string fx = test::fixtures_dir() + "/small";
  CommandResult r = run_fluxswap("transformer --model " + fx + "/transformer_bfl.safetensors --inputs " + fx +
              "/transformer_goldens.safetensors --lora " + fx + "/lora_c_kohya.safetensors --out " + (tmp / "o.st"));
  ASSERT_EQ(r.status, 0) << r.output;
  auto out = SafetensorsFile::open(tmp / "o.st");
  auto golden = SafetensorsFile::open(fx + "/transformer_goldens.safetensors");
  EXPECT_LE(max_rel_error(out->tensor("out"), golden->tensor("out.lora_c_kohya_scale1")), 1e-4);
}

TEST(Cli, BadInputsGiveAClearErrorAndExitCode1) {
  FLUXSWAP_REQUIRE_FIXTURES();
  test::TempDir tmp;
  std::ofstream(tmp / "broken.safetensors") << "\x10\x00\x00\x00\x00\x00\x00\x00{not json";
  CommandResult r = run_fluxswap("transformer --model " + (tmp / "broken.safetensors") + " --inputs x");
  EXPECT_EQ(WEXITSTATUS(r.status), 1) << r.output;
  EXPECT_NE(r.output.find("error: "), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("broken.safetensors"), std::string::npos) << r.output;
  const std::string fx = test::fixtures_dir() + "/tiny";
  r = run_fluxswap("generate --device cpu --model " + fx + "/pipeline -p x --width 30 -o " + (tmp / "x.png"));
  EXPECT_EQ(WEXITSTATUS(r.status), 1) << r.output;
  EXPECT_NE(r.output.find("multiples of 16"), std::string::npos) << r.output;
}

// make-random-model writes a pipeline folder that generate loads through the real loaders, with the transformer in
// bf16 (diffusers names) or as one scaled-fp8 file (an FP8-only model).
TEST(Cli, MakeRandomModelWritesAPipelineThatGenerateRuns) {
  FLUXSWAP_REQUIRE_FIXTURES();
  test::TempDir tmp;
  const std::string tokenizers = test::fixtures_dir() + "/tiny/pipeline";
  for (const std::string dtype : {"bf16", "fp8"}) {
    SCOPED_TRACE(dtype);
    const std::string dir = tmp / ("model-" + dtype);
    CommandResult r = run_fluxswap("make-random-model --size tiny --transformer-dtype " + dtype +
                                   " --seed 5 --threads 2 --out " + dir + " --tokenizers " + tokenizers);
    ASSERT_EQ(r.status, 0) << r.output;
    EXPECT_NE(r.output.find("wrote    " + dir), std::string::npos) << r.output;
    const FluxCheckpoint ck = open_flux_checkpoint(dir);
    EXPECT_EQ(ck.fp8_linears, dtype == "fp8");
    EXPECT_EQ(ck.naming, dtype == "fp8" ? FluxNaming::BFL : FluxNaming::Diffusers);

    const std::string png = tmp / (dtype + ".png");
    r = run_fluxswap("generate --device cpu --model " + dir + " -p 'a red fox' --width 32 --height 48 --steps 2 -o " +
                     png);
    ASSERT_EQ(r.status, 0) << r.output;
    const Rgb8Image img = read_png(png);
    EXPECT_EQ(img.width, 32);
    EXPECT_EQ(img.height, 48);
    // Random weights give noise; NaN or runaway values would give one flat or clipped colour.
    const std::set<uint8_t> levels(img.pixels.begin(), img.pixels.end());
    size_t clipped = 0;
    for (uint8_t v : img.pixels) clipped += v == 0 || v == 255;
    EXPECT_GT(levels.size(), 32u);
    EXPECT_LT(clipped, img.pixels.size() / 2);
  }
  CommandResult r = run_fluxswap("make-random-model --size tiny --out " + (tmp / "model-bf16") + " --tokenizers " +
                                 tokenizers);
  EXPECT_EQ(WEXITSTATUS(r.status), 1) << r.output;
  EXPECT_NE(r.output.find("exists and is not an empty folder"), std::string::npos) << r.output;
}

}  // namespace
}  // namespace fluxswap
