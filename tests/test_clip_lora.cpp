// LoRAs on the CLIP-L text encoder: the key namings (kohya lora_te1_, PEFT text_encoder., ComfyUI
// text_encoders.clip_l.) land on the right transformers module with the format's scale; T5 keys are reported, not
// applied; and the runtime branches give the same CLIP outputs as a CLIP whose transformers weights were merged by
// hand, W + weight * scale * up @ down in double (max|a-b|/max|b| <= 1e-5, float32 both ways). Clearing gives the
// base bit for bit, and a LoRA that does not fit changes nothing.
#include <gtest/gtest.h>

#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <limits>
#include <map>
#include <random>

#include "backend/backend.h"
#include "core/compare.h"
#include "io/safetensors.h"
#include "lora/clip_lora.h"
#include "lora/lora_adapter.h"
#include "lora/text_encoder_lora_keys.h"
#include "model/clip_text_model.h"
#include "test_support.h"
#include "text/clip_tokenizer.h"

namespace fluxswap {
namespace {

using Tensors = std::vector<std::pair<std::string, Tensor>>;
using test::error_of;

std::string pipeline_dir() { return test::fixtures_dir() + "/tiny/pipeline"; }

FluxConfig tiny_config() { return FluxConfig::from_json_file(test::fixtures_dir() + "/tiny/config.json"); }

using test::scalar;

// ---- Key namings (no fixtures needed) ----

TEST(TextEncoderLoraKeys, ClipStemsInEveryNamingGiveTheTransformersModule) {
  const std::map<std::string, std::string> cases = {
      {"lora_te1_text_model_encoder_layers_3_self_attn_q_proj", "text_model.encoder.layers.3.self_attn.q_proj"},
      {"lora_te1_text_model_encoder_layers_11_self_attn_out_proj", "text_model.encoder.layers.11.self_attn.out_proj"},
      {"lora_te_text_model_encoder_layers_0_mlp_fc2", "text_model.encoder.layers.0.mlp.fc2"},
      {"text_encoder.text_model.encoder.layers.2.self_attn.v_proj", "text_model.encoder.layers.2.self_attn.v_proj"},
      {"text_encoder.encoder.layers.2.mlp.fc1", "text_model.encoder.layers.2.mlp.fc1"},
      {"text_encoders.clip_l.transformer.text_model.encoder.layers.5.self_attn.k_proj",
       "text_model.encoder.layers.5.self_attn.k_proj"},
  };
  for (const auto& [stem, module] : cases) {
    SCOPED_TRACE(stem);
    EXPECT_EQ(text_encoder_of(stem + ".lora_down.weight"), TextEncoderOf::Clip);
    const auto c = clip_lora_stem(stem);
    ASSERT_TRUE(c.has_value());
    EXPECT_EQ(c->module, module);
    EXPECT_EQ(c->peft, stem.starts_with("text_encoder."));
  }
}

TEST(TextEncoderLoraKeys, OtherEncodersAndNonLinearsAreTold) {
  for (const std::string key :
       {"lora_te3_encoder_block_0_layer_0_SelfAttention_q.lora_down.weight",
        "lora_te2_text_model_encoder_layers_0_mlp_fc1.alpha",
        "text_encoder_2.encoder.block.0.layer.1.DenseReluDense.wi_0.lora_A.weight",
        "text_encoders.t5xxl.transformer.encoder.block.0.layer.0.SelfAttention.q.lora_up.weight"})
    EXPECT_EQ(text_encoder_of(key), TextEncoderOf::Other) << key;
  EXPECT_EQ(text_encoder_of("lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"), TextEncoderOf::None);
  EXPECT_EQ(text_encoder_of("transformer.transformer_blocks.0.attn.to_q.lora_A.weight"), TextEncoderOf::None);
  for (const std::string stem :
       {"lora_te1_text_projection", "lora_te1_text_model_embeddings_token_embedding",
        "lora_te1_text_model_encoder_layers_01_mlp_fc1", "lora_te1_text_model_encoder_layers_0_self_attn_qkv",
        "text_encoder.text_model.encoder.layers.-1.mlp.fc1", "text_encoder.text_model.final_layer_norm"})
    EXPECT_FALSE(clip_lora_stem(stem).has_value()) << stem;
}

// ---- Parsing ----

class ClipLoraFiles : public ::testing::Test {
 protected:
  void SetUp() override { FLUXSWAP_REQUIRE_FIXTURES(); }
  test::TempDir tmp;
};

TEST_F(ClipLoraFiles, KohyaClipPairsParseBesideTheTransformerOnesWithAlphaOverRank) {
  const FluxConfig config = tiny_config();
  auto kohya = SafetensorsFile::open(test::fixtures_dir() + "/tiny/lora_c_kohya.safetensors");
  Tensors t;
  for (const auto& k : kohya->keys()) t.emplace_back(k, kohya->tensor(k));
  const size_t transformer_tensors = t.size();
  const std::string q = "lora_te1_text_model_encoder_layers_1_self_attn_q_proj";
  t.emplace_back(q + ".lora_down.weight", Tensor::zeros(DType::F32, {4, 24}));
  t.emplace_back(q + ".lora_up.weight", Tensor::zeros(DType::F32, {24, 4}));
  t.emplace_back(q + ".alpha", scalar(2));
  t.emplace_back("lora_te3_encoder_block_0_layer_0_SelfAttention_q.lora_down.weight",
                 Tensor::zeros(DType::F32, {4, 8}));
  write_safetensors(tmp / "mixed.safetensors", t);

  const LoraAdapter a = load_lora_adapter(tmp / "mixed.safetensors", config);
  const LoraAdapter ref = load_lora_adapter(test::fixtures_dir() + "/tiny/lora_c_kohya.safetensors", config);
  EXPECT_EQ(a.format, "kohya");
  EXPECT_EQ(a.pairs.size(), ref.pairs.size());
  EXPECT_EQ(a.tensors_used, transformer_tensors);
  ASSERT_EQ(a.clip_pairs.size(), 1u);
  EXPECT_EQ(a.clip_tensors_used, 3u);
  const LoraPair& p = a.clip_pairs[0];
  EXPECT_EQ(p.module, "text_model.encoder.layers.1.self_attn.q_proj");
  EXPECT_EQ(p.source, q);
  EXPECT_EQ(p.rows, 24);
  EXPECT_FLOAT_EQ(p.scale, 0.5f);  // alpha 2 / rank 4
  ASSERT_EQ(a.ignored_keys.size(), 1u);
  EXPECT_HAS(a.ignored_keys[0], "lora_te3_");
}

TEST_F(ClipLoraFiles, PeftClipScaleComesFromTheTextEncoderConfigInTheMetadata) {
  const std::string m = "text_encoder.text_model.encoder.layers.0.mlp.fc1";
  const Tensors t = {{m + ".lora_A.weight", Tensor::zeros(DType::F32, {4, 24})},
                     {m + ".lora_B.weight", Tensor::zeros(DType::F32, {37, 4})}};
  // The transformer's fields must not scale the text encoder's pairs.
  write_safetensors(
      tmp / "peft.safetensors", t,
      {{"lora_adapter_metadata",
        R"({"transformer.r": 4, "transformer.lora_alpha": 1, "text_encoder.r": 4, "text_encoder.lora_alpha": 8})"}});
  const LoraAdapter a = load_lora_adapter(tmp / "peft.safetensors", tiny_config());
  ASSERT_EQ(a.clip_pairs.size(), 1u);
  EXPECT_FLOAT_EQ(a.clip_pairs[0].scale, 2.0f);
  EXPECT_TRUE(a.pairs.empty());

  write_safetensors(tmp / "peft_rank.safetensors", t, {{"lora_adapter_metadata", R"({"text_encoder.r": 8})"}});
  const std::string msg = error_of([&] { load_lora_adapter(tmp / "peft_rank.safetensors", tiny_config()); });
  EXPECT_HAS(msg, m + ".lora_A.weight");
  EXPECT_HAS(msg, "r = 8");

  write_safetensors(tmp / "peft_none.safetensors", t);  // no metadata: alpha = rank
  EXPECT_FLOAT_EQ(load_lora_adapter(tmp / "peft_none.safetensors", tiny_config()).clip_pairs[0].scale, 1.0f);
}

TEST_F(ClipLoraFiles, ClipKeysThatNameNoLinearOrLackAHalfAreErrors) {
  write_safetensors(tmp / "proj.safetensors",
                    {{"lora_te1_text_projection.lora_down.weight", Tensor::zeros(DType::F32, {4, 24})},
                     {"lora_te1_text_projection.lora_up.weight", Tensor::zeros(DType::F32, {24, 4})}});
  std::string msg = error_of([&] { load_lora_adapter(tmp / "proj.safetensors", tiny_config()); });
  EXPECT_HAS(msg, "lora_te1_text_projection.lora_down.weight");
  EXPECT_HAS(msg, "CLIP text encoder");

  const std::string q = "lora_te1_text_model_encoder_layers_0_self_attn_q_proj";
  write_safetensors(tmp / "half.safetensors", {{q + ".lora_down.weight", Tensor::zeros(DType::F32, {4, 24})}});
  msg = error_of([&] { load_lora_adapter(tmp / "half.safetensors", tiny_config()); });
  EXPECT_HAS(msg, q + ".lora_up.weight");

  // The same linear under two namings would be applied twice.
  write_safetensors(
      tmp / "twice.safetensors",
      {{q + ".lora_down.weight", Tensor::zeros(DType::F32, {4, 24})},
       {q + ".lora_up.weight", Tensor::zeros(DType::F32, {24, 4})},
       {"text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight", Tensor::zeros(DType::F32, {4, 24})},
       {"text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight",
        Tensor::zeros(DType::F32, {24, 4})}});
  msg = error_of([&] { load_lora_adapter(tmp / "twice.safetensors", tiny_config()); });
  EXPECT_HAS(msg, "both target 'text_model.encoder.layers.0.self_attn.q_proj'");

  Tensor up = Tensor::zeros(DType::F32, {24, 4});
  up.ptr<float>()[5] = std::numeric_limits<float>::quiet_NaN();
  write_safetensors(tmp / "nan.safetensors",
                    {{q + ".lora_down.weight", Tensor::zeros(DType::F32, {4, 24})}, {q + ".lora_up.weight", up}});
  msg = error_of([&] { load_lora_adapter(tmp / "nan.safetensors", tiny_config()); });
  EXPECT_HAS(msg, q + ".lora_up.weight' holds NaN at element 5");
}

// ---- The math ----

// One LoRA on one CLIP linear, as a test writes it: down [r, in], up [out, r], scale = alpha / r.
struct TestPair {
  int layer;
  std::string projection;  // "self_attn.q_proj", "mlp.fc1", ...
  Tensor down, up;
  float alpha;
};

class ClipLoraMath : public ::testing::Test {
 protected:
  void SetUp() override {
    FLUXSWAP_REQUIRE_FIXTURES();
    be = make_cpu_backend();
    clip = std::make_unique<ClipTextModel>(ClipTextModel::from_folder(pipeline_dir() + "/text_encoder", *be));
    const ClipTokenizer tok = ClipTokenizer::from_folder(pipeline_dir() + "/tokenizer");
    std::vector<int32_t> all;
    for (const std::string prompt : {"a photo of a cat wearing a hat", "an oil painting of a lighthouse"}) {
      const TokenEncoding e = tok.encode(prompt, ClipTokenizer::kMaxLength);
      all.insert(all.end(), e.ids.begin(), e.ids.end());
      eos.push_back(int64_t(e.eos_index));
    }
    ids = Tensor::empty(DType::I32, {2, int64_t(ClipTokenizer::kMaxLength)});
    std::memcpy(ids.data(), all.data(), all.size() * sizeof(int32_t));
  }

