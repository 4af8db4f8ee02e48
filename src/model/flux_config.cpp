#include "model/flux_config.h"

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "io/json_config.h"

namespace fluxswap {

using nlohmann::json;

FluxConfig FluxConfig::flux1_dev() { return FluxConfig{}; }

FluxConfig FluxConfig::flux1_schnell() {
  FluxConfig c;
  c.guidance_embeds = false;
  return c;
}

FluxConfig FluxConfig::tiny() {
  FluxConfig c;
  c.num_layers = 2;
  c.num_single_layers = 2;
  c.num_attention_heads = 2;
  c.attention_head_dim = 16;
  c.axes_dims_rope = {4, 6, 6};
  c.in_channels = 16;
  c.joint_attention_dim = 40;
  c.pooled_projection_dim = 24;
  return c;
}

FluxConfig FluxConfig::from_json_text(const std::string& text, const std::string& path) {
  const json j = parse_json_object(text, path);
  FluxConfig c;
  read_field(j, "in_channels", c.in_channels, path);
  read_field(j, "num_layers", c.num_layers, path);
  read_field(j, "num_single_layers", c.num_single_layers, path);
  read_field(j, "attention_head_dim", c.attention_head_dim, path);
  read_field(j, "num_attention_heads", c.num_attention_heads, path);
  read_field(j, "joint_attention_dim", c.joint_attention_dim, path);
  read_field(j, "pooled_projection_dim", c.pooled_projection_dim, path);
  read_field(j, "guidance_embeds", c.guidance_embeds, path);
  read_field(j, "axes_dims_rope", c.axes_dims_rope, path);
  int64_t patch = 1;
  read_field(j, "patch_size", patch, path);
  if (patch != 1) throw Error(path + ": patch_size " + std::to_string(patch) + " is not supported, expected 1");
  c.validate(path);
  return c;
}

FluxConfig FluxConfig::from_json_file(const std::string& path) { return from_json_text(read_text_file(path), path); }

std::string FluxConfig::to_json() const {
  json j = {{"_class_name", "FluxTransformer2DModel"},
            {"patch_size", 1},
            {"in_channels", in_channels},
            {"num_layers", num_layers},
            {"num_single_layers", num_single_layers},
            {"attention_head_dim", attention_head_dim},
            {"num_attention_heads", num_attention_heads},
            {"joint_attention_dim", joint_attention_dim},
            {"pooled_projection_dim", pooled_projection_dim},
            {"guidance_embeds", guidance_embeds},
            {"axes_dims_rope", axes_dims_rope}};
  return j.dump(1);
}

void FluxConfig::validate(const std::string& what) const {
  auto positive = [&](int64_t v, const char* name) {
    if (v <= 0) throw Error(what + ": " + name + " must be positive, got " + std::to_string(v));
  };
  positive(in_channels, "in_channels");
  positive(attention_head_dim, "attention_head_dim");
  positive(num_attention_heads, "num_attention_heads");
  positive(joint_attention_dim, "joint_attention_dim");
  positive(pooled_projection_dim, "pooled_projection_dim");
  if (num_layers < 0 || num_single_layers < 0) throw Error(what + ": negative block count");
  int64_t sum = 0;
  for (int64_t a : axes_dims_rope) {
    if (a <= 0 || a % 2) throw Error(what + ": axes_dims_rope entries must be positive and even");
    sum += a;
  }
  if (sum != attention_head_dim)
    throw Error(what + ": axes_dims_rope sum to " + std::to_string(sum) + ", expected attention_head_dim " +
                std::to_string(attention_head_dim));
}

FluxConfig infer_flux_config(FluxNaming naming, const ShapeLookup& shape_of, const std::string& what) {
  const bool bfl = naming == FluxNaming::BFL;
  auto need = [&](const std::string& key, size_t ndim) {
    auto s = shape_of(key);
    if (!s) throw Error(what + ": cannot infer the model config: tensor '" + key + "' is missing");
    if (s->size() != ndim)
      throw Error(what + ": tensor '" + key + "' has shape " + shape_str(*s) + ", expected " +
                  std::to_string(ndim) + " dimensions");
    return *s;
  };
  auto count_blocks = [&](const std::string& prefix, const std::string& suffix) {
    int64_t n = 0;
    while (shape_of(prefix + std::to_string(n) + suffix)) ++n;
    return n;
  };
  FluxConfig c;
  Shape x_in = need(bfl ? "img_in.weight" : "x_embedder.weight", 2);
  Shape txt_in = need(bfl ? "txt_in.weight" : "context_embedder.weight", 2);
  Shape vec_in = need(bfl ? "vector_in.in_layer.weight" : "time_text_embed.text_embedder.linear_1.weight", 2);
  c.in_channels = x_in[1];
  c.joint_attention_dim = txt_in[1];
  c.pooled_projection_dim = vec_in[1];
  c.guidance_embeds =
      shape_of(bfl ? "guidance_in.in_layer.weight" : "time_text_embed.guidance_embedder.linear_1.weight")
          .has_value();
  c.num_layers = bfl ? count_blocks("double_blocks.", ".img_attn.qkv.weight")
                     : count_blocks("transformer_blocks.", ".attn.to_q.weight");
  c.num_single_layers = bfl ? count_blocks("single_blocks.", ".linear1.weight")
                            : count_blocks("single_transformer_blocks.", ".attn.to_q.weight");
  std::string norm_key;
  if (c.num_layers > 0)
    norm_key = bfl ? "double_blocks.0.img_attn.norm.query_norm.scale" : "transformer_blocks.0.attn.norm_q.weight";
  else
    norm_key = bfl ? "single_blocks.0.norm.query_norm.scale" : "single_transformer_blocks.0.attn.norm_q.weight";
  c.attention_head_dim = need(norm_key, 1)[0];
  const int64_t inner = x_in[0];
  if (c.attention_head_dim <= 0 || inner % c.attention_head_dim)
    throw Error(what + ": width " + std::to_string(inner) + " is not a multiple of head dim " +
                std::to_string(c.attention_head_dim));
  c.num_attention_heads = inner / c.attention_head_dim;
  if (c.attention_head_dim != 128)
    throw Error(what + ": head dim " + std::to_string(c.attention_head_dim) +
                " is not FLUX's 128, so the RoPE axes cannot be inferred: put a diffusers config.json beside the "
                "weights");
  c.validate(what);
  return c;
}

}  // namespace fluxswap
