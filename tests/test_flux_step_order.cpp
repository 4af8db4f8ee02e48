// flux_step_rank: where a step first reads a weight, from any spelling of its name.
#include <gtest/gtest.h>

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

}  // namespace
}  // namespace fluxswap