  // pooled [2, C] then last hidden [2, 77, C], flattened into one host tensor.
  Tensor encode(ClipTextModel& m) {
    const int64_t C = m.config().hidden_size;
    Tensor pooled = be->empty(DType::F32, {2, C});
    Tensor last = be->empty(DType::F32, {2, int64_t(ClipTokenizer::kMaxLength), C});
    m.encode(ids, eos, pooled, last);
    Tensor out = Tensor::empty(DType::F32, {pooled.numel() + last.numel()});
    std::memcpy(out.data(), pooled.data(), pooled.nbytes());
    std::memcpy(out.ptr<float>() + pooled.numel(), last.data(), last.nbytes());
    return out;
  }

  TestPair random_pair(int layer, const std::string& projection, int64_t rank, float alpha) {
    const int64_t C = clip->config().hidden_size, I = clip->config().intermediate_size;
    const int64_t out = projection == "mlp.fc1" ? I : C, in = projection == "mlp.fc2" ? I : C;
    TestPair p{layer, projection, Tensor::empty(DType::F32, {rank, in}), Tensor::empty(DType::F32, {out, rank}), alpha};
    test::fill_normal(p.down, rng, 0.5f);
    test::fill_normal(p.up, rng, 0.1f);
    return p;
  }

  // A kohya file of `pairs` (with alpha), as a LoRA trainer writes it, parsed.
  std::shared_ptr<const LoraAdapter> kohya_file(const std::string& name, const std::vector<TestPair>& pairs) {
    return std::make_shared<const LoraAdapter>(load_lora_adapter(write_kohya(name, pairs), tiny_config()));
  }
  std::string write_kohya(const std::string& name, const std::vector<TestPair>& pairs) {
    Tensors t;
    for (const TestPair& p : pairs) {
      std::string proj = p.projection;
      proj[proj.find('.')] = '_';
      const std::string stem = "lora_te1_text_model_encoder_layers_" + std::to_string(p.layer) + "_" + proj;
      t.emplace_back(stem + ".lora_down.weight", p.down);
      t.emplace_back(stem + ".lora_up.weight", p.up);
      t.emplace_back(stem + ".alpha", scalar(p.alpha));
    }
    write_safetensors(tmp / name, t);
    return tmp / name;
  }

