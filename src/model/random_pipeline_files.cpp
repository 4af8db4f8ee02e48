#include "model/random_pipeline_files.h"

#include <cmath>
#include <map>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "model/flux_weight_map.h"

namespace fluxswap {

namespace {

using json = nlohmann::json;

// Appends the tensors of one component in the order they are declared.
class Tensors {
 public:
  void normal(const std::string& name, Shape shape, float mean, float std) {
    list_.push_back({name, std::move(shape), DType::BF16, mean, std});
  }
  void linear(const std::string& name, int64_t out, int64_t in) {  // weight only (T5 has no biases)
    normal(name + ".weight", {out, in}, 0.0f, 1.0f / std::sqrt(float(in)));
  }
  void linear_bias(const std::string& name, int64_t out, int64_t in) {
    linear(name, out, in);
    bias(name + ".bias", out);
  }
  void bias(const std::string& name, int64_t n) { normal(name, {n}, 0.0f, 0.02f); }
  void norm(const std::string& name, int64_t n) { normal(name + ".weight", {n}, 1.0f, 0.1f); }
  void norm_bias(const std::string& name, int64_t n) {
    norm(name, n);
    bias(name + ".bias", n);
  }
  void conv(const std::string& name, int64_t out, int64_t in, int64_t k) {
    normal(name + ".weight", {out, in, k, k}, 0.0f, 1.0f / std::sqrt(float(in * k * k)));
    bias(name + ".bias", out);
  }
  std::vector<RandomTensor> take() { return std::move(list_); }

