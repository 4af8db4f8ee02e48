// Random weights for the CLIP text model, the T5 encoder and the VAE decoder (random_component_weights.h), on the CPU
// backend with the fixtures' tiny configs: every field the loader fills is filled with the loader's shape and dtype,
// no tensor is constant, each model runs end to end to finite, varied outputs of the right shape, and the values
// depend on the seed alone (same seed: bit-identical outputs from two builds; another seed: different outputs).
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <random>
#include <vector>

#include "backend/backend.h"
#include "io/safetensors.h"
#include "model/clip_text_model.h"
#include "model/random_component_weights.h"
#include "model/t5_encoder.h"
#include "model/vae_decoder.h"
#include "test_support.h"

namespace fluxswap {
namespace {

std::string pipeline_dir(const std::string& component) {
  return test::fixtures_dir() + "/tiny/pipeline/" + component;
}

// The benchmark configs are FLUX.1's real component sizes.
TEST(RandomComponentWeights, Flux1ConfigsHaveTheRealSizes) {
  const ClipTextConfig clip = ClipTextConfig::flux1();
  EXPECT_EQ(clip.vocab_size, 49408);
  EXPECT_EQ(clip.hidden_size, 768);
  EXPECT_EQ(clip.intermediate_size, 3072);
  EXPECT_EQ(clip.num_attention_heads, 12);
  EXPECT_EQ(clip.num_hidden_layers, 12);
  EXPECT_EQ(clip.max_position_embeddings, 77);
  EXPECT_EQ(clip.hidden_act, Activation::QuickGelu);
  const T5EncoderConfig t5 = T5EncoderConfig::flux1();
  EXPECT_EQ(t5.vocab_size, 32128);
  EXPECT_EQ(t5.d_model, 4096);
  EXPECT_EQ(t5.d_kv, 64);
  EXPECT_EQ(t5.num_heads, 64);
  EXPECT_EQ(t5.d_ff, 10240);
  EXPECT_EQ(t5.num_layers, 24);
  EXPECT_EQ(t5.relative_attention_num_buckets, 32);
  EXPECT_EQ(t5.relative_attention_max_distance, 128);
  EXPECT_EQ(t5.layer_norm_epsilon, 1e-6f);
  EXPECT_EQ(t5.dense_act, Activation::GeluTanh);
  const VaeConfig vae = VaeConfig::flux1();
  EXPECT_EQ(vae.latent_channels, 16);
  EXPECT_EQ(vae.block_out_channels, (std::vector<int64_t>{128, 256, 512, 512}));
  EXPECT_EQ(vae.layers_per_block, 2);
  EXPECT_EQ(vae.norm_num_groups, 32);
  EXPECT_TRUE(vae.mid_block_add_attention);
  EXPECT_FALSE(vae.use_post_quant_conv);
  EXPECT_FLOAT_EQ(vae.scaling_factor, 0.3611f);
  EXPECT_FLOAT_EQ(vae.shift_factor, 0.1159f);
}

// ---- Every weight tensor of a component, in a fixed order, so random and loaded weights compare field by field.

std::vector<Tensor> tensors_of(const ClipTextWeights& w) {
  std::vector<Tensor> t = {w.token_embedding, w.position_embedding, w.final_ln_weight, w.final_ln_bias};
  for (const auto& l : w.layers)
    t.insert(t.end(), {l.ln1_weight, l.ln1_bias, l.qkv_weight, l.qkv_bias, l.out_weight, l.out_bias, l.ln2_weight,
                       l.ln2_bias, l.fc1_weight, l.fc1_bias, l.fc2_weight, l.fc2_bias});
  return t;
}

std::vector<Tensor> tensors_of(const T5EncoderWeights& w) {
  std::vector<Tensor> t = {w.embedding, w.relative_attention_bias, w.final_norm};
  for (const auto& l : w.layers) t.insert(t.end(), {l.attn_norm, l.qkv, l.o, l.ff_norm, l.wi, l.wo});
  return t;
}

void add(std::vector<Tensor>& t, const WeightBias& wb) { t.insert(t.end(), {wb.weight, wb.bias}); }
void add(std::vector<Tensor>& t, const VaeResnetWeights& r) {
  for (const WeightBias* wb : {&r.norm1, &r.conv1, &r.norm2, &r.conv2, &r.conv_shortcut}) add(t, *wb);
}

std::vector<Tensor> tensors_of(const VaeDecoderWeights& w) {
  std::vector<Tensor> t;
  for (const WeightBias* wb : {&w.post_quant_conv, &w.conv_in, &w.conv_norm_out, &w.conv_out}) add(t, *wb);
  add(t, w.mid_resnet_in);
  add(t, w.mid_resnet_out);
  const VaeAttentionWeights& a = w.mid_attention;
  for (const WeightBias* wb : {&a.group_norm, &a.to_q, &a.to_k, &a.to_v, &a.to_out}) add(t, *wb);
  for (const auto& block : w.up_blocks) {
    for (const auto& r : block.resnets) add(t, r);
    add(t, block.upsampler);
  }
  return t;
}

// Random and loaded weights hold the same tensors (defined or not) with the same shapes, dtypes and devices, and
// no random tensor is constant or non-finite.
template <typename Weights>
void expect_same_layout(const Weights& random, const Weights& loaded) {
  const std::vector<Tensor> r = tensors_of(random), l = tensors_of(loaded);
  ASSERT_EQ(r.size(), l.size()) << "different layer counts";
  for (size_t i = 0; i < r.size(); ++i) {
    ASSERT_EQ(r[i].defined(), l[i].defined()) << "tensor " << i;
    if (!r[i].defined()) continue;
    EXPECT_EQ(r[i].shape(), l[i].shape()) << "tensor " << i;
    EXPECT_EQ(r[i].dtype(), l[i].dtype()) << "tensor " << i;
    EXPECT_EQ(r[i].device(), l[i].device()) << "tensor " << i;
    const Tensor v = r[i].to_f32();
    const float* p = v.ptr<float>();
    bool finite = true, varied = false;
    for (int64_t j = 0; j < v.numel(); ++j) {
      finite = finite && std::isfinite(p[j]);
      varied = varied || p[j] != p[0];
    }
    EXPECT_TRUE(finite) << "tensor " << i;
    EXPECT_TRUE(varied || v.numel() == 1) << "tensor " << i << " is constant";
  }
}

// ---- Outputs

void expect_finite_and_varied(const Tensor& t) {
  const Tensor v = t.to_f32();
  const float* p = v.ptr<float>();
  bool varied = false;
  for (int64_t i = 0; i < v.numel(); ++i) {
    ASSERT_TRUE(std::isfinite(p[i])) << "element " << i;
    varied = varied || p[i] != p[0];
  }
  EXPECT_TRUE(varied) << "all " << v.numel() << " elements equal " << p[0];
}

bool bit_identical(const Tensor& a, const Tensor& b) {
  const Tensor x = a.to_f32(), y = b.to_f32();
  return x.shape() == y.shape() && std::memcmp(x.data(), y.data(), size_t(x.numel()) * sizeof(float)) == 0;
}

Tensor random_ids(int64_t batch, int64_t tokens, int64_t vocab) {
  std::mt19937 rng(5);
  std::uniform_int_distribution<int32_t> id(0, int32_t(vocab - 1));
  Tensor t = Tensor::empty(DType::I32, {batch, tokens});
  for (int64_t i = 0; i < t.numel(); ++i) t.ptr<int32_t>()[i] = id(rng);
  return t;
}

// ---- CLIP text model

struct ClipOutputs {
  Tensor pooled, last_hidden;
};

ClipOutputs run_clip(const ClipTextConfig& c, Backend& be, uint64_t seed) {
  ClipTextModel clip(c, random_clip_text_weights(c, be, seed), be);
  const Tensor ids = random_ids(2, 16, c.vocab_size);
  ClipOutputs out{Tensor::empty(DType::F32, {2, c.hidden_size}), Tensor::empty(DType::F32, {2, 16, c.hidden_size})};
  clip.encode(ids, {15, 7}, out.pooled, out.last_hidden);
  return out;
}

TEST(RandomComponentWeights, ClipHasTheLoadersLayout) {
  FLUXSWAP_REQUIRE_FIXTURES();
  auto be = make_cpu_backend();
  const ClipTextConfig c = ClipTextConfig::from_json_file(pipeline_dir("text_encoder") + "/config.json");
  const auto file = SafetensorsCollection::open(pipeline_dir("text_encoder") + "/model.safetensors");
  expect_same_layout(random_clip_text_weights(c, *be, 1), load_clip_text_weights(file, c, *be));
}

TEST(RandomComponentWeights, ClipRunsAndDependsOnTheSeedAlone) {
  FLUXSWAP_REQUIRE_FIXTURES();
  auto be = make_cpu_backend();
  const ClipTextConfig c = ClipTextConfig::from_json_file(pipeline_dir("text_encoder") + "/config.json");
  const ClipOutputs a = run_clip(c, *be, 7), again = run_clip(c, *be, 7), other = run_clip(c, *be, 8);
  expect_finite_and_varied(a.pooled);
  expect_finite_and_varied(a.last_hidden);
  EXPECT_TRUE(bit_identical(a.pooled, again.pooled));
  EXPECT_TRUE(bit_identical(a.last_hidden, again.last_hidden));
  EXPECT_FALSE(bit_identical(a.last_hidden, other.last_hidden));
}

// ---- T5 encoder

Tensor run_t5(const T5EncoderConfig& c, Backend& be, uint64_t seed) {
  T5Encoder t5(c, random_t5_encoder_weights(c, be, seed), be);
  Tensor out = Tensor::empty(DType::F32, {2, 12, c.d_model});
  t5.encode(random_ids(2, 12, c.vocab_size), out);
  return out;
}

TEST(RandomComponentWeights, T5HasTheLoadersLayout) {
  FLUXSWAP_REQUIRE_FIXTURES();
  auto be = make_cpu_backend();
  const T5EncoderConfig c = T5EncoderConfig::from_json_file(pipeline_dir("text_encoder_2") + "/config.json");
  const auto file = SafetensorsCollection::open(pipeline_dir("text_encoder_2") + "/model.safetensors");
  expect_same_layout(random_t5_encoder_weights(c, *be, 1), load_t5_encoder_weights(file, c, *be));
}

TEST(RandomComponentWeights, T5RunsAndDependsOnTheSeedAlone) {
  FLUXSWAP_REQUIRE_FIXTURES();
  auto be = make_cpu_backend();
  const T5EncoderConfig c = T5EncoderConfig::from_json_file(pipeline_dir("text_encoder_2") + "/config.json");
  const Tensor a = run_t5(c, *be, 7), again = run_t5(c, *be, 7), other = run_t5(c, *be, 8);
  EXPECT_EQ(a.shape(), (Shape{2, 12, c.d_model}));
  expect_finite_and_varied(a);
  EXPECT_TRUE(bit_identical(a, again));
  EXPECT_FALSE(bit_identical(a, other));
}

// ---- VAE decoder

Tensor run_vae(const VaeConfig& c, Backend& be, uint64_t seed) {
  VaeDecoder vae(c, random_vae_decoder_weights(c, be, seed), be);
  Tensor latents = Tensor::empty(DType::F32, {1, c.latent_channels, 8, 8});
  std::mt19937 rng(3);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  for (int64_t i = 0; i < latents.numel(); ++i) latents.ptr<float>()[i] = normal(rng);
  return vae.decode_host(latents);
}

TEST(RandomComponentWeights, VaeHasTheLoadersLayout) {
  FLUXSWAP_REQUIRE_FIXTURES();
  auto be = make_cpu_backend();
  const VaeConfig c = VaeConfig::from_json_file(pipeline_dir("vae") + "/config.json");
  const auto file = SafetensorsCollection::open(pipeline_dir("vae") + "/diffusion_pytorch_model.safetensors");
  expect_same_layout(random_vae_decoder_weights(c, *be, 1), load_vae_decoder_weights(file, c, *be));
}

TEST(RandomComponentWeights, VaeRunsAndDependsOnTheSeedAlone) {
  FLUXSWAP_REQUIRE_FIXTURES();
  auto be = make_cpu_backend();
  const VaeConfig c = VaeConfig::from_json_file(pipeline_dir("vae") + "/config.json");
  const Tensor a = run_vae(c, *be, 7), again = run_vae(c, *be, 7), other = run_vae(c, *be, 8);
  EXPECT_EQ(a.shape(), (Shape{1, c.out_channels, 8 * c.upscale(), 8 * c.upscale()}));
  expect_finite_and_varied(a);
  EXPECT_TRUE(bit_identical(a, again));
  EXPECT_FALSE(bit_identical(a, other));
}

}  // namespace
}  // namespace fluxswap