  // The fixture's CLIP folder with every pair merged into its transformers weight in double precision.
  std::unique_ptr<ClipTextModel> merged_clip(const std::vector<std::pair<std::vector<TestPair>, float>>& adapters) {
    auto file = SafetensorsFile::open(pipeline_dir() + "/text_encoder/model.safetensors");
    const std::string prefix = file->find("text_model.final_layer_norm.weight") ? "text_model." : "";
    std::map<std::string, Tensor> weights;
    for (const auto& k : file->keys()) weights[k] = file->tensor(k).to_f32();
    for (const auto& [pairs, weight] : adapters)
      for (const TestPair& p : pairs) {
        Tensor& w = weights.at(prefix + "encoder.layers." + std::to_string(p.layer) + "." + p.projection + ".weight");
        const int64_t r = p.down.size(0), out = w.size(0), in = w.size(1);
        const double s = double(weight) * p.alpha / double(r);
        for (int64_t i = 0; i < out; ++i)
          for (int64_t j = 0; j < in; ++j) {
            double d = 0;
            for (int64_t k = 0; k < r; ++k) d += double(p.up.ptr<float>()[i * r + k]) * p.down.ptr<float>()[k * in + j];
            w.ptr<float>()[i * in + j] = float(double(w.ptr<float>()[i * in + j]) + s * d);
          }
      }
    const std::string dir = tmp / ("merged_text_encoder_" + std::to_string(++merged_count));
    std::filesystem::create_directories(dir);
    std::filesystem::copy_file(pipeline_dir() + "/text_encoder/config.json", dir + "/config.json");
    write_safetensors(dir + "/model.safetensors", Tensors(weights.begin(), weights.end()));
    return std::make_unique<ClipTextModel>(ClipTextModel::from_folder(dir, *be));
  }

