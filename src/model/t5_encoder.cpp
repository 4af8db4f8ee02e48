#include "model/t5_encoder.h"

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <utility>

#include "core/error.h"
#include "io/json_config.h"
#include "model/component_weights.h"

namespace fluxswap {

using nlohmann::json;
namespace fsys = std::filesystem;

namespace {

Activation parse_dense_act(const std::string& name, const std::string& path) {
  if (name == "gelu_new" || name == "gelu_pytorch_tanh") return Activation::GeluTanh;
  if (name == "silu" || name == "swish") return Activation::Silu;
  throw Error(path + ": dense_act_fn '" + name +
              "' is not supported (the backends compute gelu_new, gelu_pytorch_tanh and silu; exact erf 'gelu' "
              "and relu have no backend activation yet)");
}

}  // namespace

T5EncoderConfig T5EncoderConfig::from_json_text(const std::string& text, const std::string& path) {
  const json j = parse_json_object(text, path);
  T5EncoderConfig c;
  read_field(j, "vocab_size", c.vocab_size, path);
  read_field(j, "d_model", c.d_model, path);
  read_field(j, "d_kv", c.d_kv, path);
  read_field(j, "num_heads", c.num_heads, path);
  read_field(j, "d_ff", c.d_ff, path);
  read_field(j, "num_layers", c.num_layers, path);
  read_field(j, "relative_attention_num_buckets", c.relative_attention_num_buckets, path);
  read_field(j, "relative_attention_max_distance", c.relative_attention_max_distance, path);
  read_field(j, "layer_norm_epsilon", c.layer_norm_epsilon, path);
  // transformers derives the activation and gating from feed_forward_proj ("gated-gelu" meaning gelu_new), and
  // lets the derived fields stored beside it override them.
  std::string proj = "gated-gelu";
  read_field(j, "feed_forward_proj", proj, path);
  const size_t dash = proj.find('-');
  bool gated = dash != std::string::npos && proj.substr(0, dash) == "gated";
  std::string act = proj == "gated-gelu" ? "gelu_new" : proj.substr(dash == std::string::npos ? 0 : dash + 1);
  read_field(j, "is_gated_act", gated, path);
  read_field(j, "dense_act_fn", act, path);
  if (!gated)
    throw Error(path + ": feed_forward_proj '" + proj +
                "' is not supported: only gated feed-forwards (T5 v1.1, as FLUX uses) are implemented");
  c.dense_act = parse_dense_act(act, path);
  c.validate(path);
  return c;
}

T5EncoderConfig T5EncoderConfig::from_json_file(const std::string& path) {
  return from_json_text(read_text_file(path), path);
}

void T5EncoderConfig::validate(const std::string& what) const {
  for (auto [v, name] : {std::pair{vocab_size, "vocab_size"}, {d_model, "d_model"}, {d_kv, "d_kv"},
                         {num_heads, "num_heads"}, {d_ff, "d_ff"},
                         {relative_attention_max_distance, "relative_attention_max_distance"}})
    if (v <= 0) throw Error(what + ": " + name + " must be positive, got " + std::to_string(v));
  if (num_layers < 1) throw Error(what + ": num_layers must be at least 1 (the first holds the position bias)");
  // Two directions, each with at least one exact bucket and one logarithmic one.
  if (relative_attention_num_buckets < 4 || relative_attention_num_buckets % 4)
    throw Error(what + ": relative_attention_num_buckets must be a positive multiple of 4, got " +
                std::to_string(relative_attention_num_buckets));
  if (!(layer_norm_epsilon > 0)) throw Error(what + ": layer_norm_epsilon must be positive");
}

int64_t t5_relative_position_bucket(int64_t relative_position, int64_t num_buckets, int64_t max_distance) {
  const int64_t half = num_buckets / 2, max_exact = half / 2;
  const int64_t base = relative_position > 0 ? half : 0;  // keys after the query use the upper half
  const int64_t n = relative_position < 0 ? -relative_position : relative_position;
  if (n < max_exact) return base + n;
  // In float32, as the reference computes it: the distances where the log lands exactly on a bucket boundary
  // (16, 32 and 64 for FLUX's T5) then fall into the same bucket.
  const float log_ratio = std::log(float(n) / float(max_exact)) /
                          float(std::log(double(max_distance) / double(max_exact)));
  const int64_t large = max_exact + int64_t(log_ratio * float(half - max_exact));
  return base + std::min(large, half - 1);
}

Tensor t5_position_bias(const Tensor& table, int64_t seq_len, int64_t max_distance) {
  if (table.ndim() != 2 || table.dtype() != DType::F32 || table.device() != Device::CPU || !table.is_contiguous())
    throw Error("t5 position bias: the table must be a contiguous float32 host [num_buckets, H] tensor, got " +
                shape_str(table.shape()));
  const int64_t num_buckets = table.size(0), H = table.size(1), S = seq_len;
  // One bucket per relative position j - i in -(S-1)..S-1, so the S*S fill is a lookup.
  std::vector<int64_t> bucket(size_t(2 * S - 1));
  for (int64_t r = -(S - 1); r < S; ++r)
    bucket[size_t(r + S - 1)] = t5_relative_position_bucket(r, num_buckets, max_distance);
  Tensor bias = Tensor::empty(DType::F32, {H, S, S});
  const float* t = table.ptr<float>();
  float* o = bias.ptr<float>();
  for (int64_t h = 0; h < H; ++h)
    for (int64_t i = 0; i < S; ++i)
      for (int64_t j = 0; j < S; ++j) o[(h * S + i) * S + j] = t[bucket[size_t(j - i + S - 1)] * H + h];
  return bias;
}

T5EncoderWeights load_t5_encoder_weights(const SafetensorsCollection& file, const T5EncoderConfig& c,
                                         Backend& backend, bool nf4) {
  const int64_t D = c.d_model, I = c.inner_dim(), F = c.d_ff;
  auto one = [&](const std::string& key, const Shape& shape) { return load_stacked(file, {key}, shape, backend); };
  // A linear's weight (and, in NF4, its absmax).
  auto matrix = [&](const std::vector<std::string>& keys, const Shape& part, Tensor& weight, Tensor& absmax) {
    if (!nf4) {
      weight = load_stacked(file, keys, part, backend);
      return;
    }
    Nf4Weight q = upload_nf4(stack_on_host(file, keys, part, DType::F32), backend);
    weight = std::move(q.packed);
    absmax = std::move(q.absmax);
  };
  T5EncoderWeights w;
  w.nf4 = nf4;
  // The embedding is tied: `shared.weight`, also written as `encoder.embed_tokens.weight` by some exports.
  const std::string embed = file.contains("shared.weight") || !file.contains("encoder.embed_tokens.weight")
                                ? "shared.weight"
                                : "encoder.embed_tokens.weight";
  w.embedding = one(embed, {c.vocab_size, D});
  w.relative_attention_bias =
      checked_tensor(file, "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
              {c.relative_attention_num_buckets, c.num_heads})
          .to_f32();
  for (int64_t i = 0; i < c.num_layers; ++i) {
    const std::string attn = "encoder.block." + std::to_string(i) + ".layer.0.";
    const std::string ff = "encoder.block." + std::to_string(i) + ".layer.1.";
    const std::string sa = attn + "SelfAttention.", dense = ff + "DenseReluDense.";
    T5LayerWeights lw;
    lw.attn_norm = one(attn + "layer_norm.weight", {D});
    matrix({sa + "q.weight", sa + "k.weight", sa + "v.weight"}, {I, D}, lw.qkv, lw.qkv_absmax);
    matrix({sa + "o.weight"}, {D, I}, lw.o, lw.o_absmax);
    lw.ff_norm = one(ff + "layer_norm.weight", {D});
    matrix({dense + "wi_0.weight", dense + "wi_1.weight"}, {F, D}, lw.wi, lw.wi_absmax);
    matrix({dense + "wo.weight"}, {D, F}, lw.wo, lw.wo_absmax);
    w.layers.push_back(std::move(lw));
  }
  w.final_norm = one("encoder.final_layer_norm.weight", {D});
  return w;
}

std::vector<Tensor*> T5EncoderWeights::device_tensors() {
  std::vector<Tensor*> out = {&embedding, &final_norm};
  for (T5LayerWeights& l : layers)
    out.insert(out.end(), {&l.attn_norm, &l.qkv, &l.o, &l.ff_norm, &l.wi, &l.wo, &l.qkv_absmax, &l.o_absmax,
                           &l.wi_absmax, &l.wo_absmax});
  return out;
}

T5Encoder::T5Encoder(const T5EncoderConfig& config, T5EncoderWeights weights, Backend& backend)
    : config_(config), weights_(std::move(weights)), backend_(backend) {
  config_.validate("T5 encoder config");
}

T5Encoder T5Encoder::from_folder(const std::string& dir, Backend& backend, bool nf4) {
  const T5EncoderConfig config = T5EncoderConfig::from_json_file((fsys::path(dir) / "config.json").string());
  const SafetensorsCollection file = SafetensorsCollection::open(weights_in_folder(dir, kTransformersWeightFiles));
  return T5Encoder(config, load_t5_encoder_weights(file, config, backend, nf4), backend);
}

void T5Encoder::prepare(int64_t batch, int64_t seq_len) {
  if (batch <= 0 || seq_len <= 0)
    throw Error("T5 encoder: batch " + std::to_string(batch) + " x " + std::to_string(seq_len) + " tokens");
  const int64_t H = config_.num_heads;
  if (seq_len != bias_len_) {
    position_bias_ = Tensor();  // free the old length's [H, S, S] before allocating the new one
    const Tensor host = t5_position_bias(weights_.relative_attention_bias, seq_len,
                                         config_.relative_attention_max_distance);
    position_bias_ = backend_.empty(DType::F32, {H, seq_len, seq_len});
    backend_.copy_from_host(host, position_bias_);
    bias_len_ = seq_len;
  }
  if (batch == B_ && seq_len == S_) return;
  const int64_t D = config_.d_model, I = config_.inner_dim();
  auto e = [&](Shape s) { return backend_.empty(backend_.compute_dtype(), s); };
  buf_ = Buffers{};
  buf_.hidden = e({batch, seq_len, D});
  buf_.normed = e({batch, seq_len, D});
  buf_.qkv = e({batch, seq_len, 3 * I});
  buf_.q = e({batch, H, seq_len, config_.d_kv});
  buf_.k = e({batch, H, seq_len, config_.d_kv});
  buf_.v = e({batch, H, seq_len, config_.d_kv});
  buf_.attn = e({batch, seq_len, I});
  buf_.branch = e({batch, seq_len, D});
  buf_.ff = e({batch, seq_len, 2 * config_.d_ff});
  if (weights_.nf4) {
    const int64_t F = config_.d_ff;
    buf_.nf4_scratch = e({std::max({3 * I * D, D * I, 2 * F * D, D * F})});
  }
  B_ = batch;
  S_ = seq_len;
}

void T5Encoder::quantize_nf4() {
  if (weights_.nf4) return;
  if (!resident()) throw Error("T5 encoder: its weights are offloaded; onload() them before quantize_nf4()");
  release_buffers();
  for (T5LayerWeights& l : weights_.layers)
    for (auto [weight, absmax] : {std::pair{&l.qkv, &l.qkv_absmax}, {&l.o, &l.o_absmax}, {&l.wi, &l.wi_absmax},
                                  {&l.wo, &l.wo_absmax}}) {
      Nf4Weight q = upload_nf4(backend_.to_host_f32(*weight), backend_);
      *weight = std::move(q.packed);
      *absmax = std::move(q.absmax);
    }
  weights_.nf4 = true;
  offload_ = WeightOffload();  // a host copy made before holds the old layout
}

void T5Encoder::release_buffers() {
  buf_ = Buffers{};
  position_bias_ = Tensor();
  B_ = S_ = bias_len_ = 0;
}

void T5Encoder::offload() {
  release_buffers();
  offload_.offload(backend_, weights_.device_tensors(), "T5 encoder");
}

void T5Encoder::onload() { offload_.onload(backend_, weights_.device_tensors(), "T5 encoder"); }

uint64_t T5Encoder::weight_bytes() { return offload_.weight_bytes(weights_.device_tensors()); }

void T5Encoder::encode(const Tensor& ids, const Tensor& out) {
  if (!resident()) throw Error("T5 encoder: its weights are offloaded; onload() them before encode()");
  if (ids.ndim() != 2) throw Error("T5 encoder: ids must be [B, S], got " + shape_str(ids.shape()));
  const int64_t B = ids.size(0), S = ids.size(1);
  if (out.shape() != Shape{B, S, config_.d_model})
    throw Error("T5 encoder: output is " + shape_str(out.shape()) + ", expected " +
                shape_str({B, S, config_.d_model}));
  prepare(B, S);
  backend_.embedding(ids, weights_.embedding, Tensor(), buf_.hidden);
  for (const T5LayerWeights& layer_weights : weights_.layers) layer(layer_weights);
  backend_.rms_norm(buf_.hidden, weights_.final_norm, config_.layer_norm_epsilon, out);
}

void T5Encoder::layer(const T5LayerWeights& w) {
  Backend& be = backend_;
  const int64_t I = config_.inner_dim(), F = config_.d_ff;
  const float eps = config_.layer_norm_epsilon;

  // Self-attention: T5 folds the 1/sqrt(d_kv) scale into its initialisation, so the scores are unscaled; the
  // relative position bias of the first layer is added in every layer.
  const int64_t D = config_.d_model;
  be.rms_norm(buf_.hidden, w.attn_norm, eps, buf_.normed);
  linear(buf_.normed, w.qkv, w.qkv_absmax, 3 * I, D, buf_.qkv);
  be.split_heads(buf_.qkv.narrow(2, 0, I), buf_.q);
  be.split_heads(buf_.qkv.narrow(2, I, I), buf_.k);
  be.split_heads(buf_.qkv.narrow(2, 2 * I, I), buf_.v);
  be.attention_ex(buf_.q, buf_.k, buf_.v, 1.0f, position_bias_, /*causal=*/false, buf_.attn);
  linear(buf_.attn, w.o, w.o_absmax, D, I, buf_.branch);
  be.add(buf_.hidden, buf_.branch);

  // Gated feed-forward: wo(act(wi_0 x) * wi_1 x), both input projections in one GEMM.
  be.rms_norm(buf_.hidden, w.ff_norm, eps, buf_.normed);
  linear(buf_.normed, w.wi, w.wi_absmax, 2 * F, D, buf_.ff);
  const Tensor gate = buf_.ff.narrow(2, 0, F), up = buf_.ff.narrow(2, F, F);
  be.activation(gate, config_.dense_act, gate);
  be.mul(gate, up);
  linear(gate, w.wo, w.wo_absmax, D, F, buf_.branch);
  be.add(buf_.hidden, buf_.branch);
}

void T5Encoder::linear(const Tensor& x, const Tensor& w, const Tensor& absmax, int64_t rows, int64_t cols,
                       const Tensor& y) {
  if (!weights_.nf4) {
    backend_.linear(x, w, Tensor(), y, Activation::None);
    return;
  }
  const Tensor dq = buf_.nf4_scratch.narrow(0, 0, rows * cols).view({rows, cols});
  backend_.dequantize_nf4(w, absmax, kNf4WeightBlocksize, dq);
  backend_.linear(x, dq, Tensor(), y, Activation::None);
}

}  // namespace fluxswap
