// Finding and loading transformer checkpoints: folder layouts, the Hugging Face cache, key prefixes, config
// inference from shapes, and the errors a user sees for a broken or foreign checkpoint.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>

#include "core/compare.h"
#include "core/error.h"
#include "model/flux_random_weights.h"
#include "model/flux_transformer_io.h"
#include "test_support.h"

namespace fluxswap {
namespace {

namespace fsys = std::filesystem;

using test::error_of;

// Copies a checkpoint's tensors under new names; `rename` returns "" to drop a key.
void rewrite(const std::string& src, const std::string& dst, const std::function<std::string(std::string)>& rename,
             const std::function<Tensor(const std::string&, Tensor)>& edit = nullptr) {
  auto f = SafetensorsFile::open(src);
  std::vector<std::pair<std::string, Tensor>> out;
  for (const auto& k : f->keys()) {
    std::string n = rename(k);
    if (n.empty()) continue;
    Tensor t = f->tensor(k);
    out.emplace_back(n, edit ? edit(k, t) : t);
  }
  write_safetensors(dst, out);
}

// A FLUX-shaped model with 128-wide heads (so RoPE axes are inferable) but tiny everything else.
FluxConfig small_config(bool guidance) {
  FluxConfig c;
  c.num_layers = 1;
  c.num_single_layers = 1;
  c.num_attention_heads = 1;
  c.in_channels = 8;
  c.joint_attention_dim = 12;
  c.pooled_projection_dim = 6;
  c.guidance_embeds = guidance;
  return c;
}

void write_bfl(const FluxConfig& c, const std::string& path, const std::string& prefix) {
  auto cpu = make_cpu_backend();
  FluxWeights w = random_flux_weights(c, *cpu, 3);
  std::vector<std::pair<std::string, Tensor>> out;
  for (const auto& [name, t] : w.by_name) out.emplace_back(prefix + name, t);
  write_safetensors(path, out);
}

TEST(FluxCheckpoint, InfersDevAndSchnellConfigsFromShapes) {
  test::TempDir tmp;
  for (bool guidance : {true, false}) {
    const FluxConfig c = small_config(guidance);
    const std::string path = tmp / (guidance ? "dev.safetensors" : "schnell.safetensors");
    write_bfl(c, path, "model.diffusion_model.");
    FluxCheckpoint ck = open_flux_checkpoint(path);
    EXPECT_EQ(ck.naming, FluxNaming::BFL);
    EXPECT_EQ(ck.prefix, "model.diffusion_model.");
    EXPECT_EQ(ck.config_source, "inferred from tensor shapes");
    EXPECT_EQ(ck.config.guidance_embeds, guidance);
    EXPECT_EQ(ck.config.num_layers, 1);
    EXPECT_EQ(ck.config.num_single_layers, 1);
    EXPECT_EQ(ck.config.in_channels, 8);
    EXPECT_EQ(ck.config.joint_attention_dim, 12);
    EXPECT_EQ(ck.config.pooled_projection_dim, 6);
    EXPECT_EQ(ck.config.num_attention_heads, 1);
    EXPECT_EQ(ck.config.axes_dims_rope, (std::array<int64_t, 3>{16, 56, 56}));
    auto cpu = make_cpu_backend();
    WeightLoadReport report;
    load_flux_weights(ck, *cpu, &report);
    EXPECT_TRUE(report.unused_keys.empty());
  }
}

TEST(FluxCheckpoint, InferredSmallFixtureMatchesItsConfig) {
  FLUXSWAP_REQUIRE_FIXTURES();
  test::TempDir tmp;
  const std::string dir = test::fixtures_dir() + "/small";
  for (const std::string naming : {"bfl", "diffusers"}) {
    const std::string path = tmp / (naming + ".safetensors");
    rewrite(dir + "/transformer_" + naming + ".safetensors", path, [](std::string k) { return k; });
    FluxCheckpoint ck = open_flux_checkpoint(path);
    ASSERT_EQ(ck.config_source, "inferred from tensor shapes");
    EXPECT_EQ(ck.config.to_json(), FluxConfig::from_json_file(dir + "/config.json").to_json()) << naming;
  }
}

TEST(FluxCheckpoint, HuggingFaceCacheEntryFollowsRefsMain) {
  FLUXSWAP_REQUIRE_FIXTURES();
  test::TempDir tmp;
  const fsys::path entry = tmp.path() / "models--black-forest-labs--FLUX.1-dev";
  fsys::create_directories(entry / "refs");
  fsys::create_directories(entry / "snapshots" / "old");
  fsys::create_directories(entry / "snapshots" / "0123abc");
  std::ofstream(entry / "refs" / "main") << "0123abc\n";
  fsys::create_directory_symlink(fsys::absolute(test::fixtures_dir() + "/tiny/pipeline/transformer"),
                                 entry / "snapshots" / "0123abc" / "transformer");
  std::ofstream(entry / "snapshots" / "0123abc" / "model_index.json") << "{}";
  EXPECT_EQ(resolve_hf_cache_path(entry.string()), (entry / "snapshots" / "0123abc").string());
  FluxCheckpoint ck = open_flux_checkpoint(entry.string());
  EXPECT_EQ(ck.naming, FluxNaming::Diffusers);
  EXPECT_EQ(ck.config.num_layers, 2);
}

TEST(FluxCheckpoint, MissingTensorIsNamed) {
  FLUXSWAP_REQUIRE_FIXTURES();
  test::TempDir tmp;
  const std::string dir = test::fixtures_dir() + "/tiny";
  rewrite(dir + "/transformer_diffusers.safetensors", tmp / "t.safetensors",
          [](std::string k) { return k == "transformer_blocks.1.attn.to_k.weight" ? "" : k; });
  fsys::copy_file(dir + "/config.json", tmp / "config.json");
  auto cpu = make_cpu_backend();
  const std::string msg = error_of([&] { load_flux_weights(open_flux_checkpoint(tmp / "t.safetensors"), *cpu); });
  EXPECT_NE(msg.find("'transformer_blocks.1.attn.to_k.weight' is missing"), std::string::npos) << msg;
  EXPECT_NE(msg.find("t.safetensors"), std::string::npos) << msg;
}

TEST(FluxCheckpoint, WrongShapeIsNamedWithTheExpectation) {
  FLUXSWAP_REQUIRE_FIXTURES();
  test::TempDir tmp;
  const std::string dir = test::fixtures_dir() + "/tiny";
  rewrite(dir + "/transformer_bfl.safetensors", tmp / "t.safetensors", [](std::string k) { return k; },
          [](const std::string& k, Tensor t) { return k == "single_blocks.0.linear2.weight" ? t.narrow(1, 0, 100) : t; });
  fsys::copy_file(dir + "/config.json", tmp / "config.json");
  auto cpu = make_cpu_backend();
  const std::string msg = error_of([&] { load_flux_weights(open_flux_checkpoint(tmp / "t.safetensors"), *cpu); });
  EXPECT_NE(msg.find("'single_blocks.0.linear2.weight' has shape [32, 100]"), std::string::npos) << msg;
  EXPECT_NE(msg.find("of 160"), std::string::npos) << msg;
}

TEST(FluxCheckpoint, ForeignFilesAndPathsAreRejectedClearly) {
  FLUXSWAP_REQUIRE_FIXTURES();
  test::TempDir tmp;
  EXPECT_NE(error_of([&] { open_flux_checkpoint(tmp / "nope"); }).find("no such file"), std::string::npos);
  // A LoRA file is a safetensors file but not a transformer.
  const std::string lora = test::fixtures_dir() + "/tiny/lora_a_peft.safetensors";
  EXPECT_NE(error_of([&] { open_flux_checkpoint(lora); }).find("not a FLUX transformer checkpoint"),
            std::string::npos);
  // Head dim 16 cannot be mapped to RoPE axes without a config.
  rewrite(test::fixtures_dir() + "/tiny/transformer_bfl.safetensors", tmp / "x.safetensors",
          [](std::string k) { return k; });
  EXPECT_NE(error_of([&] { open_flux_checkpoint(tmp / "x.safetensors"); }).find("put a diffusers config.json"),
            std::string::npos);
  // A config that disagrees with itself.
  std::ofstream(tmp / "bad.json") << R"({"attention_head_dim": 16, "num_attention_heads": 2, "axes_dims_rope": [4, 6, 8]})";
  EXPECT_NE(error_of([&] { FluxConfig::from_json_file(tmp / "bad.json"); }).find("sum to 18"), std::string::npos);
  std::ofstream(tmp / "bad2.json") << R"({"num_layers": "two"})";
  EXPECT_NE(error_of([&] { FluxConfig::from_json_file(tmp / "bad2.json"); }).find("'num_layers'"), std::string::npos);
}

TEST(FluxCheckpoint, InputsFileErrorsNameTheTensor) {
  FLUXSWAP_REQUIRE_FIXTURES();
  test::TempDir tmp;
  rewrite(test::fixtures_dir() + "/tiny/transformer_goldens.safetensors", tmp / "in.safetensors",
          [](std::string k) { return k == "in.txt_ids" ? "" : k; });
  auto f = SafetensorsFile::open(tmp / "in.safetensors");
  EXPECT_NE(error_of([&] { read_flux_inputs(*f); }).find("'in.txt_ids' is missing"), std::string::npos);
}

}  // namespace
}  // namespace fluxswap