  std::unique_ptr<Backend> be;
  std::unique_ptr<ClipTextModel> clip;
  Tensor ids;
  std::vector<int64_t> eos;
  std::mt19937 rng{7};
  test::TempDir tmp;
  int merged_count = 0;
};

constexpr double kTolerance = 1e-5;

TEST_F(ClipLoraMath, RuntimeBranchesEqualMergedTransformersWeights) {
  const Tensor base = encode(*clip);
  // Separate q, k and v LoRAs land in the fused qkv's rows; every projection kind, both layers, ranks 2-6.
  const std::vector<TestPair> a = {
      random_pair(0, "self_attn.q_proj", 4, 4.0f), random_pair(0, "self_attn.v_proj", 2, 1.0f),
      random_pair(1, "self_attn.k_proj", 6, 3.0f), random_pair(1, "self_attn.out_proj", 4, 8.0f),
      random_pair(0, "mlp.fc1", 4, 4.0f),          random_pair(1, "mlp.fc2", 3, 3.0f)};
  const std::vector<TestPair> b = {random_pair(0, "self_attn.q_proj", 2, 2.0f), random_pair(1, "mlp.fc1", 5, 5.0f)};
  const auto fa = kohya_file("a.safetensors", a), fb = kohya_file("b.safetensors", b);
  ASSERT_EQ(fa->clip_pairs.size(), a.size());

  for (const auto& [active, merged] :
       std::vector<std::pair<std::vector<ActiveLora>, std::vector<std::pair<std::vector<TestPair>, float>>>>{
           {{{fa, 1.0f}}, {{a, 1.0f}}}, {{{fa, 0.7f}, {fb, -0.5f}}, {{a, 0.7f}, {b, -0.5f}}}}) {
    SCOPED_TRACE(active.size());
    ClipLoraSet set = prepare_clip_loras(active, *clip);
    EXPECT_EQ(set.pairs, active.size() == 1 ? a.size() : a.size() + b.size());
    // a: layer 0's qkv and fc1, layer 1's qkv, out_proj and fc2; b adds to layer 0's qkv and brings layer 1's fc1.
    EXPECT_EQ(set.linears.size(), active.size() == 1 ? 5u : 6u);
    clip->set_lora(std::move(set.linears));
    const Tensor with = encode(*clip);
    const Tensor expected = encode(*merged_clip(merged));
    EXPECT_LE(max_rel_error(with, expected), kTolerance);
    EXPECT_GT(max_rel_error(with, base), 1e-2) << "the LoRA changed nothing";
  }
  clip->set_lora({});
  EXPECT_TRUE(test::same_bits(encode(*clip), base));
}

TEST_F(ClipLoraMath, ALoraThatDoesNotFitChangesNothing) {
  const std::vector<TestPair> good = {random_pair(0, "mlp.fc1", 4, 4.0f)};
  const auto fg = kohya_file("good.safetensors", good);
  clip->set_lora(prepare_clip_loras({{fg, 1.0f}}, *clip).linears);
  const Tensor with_good = encode(*clip);

  // Layer 2 of a 2-layer CLIP, then a down as wide as FLUX.1's CLIP-L (768) on this 24-wide one.
  const auto beyond = kohya_file("beyond.safetensors", {random_pair(2, "mlp.fc1", 4, 4.0f)});
  std::string msg = error_of([&] { prepare_clip_loras({{fg, 1.0f}, {beyond, 1.0f}}, *clip); });
  EXPECT_HAS(msg, "beyond.safetensors");
  EXPECT_HAS(msg, "lora_te1_text_model_encoder_layers_2_mlp_fc1");
  EXPECT_HAS(msg, "has 2 layers");

  TestPair wide = random_pair(0, "self_attn.q_proj", 4, 4.0f);
  wide.down = Tensor::zeros(DType::F32, {4, 768});
  const auto fw = kohya_file("wide.safetensors", {wide});
  msg = error_of([&] { prepare_clip_loras({{fw, 1.0f}}, *clip); });
  EXPECT_HAS(msg, "wide.safetensors");
  EXPECT_HAS(msg, "[rank, 24]");

  // A NaN in a file still being read is found when CLIP's pairs have arrived, before anything changes.
  TestPair bad = random_pair(1, "mlp.fc2", 4, 4.0f);
  bad.up.ptr<float>()[3] = std::numeric_limits<float>::infinity();
  auto heap = [](size_t n) { return std::shared_ptr<void>(std::malloc(n), std::free); };
  const auto streamed = std::make_shared<const LoraAdapter>(
      start_loading_lora_adapter(write_kohya("bad.safetensors", {bad}), tiny_config(), heap));
  msg = error_of([&] {
    set_loras_with_clip(*clip, {{streamed, 1.0f}}, [] { FAIL() << "the transformer was asked"; });
  });
  EXPECT_HAS(msg, "bad.safetensors");
  EXPECT_HAS(msg,
             "the up tensor of 'lora_te1_text_model_encoder_layers_1_mlp_fc2' holds a NaN or an infinity at "
             "element 3");
  EXPECT_TRUE(test::same_bits(encode(*clip), with_good));

  // The transformer's half failing leaves CLIP's branches as they were.
  const auto other = kohya_file("other.safetensors", {random_pair(1, "mlp.fc2", 4, 4.0f)});
  msg = error_of([&] { set_loras_with_clip(*clip, {{other, 1.0f}}, [] { throw Error("transformer refused"); }); });
  EXPECT_HAS(msg, "transformer refused");
  EXPECT_TRUE(test::same_bits(encode(*clip), with_good));

  const ClipLoraReport r = set_loras_with_clip(*clip, {{other, 1.0f}}, [] {});
  EXPECT_EQ(r.pairs, 1u);
  EXPECT_EQ(r.tensors, 3u);
  EXPECT_EQ(r.linears, 1u);
  EXPECT_GT(max_rel_error(encode(*clip), with_good), 1e-3);
}

}  // namespace
}  // namespace fluxswap
