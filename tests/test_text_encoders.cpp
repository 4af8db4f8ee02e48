// The text encoders: each CPU text op against values computed by hand (or by an independent double-precision
// loop), the T5 position buckets against the formula, and the CLIP / T5 encoders against the diffusers FLUX
// pipeline's prompt embeddings for the fixtures' prompt0. Tolerance: max|a-b|/max|b| <= 1e-4 (float32 vs float32).
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <vector>

#include "backend/backend.h"
#include "core/compare.h"
#include "core/error.h"
#include "io/safetensors.h"
#include "model/clip_text_model.h"
#include "model/t5_encoder.h"
#include "test_support.h"
#include "text/clip_tokenizer.h"
#include "text/t5_tokenizer.h"

namespace fluxswap {
namespace {

constexpr double kTolerance = 1e-4;

Tensor host(const Shape& shape, const std::vector<float>& values) {
  Tensor t = Tensor::empty(DType::F32, shape);
  EXPECT_EQ(size_t(t.numel()), values.size());
  std::memcpy(t.data(), values.data(), values.size() * sizeof(float));
  return t;
}

Tensor ids_tensor(const std::vector<std::vector<int32_t>>& rows) {
  Tensor t = Tensor::empty(DType::I32, {int64_t(rows.size()), int64_t(rows[0].size())});
  for (size_t b = 0; b < rows.size(); ++b)
    std::memcpy(t.ptr<int32_t>() + b * rows[0].size(), rows[b].data(), rows[b].size() * sizeof(int32_t));
  return t;
}

void expect_values(const Tensor& t, const std::vector<float>& expected, float tol = 1e-5f) {
  const Tensor f = t.to_f32();
  ASSERT_EQ(size_t(f.numel()), expected.size());
  for (size_t i = 0; i < expected.size(); ++i) EXPECT_NEAR(f.ptr<float>()[i], expected[i], tol) << "element " << i;
}

// ---- CPU ops ----

TEST(CpuTextOps, RmsNormByHand) {
  auto be = make_cpu_backend();
  // x sits in the first two columns of a wider buffer, as the encoders pass column views.
  Tensor wide = host({2, 3}, {3, 4, 99, 1, -1, 99});
  Tensor y = Tensor::empty(DType::F32, {2, 2});
  be->rms_norm(wide.narrow(1, 0, 2), host({2}, {1, 2}), 0.5f, y);
  // Row 0: mean(x^2) = 12.5, 1/sqrt(13) = 0.2773501. Row 1: mean(x^2) = 1, 1/sqrt(1.5) = 0.8164966.
  expect_values(y, {0.8320503f, 2.2188008f, 0.8164966f, -1.6329932f});
}

TEST(CpuTextOps, LayerNormByHand) {
  auto be = make_cpu_backend();
  Tensor y = Tensor::empty(DType::F32, {1, 1, 4});
  be->layer_norm(host({1, 1, 4}, {1, 2, 3, 4}), host({4}, {1, 1, 2, 2}), host({4}, {0, 1, 0, 1}), 0.0f, y);
  // mean 2.5, variance 1.25: (x - 2.5) / 1.1180340 = -1.3416408, -0.4472136, 0.4472136, 1.3416408.
  expect_values(y, {-1.3416408f, 0.5527864f, 0.8944272f, 3.6832816f});
}

TEST(CpuTextOps, EmbeddingLooksUpRowsAndAddsPositions) {
  auto be = make_cpu_backend();
  const Tensor table = host({3, 2}, {0, 1, 10, 11, 20, 21});
  const Tensor positions = host({3, 2}, {100, 200, 300, 400, 500, 600});
  Tensor out = Tensor::empty(DType::F32, {1, 2, 2});
  be->embedding(ids_tensor({{2, 0}}), table, positions, out);
  expect_values(out, {120, 221, 300, 401});
  be->embedding(ids_tensor({{2, 0}}), table, Tensor(), out);
  expect_values(out, {20, 21, 0, 1});
  EXPECT_THROW(be->embedding(ids_tensor({{3, 0}}), table, Tensor(), out), Error);
}

TEST(CpuTextOps, SplitHeads) {
  auto be = make_cpu_backend();
  Tensor out = Tensor::empty(DType::F32, {1, 2, 2, 2});
  be->split_heads(host({1, 2, 4}, {0, 1, 2, 3, 4, 5, 6, 7}), out);
  expect_values(out, {0, 1, 4, 5, 2, 3, 6, 7});  // [h][s][d]: head 0 holds columns 0-1 of each token
}

TEST(CpuTextOps, AttentionScaleAndBiasByHand) {
  auto be = make_cpu_backend();
  // One head, D = 1. Row 0: scores 2 * (1 * [0, ln 2]) + [0, ln 3] -> weights [1, 12] / 13 -> (1 + 60) / 13.
  // Row 1: q = 0, bias 0 -> uniform weights -> (1 + 5) / 2.
  const Tensor q = host({1, 1, 2, 1}, {1, 0}), k = host({1, 1, 2, 1}, {0, std::log(2.0f)});
  const Tensor v = host({1, 1, 2, 1}, {1, 5}), bias = host({1, 2, 2}, {0, std::log(3.0f), 0, 0});
  Tensor out = Tensor::empty(DType::F32, {1, 2, 1});
  be->attention_ex(q, k, v, 2.0f, bias, false, out);
  expect_values(out, {61.0f / 13.0f, 3.0f});
  // Causal: query 0 sees key 0 alone, whatever its scores; query 1 is unchanged.
  be->attention_ex(q, k, v, 2.0f, bias, true, out);
  expect_values(out, {1.0f, 3.0f});
}

// softmax(scale q k^T + bias [+ causal]) v in double, written independently of the op.
std::vector<float> naive_attention(const Tensor& q, const Tensor& k, const Tensor& v, double scale, const Tensor& bias,
                                   bool causal) {
  const int64_t B = q.size(0), H = q.size(1), S = q.size(2), D = q.size(3);
  std::vector<float> out(size_t(B * S * H * D));
  auto at = [&](const Tensor& t, int64_t b, int64_t h, int64_t s, int64_t d) {
    return double(t.ptr<float>()[((b * H + h) * S + s) * D + d]);
  };
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t i = 0; i < S; ++i) {
        std::vector<double> w(size_t(S), 0.0);
        double total = 0;
        for (int64_t j = 0; j < S; ++j) {
          if (causal && j > i) continue;
          double s = 0;
          for (int64_t d = 0; d < D; ++d) s += at(q, b, h, i, d) * at(k, b, h, j, d);
          s = s * scale + (bias.defined() ? double(bias.ptr<float>()[(h * S + i) * S + j]) : 0.0);
          total += (w[size_t(j)] = std::exp(s));
        }
        for (int64_t d = 0; d < D; ++d) {
          double acc = 0;
          for (int64_t j = 0; j < S; ++j) acc += w[size_t(j)] / total * at(v, b, h, j, d);
          out[size_t(((b * S + i) * H + h) * D + d)] = float(acc);
        }
      }
  return out;
}

TEST(CpuTextOps, AttentionMatchesNaiveLoopAndCausalRowZeroIsV0) {
  auto be = make_cpu_backend();
  const int64_t B = 2, H = 3, S = 5, D = 4;
  Tensor q = Tensor::empty(DType::F32, {B, H, S, D}), k = Tensor::empty(DType::F32, {B, H, S, D});
  Tensor v = Tensor::empty(DType::F32, {B, H, S, D}), bias = Tensor::empty(DType::F32, {H, S, S});
  be->fill_normal(q, 1, 0, 1);
  be->fill_normal(k, 2, 0, 1);
  be->fill_normal(v, 3, 0, 1);
  be->fill_normal(bias, 4, 0, 1);
  // The output goes into the middle columns of a wider buffer (a rows view with a larger row stride).
  Tensor wide = Tensor::zeros(DType::F32, {B, S, H * D + 3});
  const Tensor out = wide.narrow(2, 1, H * D);
  for (bool causal : {false, true}) {
    be->attention_ex(q, k, v, 0.7f, bias, causal, out);
    expect_values(out, naive_attention(q, k, v, 0.7, bias, causal));
  }
  // Under the causal mask the first token attends to itself only: its output is v[:, :, 0].
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t d = 0; d < D; ++d)
        EXPECT_EQ(out.ptr<float>()[b * out.stride(0) + h * D + d], v.ptr<float>()[((b * H + h) * S) * D + d]);
}