 private:
  std::vector<RandomTensor> list_;
};

std::string activation_name(Activation a) {
  switch (a) {
    case Activation::QuickGelu: return "quick_gelu";
    case Activation::GeluTanh: return "gelu_new";
    case Activation::Silu: return "silu";
    default: throw Error("random pipeline: no config name for this activation");
  }
}

// ResnetBlock2D, with the shortcut conv only where the channel count changes (as the loader expects).
void vae_resnet(Tensors& t, const std::string& m, int64_t in, int64_t out) {
  t.norm_bias(m + ".norm1", in);
  t.conv(m + ".conv1", out, in, 3);
  t.norm_bias(m + ".norm2", out);
  t.conv(m + ".conv2", out, out, 3);
  if (in != out) t.conv(m + ".conv_shortcut", out, in, 1);
}

}  // namespace

std::vector<RandomTensor> clip_text_random_tensors(const ClipTextConfig& c) {
  c.validate("CLIP text config");
  Tensors t;
  const int64_t C = c.hidden_size, I = c.intermediate_size;
  t.normal("text_model.embeddings.token_embedding.weight", {c.vocab_size, C}, 0.0f, 1.0f);
  t.normal("text_model.embeddings.position_embedding.weight", {c.max_position_embeddings, C}, 0.0f, 1.0f);
  for (int64_t i = 0; i < c.num_hidden_layers; ++i) {
    const std::string l = "text_model.encoder.layers." + std::to_string(i) + ".";
    t.norm_bias(l + "layer_norm1", C);
    for (const char* p : {"q_proj", "k_proj", "v_proj", "out_proj"}) t.linear_bias(l + "self_attn." + p, C, C);
    t.norm_bias(l + "layer_norm2", C);
    t.linear_bias(l + "mlp.fc1", I, C);
    t.linear_bias(l + "mlp.fc2", C, I);
  }
  t.norm_bias("text_model.final_layer_norm", C);
  return t.take();
}

std::string clip_text_config_json(const ClipTextConfig& c) {
  return json{{"architectures", {"CLIPTextModel"}},
              {"model_type", "clip_text_model"},
              {"vocab_size", c.vocab_size},
              {"hidden_size", c.hidden_size},
              {"intermediate_size", c.intermediate_size},
              {"num_attention_heads", c.num_attention_heads},
              {"num_hidden_layers", c.num_hidden_layers},
              {"max_position_embeddings", c.max_position_embeddings},
              {"layer_norm_eps", c.layer_norm_eps},
              {"hidden_act", activation_name(c.hidden_act)},
              {"projection_dim", 768},
              {"bos_token_id", 49406},
              {"eos_token_id", 49407},
              {"pad_token_id", 1},
              {"torch_dtype", "bfloat16"}}
      .dump(2);
}

std::vector<RandomTensor> t5_encoder_random_tensors(const T5EncoderConfig& c) {
  c.validate("T5 encoder config");
  Tensors t;
  const int64_t D = c.d_model, I = c.inner_dim(), F = c.d_ff;
  t.normal("shared.weight", {c.vocab_size, D}, 0.0f, 1.0f);
  t.normal("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
           {c.relative_attention_num_buckets, c.num_heads}, 0.0f, 1.0f);
  for (int64_t i = 0; i < c.num_layers; ++i) {
    const std::string b = "encoder.block." + std::to_string(i) + ".";
    t.norm(b + "layer.0.layer_norm", D);
    for (const char* p : {"q", "k", "v"}) t.linear(b + "layer.0.SelfAttention." + p, I, D);
    t.linear(b + "layer.0.SelfAttention.o", D, I);
    t.norm(b + "layer.1.layer_norm", D);
    t.linear(b + "layer.1.DenseReluDense.wi_0", F, D);
    t.linear(b + "layer.1.DenseReluDense.wi_1", F, D);
    t.linear(b + "layer.1.DenseReluDense.wo", D, F);
  }
  t.norm("encoder.final_layer_norm", D);
  return t.take();
}

std::string t5_encoder_config_json(const T5EncoderConfig& c) {
  const std::string act = activation_name(c.dense_act);
  return json{{"architectures", {"T5EncoderModel"}},
              {"model_type", "t5"},
              {"vocab_size", c.vocab_size},
              {"d_model", c.d_model},
              {"d_kv", c.d_kv},
              {"num_heads", c.num_heads},
              {"d_ff", c.d_ff},
              {"num_layers", c.num_layers},
              {"relative_attention_num_buckets", c.relative_attention_num_buckets},
              {"relative_attention_max_distance", c.relative_attention_max_distance},
              {"layer_norm_epsilon", c.layer_norm_epsilon},
              {"feed_forward_proj", act == "gelu_new" ? "gated-gelu" : "gated-" + act},
              {"dense_act_fn", act},
              {"is_gated_act", true},
              {"is_encoder_decoder", false},
              {"pad_token_id", 0},
              {"eos_token_id", 1},
              {"torch_dtype", "bfloat16"}}
      .dump(2);
}

std::vector<RandomTensor> vae_decoder_random_tensors(const VaeConfig& c) {
  c.validate("VAE config");
  Tensors t;
  const std::vector<int64_t> widths(c.block_out_channels.rbegin(), c.block_out_channels.rend());  // widest first
  const int64_t top = widths.front(), Cl = c.latent_channels;
  if (c.use_post_quant_conv) t.conv("post_quant_conv", Cl, Cl, 1);
  t.conv("decoder.conv_in", top, Cl, 3);
  vae_resnet(t, "decoder.mid_block.resnets.0", top, top);
  if (c.mid_block_add_attention) {
    const std::string a = "decoder.mid_block.attentions.0.";
    t.norm_bias(a + "group_norm", top);
    for (const char* p : {"to_q", "to_k", "to_v", "to_out.0"}) t.linear_bias(a + p, top, top);
  }
  vae_resnet(t, "decoder.mid_block.resnets.1", top, top);
  int64_t in = top;
  for (size_t i = 0; i < widths.size(); ++i) {
    const std::string b = "decoder.up_blocks." + std::to_string(i);
    for (int64_t j = 0; j <= c.layers_per_block; ++j) {
      vae_resnet(t, b + ".resnets." + std::to_string(j), in, widths[i]);
      in = widths[i];
    }
    if (i + 1 < widths.size()) t.conv(b + ".upsamplers.0.conv", in, in, 3);
  }
  t.norm_bias("decoder.conv_norm_out", in);
  t.conv("decoder.conv_out", c.out_channels, in, 3);
  return t.take();
}

std::string vae_config_json(const VaeConfig& c) {
  const size_t n = c.block_out_channels.size();
  return json{{"_class_name", "AutoencoderKL"},
              {"act_fn", "silu"},
              {"block_out_channels", c.block_out_channels},
              {"down_block_types", std::vector<std::string>(n, "DownEncoderBlock2D")},
              {"up_block_types", std::vector<std::string>(n, "UpDecoderBlock2D")},
              {"in_channels", c.out_channels},
              {"out_channels", c.out_channels},
              {"latent_channels", c.latent_channels},
              {"layers_per_block", c.layers_per_block},
              {"norm_num_groups", c.norm_num_groups},
              {"scaling_factor", c.scaling_factor},
              {"shift_factor", c.shift_factor},
              {"mid_block_add_attention", c.mid_block_add_attention},
              {"use_post_quant_conv", c.use_post_quant_conv},
              {"use_quant_conv", c.use_post_quant_conv},
              {"force_upcast", true},
              {"sample_size", 1024}}
      .dump(2);
}

std::vector<RandomTensor> flux_transformer_random_tensors(const FluxConfig& c, FluxNaming naming, bool fp8) {
  c.validate("transformer config");
  if (fp8 && naming != FluxNaming::BFL)
    throw Error("random transformer: FP8 checkpoints are written as single files in BFL naming");
  // Each file tensor from the parts of the internal tensors that read it (diffusers' norm_out.linear feeds two row
  // ranges of one internal tensor): its rows are the highest row any part reads.
  std::vector<RandomTensor> out;
  std::map<std::string, size_t> index;
  for (const WeightSpec& spec : flux_weight_specs(c, naming)) {
    const bool matrix = spec.shape.size() == 2, norm = spec.name.find("_norm.scale") != std::string::npos;
    for (const WeightPart& p : spec.parts) {
      auto [it, fresh] = index.emplace(p.key, out.size());
      if (fresh)
        out.push_back({p.key, matrix ? Shape{0, spec.shape[1]} : Shape{0}, DType::BF16, norm ? 1.0f : 0.0f,
                       norm ? 0.1f : matrix ? 1.0f / std::sqrt(float(spec.shape[1])) : 0.02f});
      int64_t& rows = out[it->second].shape[0];
      rows = std::max(rows, p.src_row + p.rows);
    }
  }
  if (!fp8) return out;
  std::vector<RandomTensor> scales;
  for (RandomTensor& t : out) {
    if (t.shape.size() != 2) continue;
    // A per-tensor scale that puts 7 standard deviations at e4m3's largest value (448): only values beyond that,
    // one in ~4e11, saturate, and none is lost below the subnormals.
    t.dtype = DType::F8_E4M3;
    t.fp8_scale = t.std * 7.0f / 448.0f;
    const std::string module = t.name.substr(0, t.name.size() - std::string(".weight").size());
    scales.push_back({module + ".scale_weight", {}, DType::F32, t.fp8_scale, 0.0f});
  }
  out.insert(out.end(), scales.begin(), scales.end());
  out.push_back({"scaled_fp8", {0}, DType::F8_E4M3, 0.0f, 0.0f});
  return out;
}

}  // namespace fluxswap
