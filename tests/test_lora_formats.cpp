// LoRA file parsing: every fixture format lands on the right internal modules, rows and scales; the same LoRA in
// every naming gives the same pairs; the dense delta matches one computed straight from the file's diffusers
// tensors; and each kind of malformed file fails with a message naming the file, the key and the problem.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <map>
#include <tuple>

#include "core/error.h"
#include "lora/lora_adapter.h"
#include "test_support.h"

namespace fluxswap {
namespace {

using Tensors = std::vector<std::pair<std::string, Tensor>>;

using test::error_of;

std::string lora_path(const std::string& dir, const std::string& name) {
  return test::fixtures_dir() + "/" + dir + "/lora_" + name + ".safetensors";
}

FluxConfig config_of(const std::string& dir) {
  return FluxConfig::from_json_file(test::fixtures_dir() + "/" + dir + "/config.json");
}

// All tensors of a file (borrowed views that keep the file mapped), in key order.
Tensors read_all(const std::string& path) {
  auto f = SafetensorsFile::open(path);
  Tensors out;
  for (const auto& k : f->keys()) out.emplace_back(k, f->tensor(k));
  return out;
}

// Renames every key; an empty name drops the tensor.
Tensors renamed(const Tensors& in, const std::function<std::string(const std::string&)>& rename) {
  Tensors out;
  for (const auto& [k, t] : in)
    if (std::string n = rename(k); !n.empty()) out.emplace_back(n, t);
  return out;
}

// Replaces `from` by `to` at the end of a key (suffix spellings); keeps other keys.
std::string swap_suffix(const std::string& k, const std::string& from, const std::string& to) {
  return k.ends_with(from) ? k.substr(0, k.size() - from.size()) + to : k;
}

std::string underscored(std::string s) {
  for (char& c : s)
    if (c == '.') c = '_';
  return s;
}

using test::scalar;

Tensor& tensor_of(Tensors& ts, const std::string& key) {
  for (auto& [k, t] : ts)
    if (k == key) return t;
  throw std::runtime_error("test: no tensor " + key);
}

bool bitwise_equal(const Tensor& a, const Tensor& b) {
  return a.shape() == b.shape() && a.dtype() == b.dtype() && std::memcmp(a.data(), b.data(), a.nbytes()) == 0;
}

const LoraPair& pair_from(const LoraAdapter& a, const std::string& source) {
  for (const auto& p : a.pairs)
    if (p.source == source) return p;
  throw std::runtime_error("test: no pair from " + source);
}

std::vector<const LoraPair*> by_target(const LoraAdapter& a) {
  std::vector<const LoraPair*> v;
  for (const auto& p : a.pairs) v.push_back(&p);
  std::sort(v.begin(), v.end(),
            [](auto* x, auto* y) { return std::tie(x->module, x->row) < std::tie(y->module, y->row); });
  return v;
}

// Same modules, rows, scales and bitwise-equal tensors, whatever the sources were called.
void expect_same_pairs(const LoraAdapter& a, const LoraAdapter& b) {
  ASSERT_EQ(a.pairs.size(), b.pairs.size());
  auto pa = by_target(a), pb = by_target(b);
  for (size_t i = 0; i < pa.size(); ++i) {
    SCOPED_TRACE(pa[i]->source + " vs " + pb[i]->source);
    EXPECT_EQ(pa[i]->module, pb[i]->module);
    EXPECT_EQ(pa[i]->row, pb[i]->row);
    EXPECT_EQ(pa[i]->rows, pb[i]->rows);
    EXPECT_EQ(pa[i]->scale, pb[i]->scale);
    EXPECT_TRUE(bitwise_equal(pa[i]->down, pb[i]->down));
    EXPECT_TRUE(bitwise_equal(pa[i]->up, pb[i]->up));
  }
}

// scale * up @ down, naive: the test's own arithmetic, shared with nothing in the engine.
std::vector<double> dense_delta(const Tensor& up32, const Tensor& down32, double scale) {
  const Tensor up = up32.to_f32(), down = down32.to_f32();
  const int64_t out = up.size(0), r = up.size(1), in = down.size(1);
  std::vector<double> d(size_t(out * in), 0.0);
  for (int64_t o = 0; o < out; ++o)
    for (int64_t k = 0; k < r; ++k)
      for (int64_t i = 0; i < in; ++i)
        d[size_t(o * in + i)] += scale * up.ptr<float>()[o * r + k] * down.ptr<float>()[k * in + i];
  return d;
}

// Tests run on the tiny fixture unless they say otherwise; `kohya` is its kohya LoRA, ready to edit.
class LoraFormats : public ::testing::Test {
 protected:
  void SetUp() override {
    FLUXSWAP_REQUIRE_FIXTURES();
    config = config_of("tiny");
    kohya = read_all(lora_path("tiny", "c_kohya"));
  }
  // Writes `t` as bad.safetensors and returns the parse error ("(no error)" if it parsed).
  std::string parse_error(const Tensors& t, const std::map<std::string, std::string>& metadata = {}) {
    write_safetensors(path(), t, metadata);
    const std::string msg = error_of([&] { load_lora_adapter(path(), config); });
    EXPECT_HAS(msg, path());
    // Read into memory (the upload path, values checked while reading) rather than mapped: the same verdict.
    auto heap = [](size_t n) { return std::shared_ptr<void>(std::malloc(n), std::free); };
    EXPECT_EQ(error_of([&] { load_lora_adapter(path(), config, heap); }), msg);
    return msg;
  }
  std::string path() const { return tmp / "bad.safetensors"; }
  Tensors without(const std::string& key) const {
    return renamed(kohya, [&](const std::string& k) { return k == key ? "" : k; });
  }