TEST(CpuTextOps, Activations) {
  auto be = make_cpu_backend();
  const Tensor x = host({1, 3}, {-1.0f, 0.5f, 2.0f});
  Tensor y = Tensor::empty(DType::F32, {1, 3});
  be->activation(x, Activation::QuickGelu, y);  // x * sigmoid(1.702 x)
  expect_values(y, {-0.15420423f, 0.35038844f, 1.93565862f});
  be->activation(x, Activation::GeluTanh, y);
  expect_values(y, {-0.15880801f, 0.34571401f, 1.95459769f});
  be->activation(x, Activation::Silu, y);
  expect_values(y, {-0.26894142f, 0.31122967f, 1.76159416f});
  be->activation(x, Activation::None, y);
  expect_values(y, {-1.0f, 0.5f, 2.0f});
}

TEST(CpuTextOps, MulInPlaceOnColumnViews) {
  auto be = make_cpu_backend();
  Tensor ff = host({1, 4}, {2, 3, 5, 7});  // gate | linear halves, as the T5 feed-forward lays them out
  be->mul(ff.narrow(1, 0, 2), ff.narrow(1, 2, 2));
  expect_values(ff, {10, 21, 5, 7});
}

// ---- Encoder helpers: the fixture pipelines' models and tokenizers, prompts from the goldens' metadata ----

