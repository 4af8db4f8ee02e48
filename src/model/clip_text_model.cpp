#include "model/clip_text_model.h"

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "io/json_config.h"
#include "model/clip_lora_target.h"
#include "model/component_weights.h"

namespace fluxswap {

using nlohmann::json;
namespace fsys = std::filesystem;

namespace {

Activation parse_hidden_act(const std::string& name, const std::string& path) {
  if (name == "quick_gelu") return Activation::QuickGelu;  // CLIP-L, as FLUX ships it
  if (name == "gelu_new" || name == "gelu_pytorch_tanh") return Activation::GeluTanh;
  throw Error(path + ": hidden_act '" + name +
              "' is not supported (the backends compute quick_gelu, gelu_new and gelu_pytorch_tanh; exact erf "
              "'gelu' has no backend activation yet)");
}

constexpr const char* kLinearNames[] = {"fused q/k/v projection", "out_proj", "fc1", "fc2"};  // by ClipLinear

}  // namespace

ClipTextConfig ClipTextConfig::from_json_text(const std::string& text, const std::string& path) {
  const json j = parse_json_object(text, path);
  ClipTextConfig c;
  read_field(j, "vocab_size", c.vocab_size, path);
  read_field(j, "hidden_size", c.hidden_size, path);
  read_field(j, "intermediate_size", c.intermediate_size, path);
  read_field(j, "num_attention_heads", c.num_attention_heads, path);
  read_field(j, "num_hidden_layers", c.num_hidden_layers, path);
  read_field(j, "max_position_embeddings", c.max_position_embeddings, path);
  read_field(j, "layer_norm_eps", c.layer_norm_eps, path);
  std::string act = "quick_gelu";
  read_field(j, "hidden_act", act, path);
  c.hidden_act = parse_hidden_act(act, path);
  c.validate(path);
  return c;
}

ClipTextConfig ClipTextConfig::from_json_file(const std::string& path) {
  return from_json_text(read_text_file(path), path);
}

void ClipTextConfig::validate(const std::string& what) const {
  for (auto [v, name] : {std::pair{vocab_size, "vocab_size"}, {hidden_size, "hidden_size"},
                         {intermediate_size, "intermediate_size"}, {num_attention_heads, "num_attention_heads"},
                         {max_position_embeddings, "max_position_embeddings"}})
    if (v <= 0) throw Error(what + ": " + name + " must be positive, got " + std::to_string(v));
  if (num_hidden_layers < 0) throw Error(what + ": num_hidden_layers must not be negative");
  if (hidden_size % num_attention_heads)
    throw Error(what + ": hidden_size " + std::to_string(hidden_size) + " is not a multiple of num_attention_heads " +
                std::to_string(num_attention_heads));
  if (!(layer_norm_eps > 0)) throw Error(what + ": layer_norm_eps must be positive");
}

ClipTextWeights load_clip_text_weights(const SafetensorsCollection& file, const ClipTextConfig& c, Backend& backend) {
  // transformers before v5 saved CLIPTextModel under `text_model.`; v5 (and the fixtures) without it.
  const std::string p = file.contains("text_model.final_layer_norm.weight") ? "text_model." : "";
  const int64_t C = c.hidden_size, I = c.intermediate_size;
  auto one = [&](const std::string& key, const Shape& shape) { return load_stacked(file, {p + key}, shape, backend); };
  ClipTextWeights w;
  w.token_embedding = one("embeddings.token_embedding.weight", {c.vocab_size, C});
  w.position_embedding = one("embeddings.position_embedding.weight", {c.max_position_embeddings, C});
  for (int64_t i = 0; i < c.num_hidden_layers; ++i) {
    const std::string l = "encoder.layers." + std::to_string(i) + ".";
    const std::string a = p + l + "self_attn.";
    ClipTextLayerWeights lw;
    lw.ln1_weight = one(l + "layer_norm1.weight", {C});
    lw.ln1_bias = one(l + "layer_norm1.bias", {C});
    lw.qkv_weight = load_stacked(file, {a + "q_proj.weight", a + "k_proj.weight", a + "v_proj.weight"}, {C, C}, backend);
    lw.qkv_bias = load_stacked(file, {a + "q_proj.bias", a + "k_proj.bias", a + "v_proj.bias"}, {C}, backend);
    lw.out_weight = one(l + "self_attn.out_proj.weight", {C, C});
    lw.out_bias = one(l + "self_attn.out_proj.bias", {C});
    lw.ln2_weight = one(l + "layer_norm2.weight", {C});
    lw.ln2_bias = one(l + "layer_norm2.bias", {C});
    lw.fc1_weight = one(l + "mlp.fc1.weight", {I, C});
    lw.fc1_bias = one(l + "mlp.fc1.bias", {I});
    lw.fc2_weight = one(l + "mlp.fc2.weight", {C, I});
    lw.fc2_bias = one(l + "mlp.fc2.bias", {C});
    w.layers.push_back(std::move(lw));
  }
  w.final_ln_weight = one("final_layer_norm.weight", {C});
  w.final_ln_bias = one("final_layer_norm.bias", {C});
  return w;
}

std::vector<Tensor*> ClipTextWeights::device_tensors() {
  std::vector<Tensor*> out = {&token_embedding, &position_embedding, &final_ln_weight, &final_ln_bias};
  for (ClipTextLayerWeights& l : layers)
    out.insert(out.end(), {&l.ln1_weight, &l.ln1_bias, &l.qkv_weight, &l.qkv_bias, &l.out_weight, &l.out_bias,
                           &l.ln2_weight, &l.ln2_bias, &l.fc1_weight, &l.fc1_bias, &l.fc2_weight, &l.fc2_bias});
  return out;
}

ClipTextModel::ClipTextModel(const ClipTextConfig& config, ClipTextWeights weights, Backend& backend)
    : config_(config), weights_(std::move(weights)), backend_(backend) {
  config_.validate("CLIP text config");
}

ClipTextModel ClipTextModel::from_folder(const std::string& dir, Backend& backend) {
  const ClipTextConfig config = ClipTextConfig::from_json_file((fsys::path(dir) / "config.json").string());
  const SafetensorsCollection file = SafetensorsCollection::open(weights_in_folder(dir, kTransformersWeightFiles));
  return ClipTextModel(config, load_clip_text_weights(file, config, backend), backend);
}

void ClipTextModel::prepare(int64_t batch, int64_t seq_len) {
  if (batch == B_ && seq_len == S_) return;
  if (batch <= 0 || seq_len <= 0 || seq_len > config_.max_position_embeddings)
    throw Error("CLIP text model: batch " + std::to_string(batch) + " x " + std::to_string(seq_len) +
                " tokens, expected 1 to " + std::to_string(config_.max_position_embeddings) + " tokens");
  const int64_t C = config_.hidden_size, H = config_.num_attention_heads, hd = config_.head_dim();
  auto e = [&](Shape s) { return backend_.empty(backend_.compute_dtype(), s); };
  buf_ = Buffers{};
  buf_.hidden = e({batch, seq_len, C});
  buf_.normed = e({batch, seq_len, C});
  buf_.qkv = e({batch, seq_len, 3 * C});
  buf_.q = e({batch, H, seq_len, hd});
  buf_.k = e({batch, H, seq_len, hd});
  buf_.v = e({batch, H, seq_len, hd});
  buf_.attn = e({batch, seq_len, C});
  buf_.branch = e({batch, seq_len, C});
  buf_.mlp = e({batch, seq_len, config_.intermediate_size});
  B_ = batch;
  S_ = seq_len;
}

void ClipTextModel::release_buffers() {
  buf_ = Buffers{};
  B_ = S_ = 0;
}

void ClipTextModel::offload() {
  release_buffers();
  offload_.offload(backend_, weights_.device_tensors(), "CLIP text model");
}

void ClipTextModel::onload() { offload_.onload(backend_, weights_.device_tensors(), "CLIP text model"); }

uint64_t ClipTextModel::weight_bytes() { return offload_.weight_bytes(weights_.device_tensors()); }

void ClipTextModel::encode(const Tensor& ids, const std::vector<int64_t>& eos_index, const Tensor& pooled,
                           const Tensor& last_hidden) {
  if (!resident()) throw Error("CLIP text model: its weights are offloaded; onload() them before encode()");
  if (ids.ndim() != 2) throw Error("CLIP text model: ids must be [B, S], got " + shape_str(ids.shape()));
  const int64_t B = ids.size(0), S = ids.size(1), C = config_.hidden_size;
  if (int64_t(eos_index.size()) != B)
    throw Error("CLIP text model: " + std::to_string(eos_index.size()) + " eos positions for a batch of " +
                std::to_string(B));
  for (int64_t e : eos_index)
    if (e < 0 || e >= S) throw Error("CLIP text model: eos position " + std::to_string(e) + " outside 0.." +
                                     std::to_string(S - 1));
  if (pooled.shape() != Shape{B, C})
    throw Error("CLIP text model: pooled output is " + shape_str(pooled.shape()) + ", expected " +
                shape_str({B, C}));
  if (last_hidden.defined() && last_hidden.shape() != Shape{B, S, C})
    throw Error("CLIP text model: last_hidden is " + shape_str(last_hidden.shape()) + ", expected " +
                shape_str({B, S, C}));
  prepare(B, S);
  Backend& be = backend_;
  const ClipTextWeights& w = weights_;

  if (lora_rank_ > 0 && (!buf_.lora_scratch.defined() || buf_.lora_scratch.size(2) < lora_rank_))
    buf_.lora_scratch = be.empty(be.compute_dtype(), {B, S, lora_rank_});
  be.embedding(ids, w.token_embedding, w.position_embedding, buf_.hidden);
  for (int64_t i = 0; i < int64_t(w.layers.size()); ++i) layer(i);

  // LayerNorm works row by row, so normalising each prompt's end-of-text row straight into `pooled` is the
  // reference's final_layer_norm followed by the row lookup.
  for (int64_t b = 0; b < B; ++b) {
    const Tensor eos_row = buf_.hidden.select(0, b).narrow(0, eos_index[size_t(b)], 1);
    be.layer_norm(eos_row, w.final_ln_weight, w.final_ln_bias, config_.layer_norm_eps, pooled.narrow(0, b, 1));
  }
  if (last_hidden.defined())
    be.layer_norm(buf_.hidden, w.final_ln_weight, w.final_ln_bias, config_.layer_norm_eps, last_hidden);
}

void ClipTextModel::layer(int64_t i) {
  Backend& be = backend_;
  const ClipTextLayerWeights& w = weights_.layers[size_t(i)];
  const int64_t C = config_.hidden_size;
  const float eps = config_.layer_norm_eps;

  // Causal self-attention on the pre-normalised stream.
  be.layer_norm(buf_.hidden, w.ln1_weight, w.ln1_bias, eps, buf_.normed);
  linear(buf_.normed, i, ClipLinear::Qkv, w.qkv_weight, w.qkv_bias, buf_.qkv, Activation::None);
  be.split_heads(buf_.qkv.narrow(2, 0, C), buf_.q);
  be.split_heads(buf_.qkv.narrow(2, C, C), buf_.k);
  be.split_heads(buf_.qkv.narrow(2, 2 * C, C), buf_.v);
  const float scale = 1.0f / std::sqrt(float(config_.head_dim()));
  be.attention_ex(buf_.q, buf_.k, buf_.v, scale, Tensor(), /*causal=*/true, buf_.attn);
  linear(buf_.attn, i, ClipLinear::Out, w.out_weight, w.out_bias, buf_.branch, Activation::None);
  be.add(buf_.hidden, buf_.branch);

  // MLP: fc1 with the activation as its epilogue, then fc2.
  be.layer_norm(buf_.hidden, w.ln2_weight, w.ln2_bias, eps, buf_.normed);
  linear(buf_.normed, i, ClipLinear::Fc1, w.fc1_weight, w.fc1_bias, buf_.mlp, config_.hidden_act);
  linear(buf_.mlp, i, ClipLinear::Fc2, w.fc2_weight, w.fc2_bias, buf_.branch, Activation::None);
  be.add(buf_.hidden, buf_.branch);
}

void ClipTextModel::linear(const Tensor& x, int64_t layer, ClipLinear which, const Tensor& w, const Tensor& b,
                           const Tensor& y, Activation act) {
  const LoraFactors* f = lora_.empty() ? nullptr : &lora_[size_t(layer)][size_t(which)];
  if (!f || !f->down.defined()) {
    backend_.linear(x, w, b, y, act);
    return;
  }
  backend_.lora_linear(x, w, b, f->down, f->up, buf_.lora_scratch.narrow(2, 0, f->down.size(0)), y, act);
}

void ClipTextModel::set_lora(std::vector<ClipLoraLinear> linears) {
  std::vector<std::array<LoraFactors, 4>> table;
  if (!linears.empty()) table.resize(size_t(config_.num_hidden_layers));
  int64_t rank = 0;
  for (ClipLoraLinear& l : linears) {
    const std::string where = "CLIP text model: LoRA on layer " + std::to_string(l.layer) + "'s " +
                              kLinearNames[size_t(l.linear)];
    if (l.layer < 0 || l.layer >= config_.num_hidden_layers)
      throw Error(where + ": the model has " + std::to_string(config_.num_hidden_layers) + " layers");
    const ClipLinearRows rows = clip_linear_rows({l.layer, l.linear, 0}, config_);
    const int64_t out = rows.out_features, in = rows.in_features;
    if (l.down.ndim() != 2 || l.up.ndim() != 2 || l.down.size(1) != in || l.up.size(0) != out ||
        l.up.size(1) != l.down.size(0) || l.down.size(0) <= 0)
      throw Error(where + ": down " + shape_str(l.down.shape()) + ", up " + shape_str(l.up.shape()) +
                  ", expected [R, " + std::to_string(in) + "] and [" + std::to_string(out) + ", R]");
    LoraFactors& slot = table[size_t(l.layer)][size_t(l.linear)];
    if (slot.down.defined()) throw Error(where + ": given twice, expected one stacked branch per linear");
    slot = {std::move(l.down), std::move(l.up)};
    rank = std::max(rank, slot.down.size(0));
  }
  lora_ = std::move(table);
  lora_count_ = linears.size();
  lora_rank_ = rank;
  buf_.lora_scratch = Tensor();  // made again at the right width by the next encode
}

}  // namespace fluxswap
