// flux_step_rank: where a step first reads a weight, from any spelling of its name.
#include <gtest/gtest.h>

#include <algorithm>

#include <regex>

#include "model/flux_step_order.h"
#include "model/flux_weight_map.h"

namespace fluxswap {
namespace {

TEST(FluxStepOrder, RanksFollowTheStep) {
  const FluxConfig c;  // FLUX.1-dev: 19 double, 38 single blocks
  EXPECT_EQ(flux_step_ranks(c), 59);
  EXPECT_EQ(flux_step_rank("double_blocks.0.img_attn.qkv", c), 1);
  EXPECT_EQ(flux_step_rank("double_blocks.18.txt_mlp.2", c), 19);
  EXPECT_EQ(flux_step_rank("single_blocks.0.linear1", c), 20);
  EXPECT_EQ(flux_step_rank("single_blocks.37.linear2", c), 57);
  EXPECT_EQ(flux_step_rank("final_layer.linear", c), 58);
  // Modulations and embedders are computed before the first block.
  for (const char* up_front : {"double_blocks.7.img_mod.lin", "single_blocks.30.modulation.lin",
                               "final_layer.adaLN_modulation.1", "img_in", "txt_in", "time_in.in_layer",
                               "guidance_in.out_layer", "vector_in.in_layer"})
    EXPECT_EQ(flux_step_rank(up_front, c), 0) << up_front;
  // The spellings of LoRA files.
  EXPECT_EQ(flux_step_rank("transformer.transformer_blocks.3.attn.to_q.lora_A.weight", c), 4);
  EXPECT_EQ(flux_step_rank("transformer.single_transformer_blocks.3.proj_out.lora_B.weight", c), 23);
  EXPECT_EQ(flux_step_rank("transformer.single_transformer_blocks.3.norm.linear.lora_A.weight", c), 0);
  EXPECT_EQ(flux_step_rank("transformer.transformer_blocks.3.norm1_context.linear.lora_A.weight", c), 0);
  EXPECT_EQ(flux_step_rank("transformer.proj_out.lora_A.weight", c), 58);
  EXPECT_EQ(flux_step_rank("transformer.norm_out.linear.lora_A.weight", c), 0);
  EXPECT_EQ(flux_step_rank("lora_unet_double_blocks_12_img_attn_qkv.lora_down.weight", c), 13);
  EXPECT_EQ(flux_step_rank("lora_unet_single_blocks_5_linear1.alpha", c), 25);
  EXPECT_EQ(flux_step_rank("lora_unet_double_blocks_12_txt_mod_lin.lora_up.weight", c), 0);
  EXPECT_EQ(flux_step_rank("lora_unet_final_layer_linear.lora_down.weight", c), 58);
  EXPECT_EQ(flux_step_rank("diffusion_model.double_blocks.2.img_attn.proj.lora_down.weight", c), 3);
  EXPECT_EQ(flux_step_rank("double_blocks.4.processor.qkv_lora2.down.weight", c), 5);
  EXPECT_EQ(flux_step_rank("double_blocks.40.img_attn.qkv", c), 0) << "out of range: first, to be safe";
}

// Every internal module and its diffusers name agree.
TEST(FluxStepOrder, DiffusersNamesRankAsTheirModules) {
  const FluxConfig c;
  for (const ModuleAlias& a : flux_diffusers_aliases(c))
    EXPECT_EQ(flux_step_rank("transformer." + a.source + ".lora_A.weight", c), flux_step_rank(a.module, c))
        << a.source << " -> " << a.module;
}

// The rules as regular expressions (the first implementation; the library scans by hand, ~100x faster): the same
// rank for every spelling of every weight and LoRA key, and for near misses.
int64_t rank_by_regex(const std::string& name, const FluxConfig& config) {
  static const std::regex modulation(
      R"((^|[._])(img_mod|txt_mod|modulation|adaLN_modulation|norm1|norm1_context|norm|norm_out)[._](lin|linear))");
  static const std::regex single(R"((^|[._])single_(transformer_)?blocks[._](\d+)([._]|$))");
  static const std::regex dual(R"((^|[._])(double_blocks|transformer_blocks)[._](\d+)([._]|$))");
  static const std::regex final_projection(R"((^|[._])(proj_out|final_layer[._]linear)([._]|$))");
  std::smatch m;
  if (std::regex_search(name, modulation)) return 0;
  if (std::regex_search(name, m, single)) {
    const int64_t i = std::stoll(m[3].str());
    return i < config.num_single_layers ? 1 + config.num_layers + i : 0;
  }
  if (std::regex_search(name, m, dual)) {
    const int64_t i = std::stoll(m[3].str());
    return i < config.num_layers ? 1 + i : 0;
  }
  if (std::regex_search(name, final_projection)) return flux_step_ranks(config) - 1;
  return 0;
}

TEST(FluxStepOrder, EverySpellingRanksAsTheRulesSay) {
  const FluxConfig c;
  std::vector<std::string> names;
  for (FluxNaming naming : {FluxNaming::BFL, FluxNaming::Diffusers})
    for (const WeightSpec& w : flux_weight_specs(c, naming)) {
      names.push_back(w.name);
      names.push_back("transformer." + w.name);
      names.push_back("diffusion_model." + w.name);
      std::string kohya = "lora_unet_" + w.name;
      std::replace(kohya.begin(), kohya.end(), '.', '_');
      names.push_back(kohya + ".lora_down.weight");
    }
  for (const char* odd : {"", "x", "double_blocks", "double_blocks.", "double_blocks.x.qkv", "double_blocks.12a.qkv",
                          "double_blocks_3", "xdouble_blocks.3.qkv", "single_blocks.99.linear1",
                          "single_transformer_blocks.2_norm.linear", "blocks.3.norm1.lin", "norm1linear",
                          "final_layer.linearx", "final_layer.linear", "final_layer_linear_x", "proj_outx",
                          "a.proj_out", "img_mod.lin", "mod.lin", "double_blocks.3.processor.proj_lora1.up.weight",
                          "transformer_blocks.0123456789.attn"})
    names.push_back(odd);
  for (const std::string& n : names) EXPECT_EQ(flux_step_rank(n, c), rank_by_regex(n, c)) << n;
}

}  // namespace
}  // namespace fluxswap