std::string pipeline_dir(const std::string& model) { return test::fixtures_dir() + "/" + model + "/pipeline"; }

std::shared_ptr<SafetensorsFile> pipeline_goldens(const std::string& model) {
  return SafetensorsFile::open(test::fixtures_dir() + "/" + model + "/pipeline_goldens.safetensors");
}

std::string prompt(const SafetensorsFile& goldens, int i) { return goldens.metadata().at("prompt" + std::to_string(i)); }

size_t max_sequence_length(const SafetensorsFile& goldens) {
  return std::stoul(goldens.metadata().at("max_sequence_length"));
}

const char* const kPipelines[] = {"tiny", "tiny_schnell"};

struct ClipIds {
  Tensor ids;                // int32 [B, 77]
  std::vector<int64_t> eos;  // per sample
};

// The prompts tokenized as the FLUX pipeline does for CLIP (77 tokens).
ClipIds clip_ids(const std::string& model, const std::vector<std::string>& prompts) {
  const ClipTokenizer tok = ClipTokenizer::from_folder(pipeline_dir(model) + "/tokenizer");
  std::vector<std::vector<int32_t>> ids;
  std::vector<int64_t> eos;
  for (const auto& p : prompts) {
    const TokenEncoding enc = tok.encode(p, ClipTokenizer::kMaxLength);
    ids.push_back(enc.ids);
    eos.push_back(int64_t(enc.eos_index));
  }
  return {ids_tensor(ids), eos};
}

// Pooled CLIP outputs [B, C] for the prompts.
Tensor clip_pooled(const std::string& model, const std::vector<std::string>& prompts) {
  auto be = make_cpu_backend();
  ClipTextModel clip = ClipTextModel::from_folder(pipeline_dir(model) + "/text_encoder", *be);
  const ClipIds in = clip_ids(model, prompts);
  Tensor pooled = be->empty(DType::F32, {int64_t(prompts.size()), clip.config().hidden_size});
  clip.encode(in.ids, in.eos, pooled);
  return pooled;
}

