#include "model/random_component_weights.h"

#include <cmath>
#include <utility>
#include <vector>

namespace fluxswap {

namespace {

// Hands out tensors filled on the device, each from its own generator stream. The streams of a component start at
// a point derived from the seed and a per-component salt, so CLIP, T5 and the VAE built with one seed do not
// share values with each other (or with the transformer's streams).
class RandomTensors {
 public:
  RandomTensors(Backend& backend, uint64_t seed, uint64_t salt)
      : backend_(backend), stream_(seed * 1000003ull + salt * 0x9E3779B97F4A7C15ull) {}

  Tensor normal(const Shape& shape, float mean, float std, DType dtype) {
    Tensor t = backend_.empty(dtype, shape);
    backend_.fill_normal(t, ++stream_, mean, std);
    return t;
  }
  Tensor normal(const Shape& shape, float mean, float std) {
    return normal(shape, mean, std, backend_.compute_dtype());
  }

  // [out, in] (fused layouts pass the stacked out); fan-in is `in`.
  Tensor linear(int64_t out, int64_t in) { return normal({out, in}, 0.0f, 1.0f / std::sqrt(float(in))); }
  // [out, in, k, k]; fan-in is in * k * k.
  Tensor conv(int64_t out, int64_t in, int64_t k) {
    return normal({out, in, k, k}, 0.0f, 1.0f / std::sqrt(float(in * k * k)));
  }
  Tensor bias(int64_t n) { return normal({n}, 0.0f, 0.02f); }
  Tensor norm_scale(int64_t n) { return normal({n}, 1.0f, 0.1f); }
  Tensor embedding(int64_t rows, int64_t width) { return normal({rows, width}, 0.0f, 1.0f); }

 private:
  Backend& backend_;
  uint64_t stream_;
};

// Salts: one per component.
constexpr uint64_t kClipSalt = 1, kT5Salt = 2, kVaeSalt = 3;

// The VAE's layer kinds, in the WeightBias pairs the decoder reads.
WeightBias conv_layer(RandomTensors& r, int64_t out, int64_t in, int64_t k) {
  return {r.conv(out, in, k), r.bias(out)};
}
WeightBias linear_layer(RandomTensors& r, int64_t out, int64_t in) { return {r.linear(out, in), r.bias(out)}; }
WeightBias group_norm(RandomTensors& r, int64_t c) { return {r.norm_scale(c), r.bias(c)}; }

// ResnetBlock2D: the shortcut conv only where the channel count changes, as the loader expects.
VaeResnetWeights vae_resnet(RandomTensors& r, int64_t in, int64_t out) {
  VaeResnetWeights w;
  w.norm1 = group_norm(r, in);
  w.conv1 = conv_layer(r, out, in, 3);
  w.norm2 = group_norm(r, out);
  w.conv2 = conv_layer(r, out, out, 3);
  if (in != out) w.conv_shortcut = conv_layer(r, out, in, 1);
  return w;
}

}  // namespace

ClipTextWeights random_clip_text_weights(const ClipTextConfig& c, Backend& backend, uint64_t seed) {
  c.validate("CLIP text config");
  RandomTensors r(backend, seed, kClipSalt);
  const int64_t C = c.hidden_size, I = c.intermediate_size;
  ClipTextWeights w;
  w.token_embedding = r.embedding(c.vocab_size, C);
  w.position_embedding = r.embedding(c.max_position_embeddings, C);
  for (int64_t i = 0; i < c.num_hidden_layers; ++i) {
    ClipTextLayerWeights l;
    l.ln1_weight = r.norm_scale(C);
    l.ln1_bias = r.bias(C);
    l.qkv_weight = r.linear(3 * C, C);
    l.qkv_bias = r.bias(3 * C);
    l.out_weight = r.linear(C, C);
    l.out_bias = r.bias(C);
    l.ln2_weight = r.norm_scale(C);
    l.ln2_bias = r.bias(C);
    l.fc1_weight = r.linear(I, C);
    l.fc1_bias = r.bias(I);
    l.fc2_weight = r.linear(C, I);
    l.fc2_bias = r.bias(C);
    w.layers.push_back(std::move(l));
  }
  w.final_ln_weight = r.norm_scale(C);
  w.final_ln_bias = r.bias(C);
  return w;
}

T5EncoderWeights random_t5_encoder_weights(const T5EncoderConfig& c, Backend& backend, uint64_t seed) {
  c.validate("T5 encoder config");
  RandomTensors r(backend, seed, kT5Salt);
  const int64_t D = c.d_model, I = c.inner_dim(), F = c.d_ff;
  T5EncoderWeights w;
  w.embedding = r.embedding(c.vocab_size, D);
  w.relative_attention_bias =
      backend.to_host_f32(r.normal({c.relative_attention_num_buckets, c.num_heads}, 0.0f, 1.0f, DType::F32));
  for (int64_t i = 0; i < c.num_layers; ++i) {
    T5LayerWeights l;
    l.attn_norm = r.norm_scale(D);
    l.qkv = r.linear(3 * I, D);
    l.o = r.linear(D, I);
    l.ff_norm = r.norm_scale(D);
    l.wi = r.linear(2 * F, D);
    l.wo = r.linear(D, F);
    w.layers.push_back(std::move(l));
  }
  w.final_norm = r.norm_scale(D);
  return w;
}

VaeDecoderWeights random_vae_decoder_weights(const VaeConfig& c, Backend& backend, uint64_t seed) {
  c.validate("VAE config");
  RandomTensors r(backend, seed, kVaeSalt);
  const std::vector<int64_t> widths(c.block_out_channels.rbegin(), c.block_out_channels.rend());  // widest first
  const int64_t top = widths.front(), Cl = c.latent_channels;
  VaeDecoderWeights w;
  if (c.use_post_quant_conv) w.post_quant_conv = conv_layer(r, Cl, Cl, 1);
  w.conv_in = conv_layer(r, top, Cl, 3);
  w.mid_resnet_in = vae_resnet(r, top, top);
  if (c.mid_block_add_attention)
    w.mid_attention = {group_norm(r, top), linear_layer(r, top, top), linear_layer(r, top, top),
                       linear_layer(r, top, top), linear_layer(r, top, top)};
  w.mid_resnet_out = vae_resnet(r, top, top);
  int64_t in = top;
  for (size_t i = 0; i < widths.size(); ++i) {
    VaeUpBlockWeights block;
    for (int64_t j = 0; j <= c.layers_per_block; ++j) {
      block.resnets.push_back(vae_resnet(r, in, widths[i]));
      in = widths[i];
    }
    if (i + 1 < widths.size()) block.upsampler = conv_layer(r, in, in, 3);
    w.up_blocks.push_back(std::move(block));
  }
  w.conv_norm_out = group_norm(r, in);
  w.conv_out = conv_layer(r, c.out_channels, in, 3);
  return w;
}

}  // namespace fluxswap
