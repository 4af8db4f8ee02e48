#include "model/flux_weight_map.h"

#include <map>

namespace fluxswap {

namespace {

struct LinearShape {
  std::string module;
  int64_t out, in;
};

// The internal linear modules in forward order, with their shapes.
std::vector<LinearShape> internal_linears(const FluxConfig& c) {
  const int64_t D = c.inner_dim(), M = c.mlp_dim();
  std::vector<LinearShape> l = {
      {"img_in", D, c.in_channels},
      {"txt_in", D, c.joint_attention_dim},
      {"time_in.in_layer", D, 256},
      {"time_in.out_layer", D, D},
      {"vector_in.in_layer", D, c.pooled_projection_dim},
      {"vector_in.out_layer", D, D},
  };
  if (c.guidance_embeds) {
    l.push_back({"guidance_in.in_layer", D, 256});
    l.push_back({"guidance_in.out_layer", D, D});
  }
  for (int64_t i = 0; i < c.num_layers; ++i) {
    const std::string p = "double_blocks." + std::to_string(i) + ".";
    for (const char* s : {"img", "txt"}) {
      const std::string q = p + s;
      l.push_back({q + "_mod.lin", 6 * D, D});
      l.push_back({q + "_attn.qkv", 3 * D, D});
      l.push_back({q + "_attn.proj", D, D});
      l.push_back({q + "_mlp.0", M, D});
      l.push_back({q + "_mlp.2", D, M});
    }
  }
  for (int64_t i = 0; i < c.num_single_layers; ++i) {
    const std::string p = "single_blocks." + std::to_string(i) + ".";
    l.push_back({p + "modulation.lin", 3 * D, D});
    l.push_back({p + "linear1", 3 * D + M, D});
    l.push_back({p + "linear2", D, D + M});
  }
  l.push_back({"final_layer.adaLN_modulation.1", 2 * D, D});
  l.push_back({"final_layer.linear", c.out_channels(), D});
  return l;
}

// Internal RMSNorm scales and their diffusers names.
std::vector<std::pair<std::string, std::string>> norm_scales(const FluxConfig& c) {
  std::vector<std::pair<std::string, std::string>> n;
  for (int64_t i = 0; i < c.num_layers; ++i) {
    const std::string p = "double_blocks." + std::to_string(i) + ".";
    const std::string d = "transformer_blocks." + std::to_string(i) + ".attn.";
    n.push_back({p + "img_attn.norm.query_norm.scale", d + "norm_q.weight"});
    n.push_back({p + "img_attn.norm.key_norm.scale", d + "norm_k.weight"});
    n.push_back({p + "txt_attn.norm.query_norm.scale", d + "norm_added_q.weight"});
    n.push_back({p + "txt_attn.norm.key_norm.scale", d + "norm_added_k.weight"});
  }
  for (int64_t i = 0; i < c.num_single_layers; ++i) {
    const std::string p = "single_blocks." + std::to_string(i) + ".";
    const std::string d = "single_transformer_blocks." + std::to_string(i) + ".attn.";
    n.push_back({p + "norm.query_norm.scale", d + "norm_q.weight"});
    n.push_back({p + "norm.key_norm.scale", d + "norm_k.weight"});
  }
  return n;
}

}  // namespace

std::vector<ModuleAlias> flux_diffusers_aliases(const FluxConfig& c) {
  const int64_t D = c.inner_dim(), M = c.mlp_dim();
  std::vector<ModuleAlias> a = {
      {"x_embedder", "img_in", 0, D, 0},
      {"context_embedder", "txt_in", 0, D, 0},
      {"time_text_embed.timestep_embedder.linear_1", "time_in.in_layer", 0, D, 0},
      {"time_text_embed.timestep_embedder.linear_2", "time_in.out_layer", 0, D, 0},
      {"time_text_embed.text_embedder.linear_1", "vector_in.in_layer", 0, D, 0},
      {"time_text_embed.text_embedder.linear_2", "vector_in.out_layer", 0, D, 0},
  };
  if (c.guidance_embeds) {
    a.push_back({"time_text_embed.guidance_embedder.linear_1", "guidance_in.in_layer", 0, D, 0});
    a.push_back({"time_text_embed.guidance_embedder.linear_2", "guidance_in.out_layer", 0, D, 0});
  }
  for (int64_t i = 0; i < c.num_layers; ++i) {
    const std::string p = "double_blocks." + std::to_string(i) + ".";
    const std::string d = "transformer_blocks." + std::to_string(i) + ".";
    a.push_back({d + "norm1.linear", p + "img_mod.lin", 0, 6 * D, 0});
    a.push_back({d + "norm1_context.linear", p + "txt_mod.lin", 0, 6 * D, 0});
    a.push_back({d + "attn.to_q", p + "img_attn.qkv", 0, D, 0});
    a.push_back({d + "attn.to_k", p + "img_attn.qkv", D, D, 0});
    a.push_back({d + "attn.to_v", p + "img_attn.qkv", 2 * D, D, 0});
    a.push_back({d + "attn.add_q_proj", p + "txt_attn.qkv", 0, D, 0});
    a.push_back({d + "attn.add_k_proj", p + "txt_attn.qkv", D, D, 0});
    a.push_back({d + "attn.add_v_proj", p + "txt_attn.qkv", 2 * D, D, 0});
    a.push_back({d + "attn.to_out.0", p + "img_attn.proj", 0, D, 0});
    a.push_back({d + "attn.to_add_out", p + "txt_attn.proj", 0, D, 0});
    a.push_back({d + "ff.net.0.proj", p + "img_mlp.0", 0, M, 0});
    a.push_back({d + "ff.net.2", p + "img_mlp.2", 0, D, 0});
    a.push_back({d + "ff_context.net.0.proj", p + "txt_mlp.0", 0, M, 0});
    a.push_back({d + "ff_context.net.2", p + "txt_mlp.2", 0, D, 0});
  }
  for (int64_t i = 0; i < c.num_single_layers; ++i) {
    const std::string p = "single_blocks." + std::to_string(i) + ".";
    const std::string d = "single_transformer_blocks." + std::to_string(i) + ".";
    a.push_back({d + "norm.linear", p + "modulation.lin", 0, 3 * D, 0});
    a.push_back({d + "attn.to_q", p + "linear1", 0, D, 0});
    a.push_back({d + "attn.to_k", p + "linear1", D, D, 0});
    a.push_back({d + "attn.to_v", p + "linear1", 2 * D, D, 0});
    a.push_back({d + "proj_mlp", p + "linear1", 3 * D, M, 0});
    a.push_back({d + "proj_out", p + "linear2", 0, D, 0});
  }
  // diffusers orders the final modulation (scale, shift); internally it is (shift, scale).
  a.push_back({"norm_out.linear", "final_layer.adaLN_modulation.1", 0, D, D});
  a.push_back({"norm_out.linear", "final_layer.adaLN_modulation.1", D, D, 0});
  a.push_back({"proj_out", "final_layer.linear", 0, c.out_channels(), 0});
  return a;
}

std::vector<WeightSpec> flux_weight_specs(const FluxConfig& c, FluxNaming naming) {
  std::multimap<std::string, ModuleAlias> by_module;
  if (naming == FluxNaming::Diffusers)
    for (auto& a : flux_diffusers_aliases(c)) by_module.emplace(a.module, a);

  std::vector<WeightSpec> specs;
  for (const auto& l : internal_linears(c)) {
    for (const char* suffix : {".weight", ".bias"}) {
      WeightSpec s{l.module + suffix, {l.out}, {}};
      if (suffix[1] == 'w') s.shape.push_back(l.in);
      if (naming == FluxNaming::BFL) {
        s.parts.push_back({s.name, 0, l.out, 0});
      } else {
        auto [lo, hi] = by_module.equal_range(l.module);
        for (auto it = lo; it != hi; ++it)
          s.parts.push_back({it->second.source + suffix, it->second.row, it->second.rows, it->second.src_row});
      }
      specs.push_back(std::move(s));
    }
  }
  for (const auto& [internal, diffusers] : norm_scales(c)) {
    const std::string& key = naming == FluxNaming::BFL ? internal : diffusers;
    specs.push_back({internal, {c.attention_head_dim}, {{key, 0, c.attention_head_dim, 0}}});
  }
  return specs;
}

bool flux_block_index(const std::string& name, const FluxConfig& c, size_t* index) {
  for (const auto& [prefix, base] : {std::pair<std::string, int64_t>{"double_blocks.", 0},
                                     std::pair<std::string, int64_t>{"single_blocks.", c.num_layers}}) {
    if (name.rfind(prefix, 0) != 0) continue;
    *index = size_t(base + std::stoll(name.substr(prefix.size())));
    return true;
  }
  return false;
}

}  // namespace fluxswap