// T5 outputs [B, S, D] for the prompts, tokenized to max_length as the pipeline does.
Tensor t5_encode(T5Encoder& t5, const std::string& model, const std::vector<std::string>& prompts,
                 size_t max_length) {
  const T5Tokenizer tok = T5Tokenizer::from_folder(pipeline_dir(model) + "/tokenizer_2");
  std::vector<std::vector<int32_t>> ids;
  for (const auto& p : prompts) ids.push_back(tok.encode(p, max_length).ids);
  Tensor out = t5.backend().empty(DType::F32, {int64_t(prompts.size()), int64_t(max_length), t5.config().d_model});
  t5.encode(ids_tensor(ids), out);
  return out;
}

Tensor t5_embeds(const std::string& model, const std::vector<std::string>& prompts, size_t max_length) {
  auto be = make_cpu_backend();
  T5Encoder t5 = T5Encoder::from_folder(pipeline_dir(model) + "/text_encoder_2", *be);
  return t5_encode(t5, model, prompts, max_length);
}

// ---- CLIP ----

TEST(ClipTextModel, PooledOutputMatchesPipelineGoldens) {
  FLUXSWAP_REQUIRE_FIXTURES();
  for (const std::string model : kPipelines) {
    auto goldens = pipeline_goldens(model);
    const Tensor pooled = clip_pooled(model, {prompt(*goldens, 0)});
    EXPECT_LE(max_rel_error(pooled, goldens->tensor("pooled_prompt_embeds")), kTolerance) << model;
  }
}

// In a batch each sample is encoded on its own: prompt0 first in a batch of two still matches its golden.
TEST(ClipTextModel, BatchOfTwoMatchesForTheFirstPrompt) {
  FLUXSWAP_REQUIRE_FIXTURES();
  auto goldens = pipeline_goldens("tiny");
  const Tensor pooled = clip_pooled("tiny", {prompt(*goldens, 0), prompt(*goldens, 1)});
  EXPECT_LE(max_rel_error(pooled.narrow(0, 0, 1), goldens->tensor("pooled_prompt_embeds")), kTolerance);
  EXPECT_GT(max_rel_error(pooled.narrow(0, 1, 1), goldens->tensor("pooled_prompt_embeds")), kTolerance);
}

TEST(ClipTextModel, PooledIsTheLastHiddenStateAtTheFirstEos) {
  FLUXSWAP_REQUIRE_FIXTURES();
  auto be = make_cpu_backend();
  ClipTextModel clip = ClipTextModel::from_folder(pipeline_dir("tiny") + "/text_encoder", *be);
  auto goldens = pipeline_goldens("tiny");
  const ClipIds in = clip_ids("tiny", {prompt(*goldens, 0)});
  const int64_t C = clip.config().hidden_size;
  Tensor pooled = be->empty(DType::F32, {1, C}), last = be->empty(DType::F32, {1, 77, C});
  clip.encode(in.ids, in.eos, pooled, last);
  EXPECT_EQ(max_rel_error(pooled, last.select(1, in.eos[0])), 0.0);
  EXPECT_THROW(clip.encode(in.ids, {77}, pooled), Error);  // the eos position must lie in the sequence
}

TEST(ClipTextModel, ReadsFixtureConfig) {
  FLUXSWAP_REQUIRE_FIXTURES();
  const auto c = ClipTextConfig::from_json_file(pipeline_dir("tiny") + "/text_encoder/config.json");
  EXPECT_EQ(c.hidden_size, 24);
  EXPECT_EQ(c.num_attention_heads, 4);
  EXPECT_EQ(c.intermediate_size, 37);
  EXPECT_EQ(c.num_hidden_layers, 2);
  EXPECT_EQ(c.hidden_act, Activation::QuickGelu);
}

TEST(ClipTextModel, RejectsAnActivationTheBackendsLack) {
  EXPECT_THROW(ClipTextConfig::from_json_text(R"({"hidden_act": "gelu"})", "config.json"), Error);
}