  test::TempDir tmp;
  FluxConfig config;
  Tensors kohya;
  const std::string qkv = "lora_unet_double_blocks_0_img_attn_qkv";
};

// ---- the fixture LoRAs ----

struct FixtureCase {
  std::string file;
  std::string format;
  float scale;
  int64_t rank;
  // pairs per double block, per single block, outside the blocks
  int64_t per_double, per_single, extra;
};

const FixtureCase kFixtureCases[] = {
    {"a_peft", "peft", 2.0f, 4, 14, 6, 4},   {"b_peft", "peft", 0.5f, 8, 8, 3, 0},
    {"c_kohya", "kohya", 0.5f, 8, 10, 3, 0}, {"c_comfy", "comfyui", 0.5f, 8, 10, 3, 0},
    {"d_xlabs", "xlabs", 1.0f, 4, 4, 0, 0},
};

TEST_F(LoraFormats, EveryFixtureParsesWithItsFormatPairsScaleAndTensorCount) {
  for (const std::string dir : {"tiny", "small", "tiny_schnell"}) {
    const FluxConfig c = config_of(dir);
    for (const auto& fc : kFixtureCases) {
      SCOPED_TRACE(dir + "/" + fc.file);
      const std::string path = lora_path(dir, fc.file);
      const LoraAdapter a = load_lora_adapter(path, c);
      EXPECT_EQ(a.path, path);
      EXPECT_EQ(a.format, fc.format);
      EXPECT_EQ(int64_t(a.pairs.size()), fc.per_double * c.num_layers + fc.per_single * c.num_single_layers + fc.extra);
      EXPECT_EQ(a.tensors_used, SafetensorsFile::open(path)->keys().size());
      EXPECT_TRUE(a.ignored_keys.empty());
      for (const auto& p : a.pairs) {
        EXPECT_EQ(p.scale, fc.scale) << p.source;
        EXPECT_EQ(p.down.shape(), (Shape{fc.rank, p.down.size(1)})) << p.source;
        EXPECT_EQ(p.up.shape(), (Shape{p.rows, fc.rank})) << p.source;
        EXPECT_EQ(p.down.dtype(), DType::F32);
        EXPECT_FALSE(p.up_bias.defined());
      }
    }
  }
}

TEST_F(LoraFormats, PeftSplitProjectionsLandOnTheirFusedRows) {
  const int64_t D = config.inner_dim(), M = config.mlp_dim();
  const std::string path = lora_path("tiny", "a_peft");
  const LoraAdapter a = load_lora_adapter(path, config);
  auto f = SafetensorsFile::open(path);

  const LoraPair& k = pair_from(a, "transformer.transformer_blocks.0.attn.to_k");
  EXPECT_EQ(k.module, "double_blocks.0.img_attn.qkv");
  EXPECT_EQ(k.row, D);
  EXPECT_EQ(k.rows, D);
  EXPECT_TRUE(bitwise_equal(k.up, f->tensor("transformer.transformer_blocks.0.attn.to_k.lora_B.weight")));
  EXPECT_TRUE(bitwise_equal(k.down, f->tensor("transformer.transformer_blocks.0.attn.to_k.lora_A.weight")));

  const LoraPair& v = pair_from(a, "transformer.transformer_blocks.1.attn.add_v_proj");
  EXPECT_EQ(v.module, "double_blocks.1.txt_attn.qkv");
  EXPECT_EQ(v.row, 2 * D);
  const LoraPair& mlp = pair_from(a, "transformer.single_transformer_blocks.1.proj_mlp");
  EXPECT_EQ(mlp.module, "single_blocks.1.linear1");
  EXPECT_EQ(mlp.row, 3 * D);
  EXPECT_EQ(mlp.rows, M);
  EXPECT_EQ(pair_from(a, "transformer.single_transformer_blocks.0.proj_out").module, "single_blocks.0.linear2");
  EXPECT_EQ(pair_from(a, "transformer.proj_out").module, "final_layer.linear");
  EXPECT_EQ(pair_from(a, "transformer.x_embedder").module, "img_in");
  EXPECT_EQ(pair_from(a, "transformer.transformer_blocks.0.norm1_context.linear").module,
            "double_blocks.0.txt_mod.lin");
}

TEST_F(LoraFormats, NormOutSwapsOnlyTheOutputRowHalves) {
  const int64_t D = config.inner_dim();
  const std::string path = lora_path("tiny", "a_peft");
  const LoraAdapter a = load_lora_adapter(path, config);
  const LoraPair& p = pair_from(a, "transformer.norm_out.linear");
  auto f = SafetensorsFile::open(path);
  const Tensor up = f->tensor("transformer.norm_out.linear.lora_B.weight");
  EXPECT_EQ(p.module, "final_layer.adaLN_modulation.1");
  EXPECT_EQ(p.row, 0);
  EXPECT_EQ(p.rows, 2 * D);
  EXPECT_TRUE(bitwise_equal(p.down, f->tensor("transformer.norm_out.linear.lora_A.weight")));
  // diffusers (scale, shift) -> internal (shift, scale)
  EXPECT_TRUE(bitwise_equal(p.up.narrow(0, 0, D).to_f32(), up.narrow(0, D, D).to_f32()));
  EXPECT_TRUE(bitwise_equal(p.up.narrow(0, D, D).to_f32(), up.narrow(0, 0, D).to_f32()));
}

TEST_F(LoraFormats, DenseDeltaMatchesTheDiffusersTensorsDirectly) {
  const int64_t D = config.inner_dim(), M = config.mlp_dim();
  const std::string path = lora_path("tiny", "a_peft");
  const LoraAdapter a = load_lora_adapter(path, config);
  auto f = SafetensorsFile::open(path);
  const double s = 8.0 / 4.0;  // the fixture's lora_alpha / r

  struct Part {
    std::string diffusers;
    int64_t row;      // where its rows start internally
    int64_t src_row;  // which of its rows
    int64_t rows;
  };
  struct Case {
    std::string module;
    int64_t out, in;
    std::vector<Part> parts;
  };
  const std::string sb = "transformer.single_transformer_blocks.1.";
  const Case cases[] = {
      {"single_blocks.1.linear1",
       3 * D + M,
       D,
       {{sb + "attn.to_q", 0, 0, D},
        {sb + "attn.to_k", D, 0, D},
        {sb + "attn.to_v", 2 * D, 0, D},
        {sb + "proj_mlp", 3 * D, 0, M}}},
      {"final_layer.adaLN_modulation.1",
       2 * D,
       D,
       {{"transformer.norm_out.linear", 0, D, D}, {"transformer.norm_out.linear", D, 0, D}}},
  };
  for (const Case& cs : cases) {
    SCOPED_TRACE(cs.module);
    std::vector<double> expected(size_t(cs.out * cs.in), 0.0), got(expected.size(), 0.0);
    for (const Part& part : cs.parts) {
      const auto d =
          dense_delta(f->tensor(part.diffusers + ".lora_B.weight"), f->tensor(part.diffusers + ".lora_A.weight"), s);
      for (int64_t r = 0; r < part.rows; ++r)
        for (int64_t i = 0; i < cs.in; ++i)
          expected[size_t((part.row + r) * cs.in + i)] += d[size_t((part.src_row + r) * cs.in + i)];
    }
    for (const auto& p : a.pairs) {
      if (p.module != cs.module) continue;
      const auto d = dense_delta(p.up, p.down, p.scale);
      for (size_t j = 0; j < d.size(); ++j) got[size_t(p.row * cs.in) + j] += d[j];
    }
    double max_err = 0, max_ref = 0;
    for (size_t j = 0; j < got.size(); ++j) {
      max_err = std::max(max_err, std::abs(got[j] - expected[j]));
      max_ref = std::max(max_ref, std::abs(expected[j]));
    }
    EXPECT_GT(max_ref, 0.0);
    EXPECT_LE(max_err, 1e-12 * max_ref);
  }
}

TEST_F(LoraFormats, KohyaAndComfyUiFilesGiveIdenticalPairs) {
  for (const std::string dir : {"tiny", "small", "tiny_schnell"}) {
    SCOPED_TRACE(dir);
    const FluxConfig c = config_of(dir);
    const LoraAdapter k = load_lora_adapter(lora_path(dir, "c_kohya"), c);
    expect_same_pairs(k, load_lora_adapter(lora_path(dir, "c_comfy"), c));
    // A fused module takes one pair over all its rows.
    const LoraPair& l1 = pair_from(k, "lora_unet_single_blocks_0_linear1");
    EXPECT_EQ(l1.module, "single_blocks.0.linear1");
    EXPECT_EQ(l1.row, 0);
    EXPECT_EQ(l1.rows, 3 * c.inner_dim() + c.mlp_dim());
    EXPECT_EQ(pair_from(k, "lora_unet_double_blocks_0_txt_mod_lin").module, "double_blocks.0.txt_mod.lin");
  }
}

TEST_F(LoraFormats, XLabsProcessorsMapToBothStreams) {
  const LoraAdapter a = load_lora_adapter(lora_path("tiny", "d_xlabs"), config);
  const std::pair<std::string, std::string> expected[] = {
      {"double_blocks.1.processor.qkv_lora1", "double_blocks.1.img_attn.qkv"},
      {"double_blocks.1.processor.qkv_lora2", "double_blocks.1.txt_attn.qkv"},
      {"double_blocks.0.processor.proj_lora1", "double_blocks.0.img_attn.proj"},
      {"double_blocks.0.processor.proj_lora2", "double_blocks.0.txt_attn.proj"},
  };
  for (const auto& [source, module] : expected) {
    const LoraPair& p = pair_from(a, source);
    EXPECT_EQ(p.module, module);
    EXPECT_EQ(p.row, 0);
  }
  EXPECT_EQ(pair_from(a, "double_blocks.1.processor.qkv_lora1").rows, 3 * config.inner_dim());
}

// ---- the same LoRA under every other supported naming ----

TEST_F(LoraFormats, EveryNamingOfTheKohyaLoraGivesTheSamePairs) {
  const LoraAdapter ref = load_lora_adapter(lora_path("tiny", "c_kohya"), config);
  const Tensors comfy = read_all(lora_path("tiny", "c_comfy"));
  auto lora_ab = [](std::string k) {
    return swap_suffix(swap_suffix(k, ".lora_down.weight", ".lora_A.weight"), ".lora_up.weight", ".lora_B.weight");
  };
  const std::string bare = "diffusion_model.";
  const std::vector<std::tuple<std::string, std::string, Tensors>> variants = {
      {"doubled", "kohya",
       renamed(kohya,
               [](const std::string& k) {
                 return "lora_unet_model_diffusion_model_" + k.substr(std::string("lora_unet_").size());
               })},
      {"comfy_ab", "comfyui", renamed(comfy, lora_ab)},
      {"bfl", "bfl-lora", renamed(comfy, [&](const std::string& k) { return lora_ab(k.substr(bare.size())); })},
      {"fal", "fal-kontext",
       renamed(comfy, [&](const std::string& k) { return "base_model.model." + lora_ab(k.substr(bare.size())); })},
      {"te", "kohya",
       [&] {
         Tensors t = kohya;
         t.emplace_back("lora_te3_encoder_block_0_layer_0_SelfAttention_q.lora_down.weight", scalar(1));
         t.emplace_back("lora_unet_double_blocks_0_img_attn_qkv.dora_scale", scalar(1));
         return t;
       }()},
  };
  for (const auto& [name, format, tensors] : variants) {
    SCOPED_TRACE(name);
    write_safetensors(tmp / (name + ".safetensors"), tensors);
    const LoraAdapter a = load_lora_adapter(tmp / (name + ".safetensors"), config);
    EXPECT_EQ(a.format, format);
    expect_same_pairs(ref, a);
    EXPECT_EQ(a.tensors_used + a.clip_tensors_used + a.ignored_keys.size(), tensors.size());
  }
}

TEST_F(LoraFormats, EveryNamingOfThePeftLoraGivesTheSamePairs) {
  const std::string path = lora_path("tiny", "a_peft");
  const LoraAdapter ref = load_lora_adapter(path, config);
  const Tensors peft = read_all(path);
  const auto metadata = SafetensorsFile::open(path)->metadata();
  const std::string prefix = "transformer.";

  // OneTrainer: underscored diffusers paths, kohya suffixes, alpha as tensors (8 / rank 4 = scale 2).
  Tensors onetrainer;
  for (const auto& [k, t] : peft) {
    const bool is_a = k.ends_with(".lora_A.weight");
    const std::string module = k.substr(prefix.size(), k.size() - prefix.size() - std::string(".lora_A.weight").size());
    const std::string stem = "lora_transformer_" + underscored(module);
    onetrainer.emplace_back(stem + (is_a ? ".lora_down.weight" : ".lora_up.weight"), t);
    if (is_a) onetrainer.emplace_back(stem + ".alpha", scalar(8));
  }
  write_safetensors(tmp / "onetrainer.safetensors", onetrainer);
  const LoraAdapter ot = load_lora_adapter(tmp / "onetrainer.safetensors", config);
  EXPECT_EQ(ot.format, "onetrainer");
  expect_same_pairs(ref, ot);

  // No `transformer.` prefix: diffusers would drop these silently; we place them.
  write_safetensors(tmp / "bare.safetensors",
                    renamed(peft, [&](const std::string& k) { return k.substr(prefix.size()); }), metadata);
  const LoraAdapter bare = load_lora_adapter(tmp / "bare.safetensors", config);
  EXPECT_EQ(bare.format, "peft");
  expect_same_pairs(ref, bare);
}

TEST_F(LoraFormats, PeftScaleFallsBackFromMetadataToAlphaTensorsToOne) {
  const Tensors peft = read_all(lora_path("tiny", "b_peft"));  // rank 8
  const std::string to_k = "transformer.transformer_blocks.0.attn.to_k";

  write_safetensors(tmp / "plain.safetensors", peft);
  for (const auto& p : load_lora_adapter(tmp / "plain.safetensors", config).pairs) EXPECT_EQ(p.scale, 1.0f) << p.source;

  Tensors with_alpha = peft;
  with_alpha.emplace_back(to_k + ".alpha", scalar(2));
  write_safetensors(tmp / "alpha.safetensors", with_alpha);
  const LoraAdapter aa = load_lora_adapter(tmp / "alpha.safetensors", config);
  EXPECT_EQ(pair_from(aa, to_k).scale, 0.25f);
  EXPECT_EQ(pair_from(aa, to_k).module, "double_blocks.0.img_attn.qkv");
  EXPECT_EQ(aa.tensors_used, with_alpha.size());

  // PEFT patterns match the end of the module path; the first matching key wins.
  write_safetensors(tmp / "pattern.safetensors", with_alpha,
                    {{"lora_adapter_metadata", R"({"transformer.r": 8, "transformer.lora_alpha": 16,
                       "transformer.alpha_pattern": {"transformer_blocks.0.attn.to_k": 4, "to_k": 32}})"}});
  const LoraAdapter pa = load_lora_adapter(tmp / "pattern.safetensors", config);
  EXPECT_EQ(pair_from(pa, to_k).scale, 0.5f);
  EXPECT_EQ(pair_from(pa, "transformer.transformer_blocks.1.attn.to_k").scale, 4.0f);
  EXPECT_EQ(pair_from(pa, "transformer.transformer_blocks.1.attn.to_q").scale, 2.0f);

  write_safetensors(tmp / "rslora.safetensors", peft,
                    {{"lora_adapter_metadata", R"({"transformer.lora_alpha": 4, "transformer.use_rslora": true})"}});
  for (const auto& p : load_lora_adapter(tmp / "rslora.safetensors", config).pairs)
    EXPECT_FLOAT_EQ(p.scale, float(4.0 / std::sqrt(8.0)));
}

TEST_F(LoraFormats, PeftUpBiasFollowsTheOutputRows) {
  const int64_t D = config.inner_dim();
  Tensors t = read_all(lora_path("tiny", "a_peft"));
  Tensor bias = Tensor::empty(DType::F32, {2 * D});
  for (int64_t i = 0; i < 2 * D; ++i) bias.ptr<float>()[i] = float(i);
  t.emplace_back("transformer.norm_out.linear.lora_B.bias", bias);
  write_safetensors(tmp / "bias.safetensors", t);
  const LoraAdapter a = load_lora_adapter(tmp / "bias.safetensors", config);
  const LoraPair& p = pair_from(a, "transformer.norm_out.linear");
  ASSERT_TRUE(p.up_bias.defined());
  EXPECT_EQ(p.up_bias.ptr<float>()[0], float(D));
  EXPECT_EQ(p.up_bias.ptr<float>()[D], 0.0f);
  EXPECT_EQ(a.tensors_used, t.size());
}

// ---- malformed files: each message names the file, the key and what was expected ----

TEST_F(LoraFormats, UpWithoutDownAndDownWithoutUp) {
  std::string msg = parse_error(without(qkv + ".lora_up.weight"));
  EXPECT_HAS(msg, "'" + qkv + ".lora_down.weight' has no matching up");
  EXPECT_HAS(msg, "'" + qkv + ".lora_up.weight'");
  msg = parse_error(without(qkv + ".lora_down.weight"));
  EXPECT_HAS(msg, "'" + qkv + ".lora_up.weight' has no matching down");
  Tensors alpha_only = without(qkv + ".lora_down.weight");
  alpha_only = renamed(alpha_only, [&](const std::string& k) { return k == qkv + ".lora_up.weight" ? "" : k; });
  msg = parse_error(alpha_only);
  EXPECT_HAS(msg, "'" + qkv + ".alpha' belongs to no LoRA");
}

TEST_F(LoraFormats, RankMismatchBetweenUpAndDown) {
  tensor_of(kohya, qkv + ".lora_up.weight") = tensor_of(kohya, qkv + ".lora_up.weight").narrow(1, 0, 7);
  const std::string msg = parse_error(kohya);
  EXPECT_HAS(msg, "'" + qkv + ".lora_up.weight' has shape [96, 7]: rank 7");
  EXPECT_HAS(msg, "has rank 8");
}

TEST_F(LoraFormats, DownColumnsMustBeTheModuleInputs) {
  tensor_of(kohya, qkv + ".lora_down.weight") = tensor_of(kohya, qkv + ".lora_down.weight").narrow(1, 0, 30);
  const std::string msg = parse_error(kohya);
  EXPECT_HAS(msg, "'" + qkv + ".lora_down.weight' has shape [8, 30]: 30 input columns");
  EXPECT_HAS(msg, "'double_blocks.0.img_attn.qkv' takes 32 inputs");
}

TEST_F(LoraFormats, UpRowsMustBeTheTargetRows) {
  tensor_of(kohya, qkv + ".lora_up.weight") = tensor_of(kohya, qkv + ".lora_up.weight").narrow(0, 0, 64);
  const std::string msg = parse_error(kohya);
  EXPECT_HAS(msg, "'" + qkv + ".lora_up.weight' has shape [64, 8]: 64 output rows, expected 96");
  EXPECT_HAS(msg, "'double_blocks.0.img_attn.qkv' rows [0, 96)");
}

TEST_F(LoraFormats, NanAndInfinityAnywhereAreRejected) {
  const std::string key = "lora_unet_single_blocks_1_linear2.lora_up.weight";
  Tensor bad = tensor_of(kohya, key).to_f32();
  bad.ptr<float>()[bad.numel() - 1] = std::numeric_limits<float>::quiet_NaN();
  tensor_of(kohya, key) = bad;
  std::string msg = parse_error(kohya);
  EXPECT_HAS(msg, "'" + key + "' holds NaN at element " + std::to_string(bad.numel() - 1));
  bad.ptr<float>()[bad.numel() - 1] = std::numeric_limits<float>::infinity();
  msg = parse_error(kohya);
  EXPECT_HAS(msg, "'" + key + "' holds an infinity");
}

TEST_F(LoraFormats, UnknownKeysAreListedWithTheirCountAndFormat) {
  for (int i = 0; i < 6; ++i) {
    const std::string stem = "lora_unet_double_blocks_" + std::to_string(7 + i) + "_img_attn_qkv";
    kohya.emplace_back(stem + ".lora_down.weight", tensor_of(kohya, qkv + ".lora_down.weight"));
    kohya.emplace_back(stem + ".lora_up.weight", tensor_of(kohya, qkv + ".lora_up.weight"));
  }
  kohya.emplace_back("lora_unet_double_blocks_0_img_attn_qkv.weird", scalar(1));
  const std::string msg = parse_error(kohya);
  EXPECT_HAS(msg, "13 key(s) of this kohya-format LoRA match no module");
  EXPECT_HAS(msg, "(2 double, 2 single blocks)");
  EXPECT_HAS(msg, "'lora_unet_double_blocks_0_img_attn_qkv.weird'");
  EXPECT_HAS(msg, "'lora_unet_double_blocks_10_img_attn_qkv.lora_down.weight'");
  EXPECT_HAS(msg, "(3 more)");
}

TEST_F(LoraFormats, RankZero) {
  tensor_of(kohya, qkv + ".lora_down.weight") = Tensor::empty(DType::F32, {0, 32});
  tensor_of(kohya, qkv + ".lora_up.weight") = Tensor::empty(DType::F32, {96, 0});
  const std::string msg = parse_error(kohya);
  EXPECT_HAS(msg, "'" + qkv + ".lora_down.weight' has shape [0, 32]: rank 0");
}

TEST_F(LoraFormats, AlphaMustBeAScalar) {
  tensor_of(kohya, qkv + ".alpha") = Tensor::zeros(DType::F32, {2});
  const std::string msg = parse_error(kohya);
  EXPECT_HAS(msg, "'" + qkv + ".alpha' has shape [2], expected a scalar alpha");
}

TEST_F(LoraFormats, NonFloatTensorsAreRejected) {
  tensor_of(kohya, qkv + ".lora_down.weight") = Tensor::zeros(DType::I32, {8, 32});
  const std::string msg = parse_error(kohya);
  EXPECT_HAS(msg, "'" + qkv + ".lora_down.weight' has dtype I32, expected a float type");
}

TEST_F(LoraFormats, FullDeltasAreNotSupportedYet) {
  Tensors comfy = read_all(lora_path("tiny", "c_comfy"));
  comfy.emplace_back("diffusion_model.double_blocks.0.img_attn.proj.diff_b", Tensor::zeros(DType::F32, {32}));
  const std::string msg = parse_error(comfy);
  EXPECT_HAS(msg, "'diffusion_model.double_blocks.0.img_attn.proj.diff_b': full weight/bias deltas");
  EXPECT_HAS(msg, "not supported yet");
}

TEST_F(LoraFormats, ControlLoraNormScalesAndImgInPaddingAreNotSupportedYet) {
  const Tensors bfl = renamed(read_all(lora_path("tiny", "c_comfy")), [](const std::string& k) {
    return swap_suffix(swap_suffix(k.substr(16), ".lora_down.weight", ".lora_A.weight"), ".lora_up.weight",
                       ".lora_B.weight");
  });
  Tensors with_norm = bfl;
  with_norm.emplace_back("double_blocks.1.txt_attn.norm.key_norm.scale", Tensor::zeros(DType::F32, {16}));
  std::string msg = parse_error(with_norm);
  EXPECT_HAS(msg, "'double_blocks.1.txt_attn.norm.key_norm.scale': a full norm-scale tensor");
  EXPECT_HAS(msg, "not supported yet");

  Tensors with_img_in = bfl;
  with_img_in.emplace_back("img_in.lora_A.weight", Tensor::zeros(DType::F32, {4, 2 * config.in_channels}));
  with_img_in.emplace_back("img_in.lora_B.weight", Tensor::zeros(DType::F32, {config.inner_dim(), 4}));
  msg = parse_error(with_img_in);
  EXPECT_HAS(msg, "'img_in.lora_A.weight' has shape [4, 32]: 32 input columns, but 'img_in' takes 16 inputs");
  EXPECT_HAS(msg, "zero-padding the base img_in is not supported yet");
}

TEST_F(LoraFormats, OneModuleTargetedTwice) {
  kohya.emplace_back("lora_unet_model_diffusion_model_double_blocks_0_img_attn_qkv.lora_down.weight",
                     tensor_of(kohya, qkv + ".lora_down.weight"));
  kohya.emplace_back("lora_unet_model_diffusion_model_double_blocks_0_img_attn_qkv.lora_up.weight",
                     tensor_of(kohya, qkv + ".lora_up.weight"));
  const std::string msg = parse_error(kohya);
  EXPECT_HAS(msg, "'" + qkv + "' and 'lora_unet_model_diffusion_model_double_blocks_0_img_attn_qkv' both target");
  EXPECT_HAS(msg, "'double_blocks.0.img_attn.qkv' rows [0, 96)");
}

TEST_F(LoraFormats, PeftMetadataRankMustMatchTheTensors) {
  const Tensors peft = read_all(lora_path("tiny", "b_peft"));
  const std::string msg =
      parse_error(peft, {{"lora_adapter_metadata", R"({"transformer.r": 16, "transformer.lora_alpha": 4})"}});
  EXPECT_HAS(msg, "'transformer.single_transformer_blocks.0.attn.to_k.lora_A.weight' has rank 8");
  EXPECT_HAS(msg, "declares r = 16");
  const std::string bad_json = parse_error(peft, {{"lora_adapter_metadata", "{oops"}});
  EXPECT_HAS(bad_json, "metadata 'lora_adapter_metadata' is not valid JSON");
}

TEST_F(LoraFormats, PeftDoraIsNotSupportedYet) {
  Tensors peft = read_all(lora_path("tiny", "b_peft"));
  peft.emplace_back("transformer.transformer_blocks.0.attn.to_k.lora_magnitude_vector",
                    Tensor::zeros(DType::F32, {32}));
  const std::string msg = parse_error(peft);
  EXPECT_HAS(msg, "'transformer.transformer_blocks.0.attn.to_k.lora_magnitude_vector': DoRA");
}

TEST_F(LoraFormats, NoLoraTensorsAtAll) {
  const std::string base = test::fixtures_dir() + "/tiny/transformer_bfl.safetensors";
  const std::string msg = error_of([&] { load_lora_adapter(base, config); });
  EXPECT_HAS(msg, base + ": no LoRA tensors");
}

TEST_F(LoraFormats, T5OnlyFileParsesWithEveryKeyReportedAsIgnored) {
  const Tensors te = {
      {"lora_te3_encoder_block_0_layer_0_SelfAttention_q.lora_down.weight", Tensor::zeros(DType::F32, {4, 24})},
      {"lora_te3_encoder_block_0_layer_0_SelfAttention_q.lora_up.weight", Tensor::zeros(DType::F32, {24, 4})},
      {"text_encoders.t5xxl.transformer.encoder.block.0.layer.0.SelfAttention.q.lora_up.weight",
       Tensor::zeros(DType::F32, {24, 4})},
  };
  write_safetensors(path(), te);
  const LoraAdapter a = load_lora_adapter(path(), config);
  EXPECT_TRUE(a.pairs.empty());
  EXPECT_TRUE(a.clip_pairs.empty());
  EXPECT_EQ(a.tensors_used + a.clip_tensors_used, 0u);
  ASSERT_EQ(a.ignored_keys.size(), 3u);
  EXPECT_EQ(a.ignored_keys[0], te[0].first);  // sorted
}

}  // namespace
}  // namespace fluxswap