// transformers 4.x (FLUX.1's own text_encoder/) writes every key under `text_model.`.
TEST(ClipTextModel, ReadsTextModelPrefixedKeys) {
  FLUXSWAP_REQUIRE_FIXTURES();
  test::TempDir tmp;
  const std::string src = pipeline_dir("tiny") + "/text_encoder";
  std::filesystem::copy_file(src + "/config.json", tmp / "config.json");
  auto file = SafetensorsFile::open(src + "/model.safetensors");
  std::vector<std::pair<std::string, Tensor>> prefixed;
  for (const auto& key : file->keys()) prefixed.emplace_back("text_model." + key, file->tensor(key));
  write_safetensors(tmp / "model.safetensors", prefixed);
  auto be = make_cpu_backend();
  ClipTextModel clip = ClipTextModel::from_folder(tmp.path().string(), *be);
  auto goldens = pipeline_goldens("tiny");
  const ClipIds in = clip_ids("tiny", {prompt(*goldens, 0)});
  Tensor pooled = be->empty(DType::F32, {1, clip.config().hidden_size});
  clip.encode(in.ids, in.eos, pooled);
  EXPECT_LE(max_rel_error(pooled, goldens->tensor("pooled_prompt_embeds")), kTolerance);
}

TEST(ClipTextModel, MissingWeightIsNamed) {
  FLUXSWAP_REQUIRE_FIXTURES();
  test::TempDir tmp;
  const std::string src = pipeline_dir("tiny") + "/text_encoder";
  std::filesystem::copy_file(src + "/config.json", tmp / "config.json");
  auto file = SafetensorsFile::open(src + "/model.safetensors");
  const std::string dropped = "encoder.layers.1.self_attn.k_proj.bias";
  std::vector<std::pair<std::string, Tensor>> kept;
  for (const auto& key : file->keys())
    if (key != dropped) kept.emplace_back(key, file->tensor(key));
  write_safetensors(tmp / "model.safetensors", kept);
  auto be = make_cpu_backend();
  try {
    ClipTextModel::from_folder(tmp.path().string(), *be);
    FAIL() << "expected an error";
  } catch (const Error& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find(tmp / "model.safetensors"), std::string::npos) << msg;
    EXPECT_NE(msg.find(dropped), std::string::npos) << msg;
  }
}

// ---- T5 ----

TEST(T5Encoder, EmbedsMatchPipelineGoldens) {
  FLUXSWAP_REQUIRE_FIXTURES();
  for (const std::string model : kPipelines) {
    auto goldens = pipeline_goldens(model);
    const Tensor embeds = t5_embeds(model, {prompt(*goldens, 0)}, max_sequence_length(*goldens));
    EXPECT_LE(max_rel_error(embeds, goldens->tensor("prompt_embeds")), kTolerance) << model;
  }
}

TEST(T5Encoder, BatchOfTwoMatchesForTheFirstPrompt) {
  FLUXSWAP_REQUIRE_FIXTURES();
  auto goldens = pipeline_goldens("tiny");
  const Tensor embeds = t5_embeds("tiny", {prompt(*goldens, 0), prompt(*goldens, 1)}, max_sequence_length(*goldens));
  EXPECT_LE(max_rel_error(embeds.narrow(0, 0, 1), goldens->tensor("prompt_embeds")), kTolerance);
  EXPECT_GT(max_rel_error(embeds.narrow(0, 1, 1), goldens->tensor("prompt_embeds")), kTolerance);
}

// The position bias depends on the sequence length: a second length rebuilds it.
TEST(T5Encoder, ChangingTheSequenceLengthRebuildsThePositionBias) {
  FLUXSWAP_REQUIRE_FIXTURES();
  auto be = make_cpu_backend();
  T5Encoder t5 = T5Encoder::from_folder(pipeline_dir("tiny") + "/text_encoder_2", *be);
  auto goldens = pipeline_goldens("tiny");
  t5_encode(t5, "tiny", {prompt(*goldens, 0)}, 24);
  const Tensor embeds = t5_encode(t5, "tiny", {prompt(*goldens, 0)}, max_sequence_length(*goldens));
  EXPECT_LE(max_rel_error(embeds, goldens->tensor("prompt_embeds")), kTolerance);
}

TEST(T5Encoder, RelativePositionBucketsFollowTheFormula) {
  // 32 buckets, max distance 128: 16 per direction, 8 exact, then 8 + floor(log(n / 8) / log(16) * 8), capped at
  // 15; keys after the query (relative position > 0) add 16.
  const std::pair<int64_t, int64_t> cases[] = {
      {0, 0},   {-1, 1},   {1, 17},   {-7, 7},   {7, 23},   {-8, 8},    {8, 24},    {-11, 8},
      {-12, 9}, {-15, 9},  {-16, 10}, {16, 26},  {-22, 10}, {-23, 11},  {-32, 12},  {32, 28},
      {-64, 14}, {64, 30}, {-127, 15}, {-128, 15}, {-1000, 15}, {1000, 31}};
  for (const auto& [rel, bucket] : cases)
    EXPECT_EQ(t5_relative_position_bucket(rel, 32, 128), bucket) << "relative position " << rel;
}

TEST(T5Encoder, PositionBiasLooksUpTheBucketOfKeyMinusQuery) {
  const int64_t buckets = 32, H = 2, S = 20;
  Tensor table = Tensor::empty(DType::F32, {buckets, H});
  for (int64_t b = 0; b < buckets; ++b)
    for (int64_t h = 0; h < H; ++h) table.ptr<float>()[b * H + h] = float(100 * h + b);
  const Tensor bias = t5_position_bias(table, S, 128);
  ASSERT_EQ(bias.shape(), (Shape{H, S, S}));
  for (int64_t h = 0; h < H; ++h)
    for (int64_t i = 0; i < S; ++i)
      for (int64_t j = 0; j < S; ++j)
        ASSERT_EQ(bias.ptr<float>()[(h * S + i) * S + j], float(100 * h + t5_relative_position_bucket(j - i, 32, 128)))
            << h << " " << i << " " << j;
}

TEST(T5Encoder, ReadsFixtureConfig) {
  FLUXSWAP_REQUIRE_FIXTURES();
  const auto c = T5EncoderConfig::from_json_file(pipeline_dir("tiny") + "/text_encoder_2/config.json");
  EXPECT_EQ(c.d_model, 40);
  EXPECT_EQ(c.inner_dim(), 32);
  EXPECT_EQ(c.d_ff, 48);
  EXPECT_EQ(c.relative_attention_num_buckets, 32);
  EXPECT_EQ(c.relative_attention_max_distance, 128);
  EXPECT_EQ(c.dense_act, Activation::GeluTanh);
  EXPECT_THROW(T5EncoderConfig::from_json_text(R"({"feed_forward_proj": "relu"})", "config.json"), Error);
}

TEST(T5Encoder, WrongWeightShapeIsNamed) {
  FLUXSWAP_REQUIRE_FIXTURES();
  test::TempDir tmp;
  const std::string src = pipeline_dir("tiny") + "/text_encoder_2";
  std::filesystem::copy_file(src + "/config.json", tmp / "config.json");
  auto file = SafetensorsFile::open(src + "/model.safetensors");
  const std::string cut = "encoder.block.1.layer.1.DenseReluDense.wi_1.weight";
  std::vector<std::pair<std::string, Tensor>> tensors;
  for (const auto& key : file->keys())
    tensors.emplace_back(key, key == cut ? file->tensor(key).narrow(0, 0, 47) : file->tensor(key));
  write_safetensors(tmp / "model.safetensors", tensors);
  auto be = make_cpu_backend();
  try {
    T5Encoder::from_folder(tmp.path().string(), *be);
    FAIL() << "expected an error";
  } catch (const Error& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find(tmp / "model.safetensors"), std::string::npos) << msg;
    EXPECT_NE(msg.find(cut), std::string::npos) << msg;
    EXPECT_NE(msg.find("[48, 40]"), std::string::npos) << msg;
  }
}

}  // namespace
}  // namespace fluxswap
