// Single-file checkpoints with FP8 linears (ComfyUI "scaled fp8" and plain float8_e4m3fn files): they load as an
// FP8-only model that computes exactly what the CPU FP8 reference computes on the same quantised weights.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <set>

#include "core/compare.h"
#include "lora/lora_controller.h"
#include "model/flux_transformer_io.h"
#include "fp8_checkpoint_writer.h"
#include "quant/fp8.h"
#include "test_support.h"

namespace fluxswap {
namespace {

namespace fsys = std::filesystem;
using test::error_of;
using test::Fp8File;
using test::kOtherFp8Linears;
using test::Quantised;
using test::quantise;
using test::write_fp8_checkpoint;

// The file's per-tensor-scaled weights in FP8 mode (e4m3 activations too, and whatever else the mode quantises)
// against the float32 reference on the bf16 weights: measured cosine 0.99888 (plain e4m3) and 0.99907 (scaled) on
// the tiny fixture, 0.99901 / 0.99871 with LoRA a. The FP8 reference itself must match far tighter (below).
constexpr double kMinGoldenCosine = 0.998;

// The fixture model on the CPU reference backend with the same quantised weights, set by hand: the other FP8
// linears hold their dequantised values, FP8 mode is switched on (it quantises whatever it covers beyond the block
// linears from those), then the block linears take the file's codes and per-tensor scales.
std::unique_ptr<FluxTransformer> reference_model(const Fp8File& file, Backend& cpu) {
  FluxCheckpoint ck = open_flux_checkpoint(test::fixtures_dir() + "/tiny/transformer_bfl.safetensors");
  auto tr = std::make_unique<FluxTransformer>(ck.config, load_flux_weights(ck, cpu), cpu);
  for (const auto& module : kOtherFp8Linears) {
    const Quantised& q = file.modules.at(module);
    const int64_t rows = q.codes.size(0), cols = q.codes.size(1);
    const std::vector<float> scales(size_t(rows), q.scale);
    quant::dequantize_rows_e4m3(q.codes.ptr<uint8_t>(), cols, scales.data(), rows, cols,
                                tr->weights().linear(module).weight.ptr<float>(), cols);
  }
  tr->set_fp8(true);
  for (const auto& module : block_token_linear_names(ck.config)) {
    const Quantised& q = file.modules.at(module);
    Linear& l = tr->weights().linear(module);
    l.weight_fp8 = q.codes;
    l.weight_scale = Tensor::empty(DType::F32, {q.codes.size(0)});
    std::fill(l.weight_scale.ptr<float>(), l.weight_scale.ptr<float>() + q.codes.size(0), q.scale);
  }
  return tr;
}

struct Loaded {
  std::unique_ptr<Backend> cpu = make_cpu_backend();
  FluxCheckpoint checkpoint;
  WeightLoadReport report;
  std::unique_ptr<FluxTransformer> transformer;
  explicit Loaded(const std::string& path) : checkpoint(open_flux_checkpoint(path)) {
    transformer = std::make_unique<FluxTransformer>(checkpoint.config, load_flux_weights(checkpoint, *cpu, &report), *cpu);
  }
};

class Fp8Checkpoint : public ::testing::TestWithParam<bool> {};  // scaled (ComfyUI) or plain e4m3

TEST_P(Fp8Checkpoint, LoadsFp8OnlyAndMatchesTheFp8Reference) {
  FLUXSWAP_REQUIRE_FIXTURES();
  const bool scaled = GetParam();
  test::TempDir tmp;
  const Fp8File file = write_fp8_checkpoint(tmp.path().string(), scaled, scaled ? "model.diffusion_model." : "");
  Loaded m(file.path);
  EXPECT_TRUE(m.checkpoint.fp8_linears);
  EXPECT_EQ(m.checkpoint.prefix, scaled ? "model.diffusion_model." : "");
  EXPECT_TRUE(m.report.unused_keys.empty()) << m.report.unused_keys.front();

  // The block linears exist only as the file's codes and its scale, once per row.
  FluxTransformer& tr = *m.transformer;
  EXPECT_TRUE(tr.fp8());
  EXPECT_TRUE(tr.weights().fp8_only);
  for (const auto& module : block_token_linear_names(tr.config())) {
    SCOPED_TRACE(module);
    const Linear& l = tr.weights().linear(module);
    const Quantised& q = file.modules.at(module);
    EXPECT_FALSE(l.weight.defined());
    ASSERT_EQ(l.weight_fp8.dtype(), DType::F8_E4M3);
    ASSERT_EQ(l.weight_fp8.shape(), q.codes.shape());
    EXPECT_EQ(std::memcmp(l.weight_fp8.data(), q.codes.data(), q.codes.nbytes()), 0);
    ASSERT_EQ(l.weight_scale.shape(), Shape{q.codes.size(0)});
    for (int64_t r = 0; r < q.codes.size(0); ++r) ASSERT_EQ(l.weight_scale.ptr<float>()[r], q.scale);
  }
  EXPECT_TRUE(tr.weights().linear("final_layer.linear").weight.defined());

  auto goldens = SafetensorsFile::open(test::fixtures_dir() + "/tiny/transformer_goldens.safetensors");
  const FluxHostInputs inputs = read_flux_inputs(*goldens);
  const Tensor out = run_flux_transformer(tr, inputs);
  auto ref_cpu = make_cpu_backend();
  auto ref = reference_model(file, *ref_cpu);
  const Tensor expected = run_flux_transformer(*ref, inputs);
  // The same operands through the same CPU ops: identical up to float summation order, which is the same too.
  EXPECT_LE(max_rel_error(out, expected), 1e-6);
  const double cos = cosine_similarity(out, goldens->tensor("out.base"));
  std::printf("%s fp8 checkpoint vs float32 reference: cosine %.6f\n", scaled ? "scaled" : "plain", cos);
  EXPECT_GE(cos, kMinGoldenCosine);

  EXPECT_NO_THROW(tr.set_fp8(true));
  const std::string msg = error_of([&] { tr.set_fp8(false); });
  EXPECT_NE(msg.find("loaded from an FP8 checkpoint"), std::string::npos) << msg;
  EXPECT_TRUE(tr.fp8());
}

TEST_P(Fp8Checkpoint, RuntimeLoraRunsAndMergedLoraNamesTheAlternative) {
  FLUXSWAP_REQUIRE_FIXTURES();
  test::TempDir tmp;
  const Fp8File file = write_fp8_checkpoint(tmp.path().string(), GetParam(), "");
  Loaded m(file.path);
  auto ref_cpu = make_cpu_backend();
  auto ref = reference_model(file, *ref_cpu);
  const std::string fx = test::fixtures_dir() + "/tiny";
  auto adapter = std::make_shared<LoraAdapter>(load_lora_adapter(fx + "/lora_a_peft.safetensors", m.checkpoint.config));
  auto goldens = SafetensorsFile::open(fx + "/transformer_goldens.safetensors");
  const FluxHostInputs inputs = read_flux_inputs(*goldens);
  const Tensor base = run_flux_transformer(*m.transformer, inputs);
  {
    LoraController lora(*m.transformer, LoraMode::Runtime), ref_lora(*ref, LoraMode::Runtime);
    lora.set_adapters({{adapter, 1.0f}});
    ref_lora.set_adapters({{adapter, 1.0f}});
    const Tensor with = run_flux_transformer(*m.transformer, inputs);
    EXPECT_LE(max_rel_error(with, run_flux_transformer(*ref, inputs)), 1e-6);
    EXPECT_GE(cosine_similarity(with, goldens->tensor("out.lora_a_scale1")), kMinGoldenCosine);
    lora.clear();
    EXPECT_EQ(max_rel_error(run_flux_transformer(*m.transformer, inputs), base), 0.0);
  }
  LoraController merged(*m.transformer, LoraMode::Merged);
  const std::string msg = error_of([&] { merged.set_adapters({{adapter, 1.0f}}); });
  EXPECT_NE(msg.find("only in FP8"), std::string::npos) << msg;
  EXPECT_NE(msg.find("--lora-mode runtime"), std::string::npos) << msg;
  EXPECT_EQ(max_rel_error(run_flux_transformer(*m.transformer, inputs), base), 0.0) << "a refused LoRA changed the model";
}

INSTANTIATE_TEST_SUITE_P(ScaledAndPlain, Fp8Checkpoint, ::testing::Bool(),
                         [](const auto& info) { return info.param ? "ScaledFp8" : "PlainE4m3"; });

// diffusers names split qkv into q, k and v, each with its own per-tensor scale: the fused weight gets each one's
// scale on its rows.
TEST(Fp8CheckpointFormats, DiffusersNamesKeepEachPartsScale) {
  FLUXSWAP_REQUIRE_FIXTURES();
  test::TempDir tmp;
  const std::string fx = test::fixtures_dir() + "/tiny";
  auto src = SafetensorsFile::open(fx + "/transformer_diffusers.safetensors");
  std::vector<std::pair<std::string, Tensor>> tensors;
  std::map<std::string, float> scales;
  for (const auto& key : src->keys()) {
    const Tensor t = src->tensor(key);
    const std::string module = key.substr(0, key.rfind('.'));
    if (t.ndim() != 2 || key != module + ".weight") {
      tensors.emplace_back(key, t);
      continue;
    }
    const Quantised q = quantise(t, true);
    scales[module] = q.scale;
    tensors.emplace_back(key, q.codes);
    Tensor s = Tensor::empty(DType::F32, {1});
    s.ptr<float>()[0] = q.scale;
    tensors.emplace_back(module + ".scale_weight", s);
  }
  write_safetensors(tmp / "t.safetensors", tensors);
  fsys::copy_file(fx + "/config.json", tmp / "config.json");
  Loaded m(tmp / "t.safetensors");
  EXPECT_TRUE(m.report.unused_keys.empty());
  const Linear& qkv = m.transformer->weights().linear("double_blocks.1.img_attn.qkv");
  const int64_t D = m.transformer->config().inner_dim();
  ASSERT_FALSE(qkv.weight.defined());
  const char* parts[] = {"to_q", "to_k", "to_v"};
  for (int p = 0; p < 3; ++p)
    for (int64_t r = p * D; r < (p + 1) * D; ++r)
      ASSERT_EQ(qkv.weight_scale.ptr<float>()[r], scales.at(std::string("transformer_blocks.1.attn.") + parts[p]));
  auto goldens = SafetensorsFile::open(fx + "/transformer_goldens.safetensors");
  const Tensor out = run_flux_transformer(*m.transformer, read_flux_inputs(*goldens));
  // Every linear in FP8 here, embedders and final projection included: measured cosine 0.99789.
  EXPECT_GE(cosine_similarity(out, goldens->tensor("out.base")), 0.996);
}

// e5m2 codes: the float16 bit pattern's top byte, rounded to nearest even.
uint8_t e5m2_from_f32(float x) {
  const uint16_t h = f32_to_f16(x);
  uint16_t code = h >> 8;
  const uint16_t rest = h & 0xff;
  if (rest > 0x80 || (rest == 0x80 && (code & 1))) ++code;
  return uint8_t(code);
}

// F8_E5M2 block linears are requantised per row to e4m3 (two mantissa bits fit in three), others dequantised.
TEST(Fp8CheckpointFormats, E5m2WeightsLoadAsFp8) {
  FLUXSWAP_REQUIRE_FIXTURES();
  test::TempDir tmp;
  const std::string fx = test::fixtures_dir() + "/tiny";
  auto src = SafetensorsFile::open(fx + "/transformer_bfl.safetensors");
  std::vector<std::pair<std::string, Tensor>> tensors;
  for (const auto& key : src->keys()) {
    const Tensor t = src->tensor(key);
    if (t.ndim() != 2) {
      tensors.emplace_back(key, t);
      continue;
    }
    const Tensor f = t.to_f32();
    Tensor codes = Tensor::empty(DType::F8_E5M2, t.shape());
    for (int64_t i = 0; i < f.numel(); ++i) codes.ptr<uint8_t>()[i] = e5m2_from_f32(f.ptr<float>()[i]);
    tensors.emplace_back(key, codes);
  }
  write_safetensors(tmp / "t.safetensors", tensors);
  fsys::copy_file(fx + "/config.json", tmp / "config.json");
  Loaded m(tmp / "t.safetensors");
  EXPECT_TRUE(m.transformer->weights().fp8_only);
  EXPECT_EQ(m.transformer->weights().linear("single_blocks.0.linear1").weight_fp8.dtype(), DType::F8_E4M3);
  auto goldens = SafetensorsFile::open(fx + "/transformer_goldens.safetensors");
  const Tensor out = run_flux_transformer(*m.transformer, read_flux_inputs(*goldens));
  // Two mantissa bits on every linear, embedders and final projection included: measured cosine 0.9940.
  EXPECT_GE(cosine_similarity(out, goldens->tensor("out.base")), 0.99);
}

TEST(Fp8CheckpointErrors, WrongShapeOfAnFp8TensorIsNamed) {
  FLUXSWAP_REQUIRE_FIXTURES();
  test::TempDir tmp;
  const Fp8File file = write_fp8_checkpoint(tmp.path().string(), true, "", [](const std::string& k, Tensor t) {
    return k == "single_blocks.0.linear2.weight" ? t.narrow(1, 0, 100) : t;
  });
  auto cpu = make_cpu_backend();
  const std::string msg = error_of([&] { load_flux_weights(open_flux_checkpoint(file.path), *cpu); });
  EXPECT_NE(msg.find("flux-fp8.safetensors: tensor 'single_blocks.0.linear2.weight' has shape [32, 100]"),
            std::string::npos)
      << msg;
  EXPECT_NE(msg.find("of 160"), std::string::npos) << msg;
}

TEST(Fp8CheckpointErrors, WrongShapeOrValueOfAScaleIsNamed) {
  FLUXSWAP_REQUIRE_FIXTURES();
  test::TempDir tmp;
  auto cpu = make_cpu_backend();
  Fp8File file = write_fp8_checkpoint(tmp.path().string(), true, "", [](const std::string& k, Tensor t) {
    return k == "double_blocks.1.txt_mlp.0.scale_weight" ? Tensor::zeros(DType::F32, {2}) : t;
  });
  std::string msg = error_of([&] { load_flux_weights(open_flux_checkpoint(file.path), *cpu); });
  EXPECT_NE(msg.find("tensor 'double_blocks.1.txt_mlp.0.scale_weight' is F32 [2], expected a float scalar or [1] "
                     "(the per-tensor scale of 'double_blocks.1.txt_mlp.0.weight')"),
            std::string::npos)
      << msg;
  file = write_fp8_checkpoint(tmp.path().string(), true, "", [](const std::string& k, Tensor t) {
    return k == "double_blocks.0.img_mod.lin.scale_weight" ? Tensor::zeros(DType::F32, {1}) : t;
  });
  msg = error_of([&] { load_flux_weights(open_flux_checkpoint(file.path), *cpu); });
  EXPECT_NE(msg.find("tensor 'double_blocks.0.img_mod.lin.scale_weight' is 0.000000, expected a finite positive "
                     "scale for 'double_blocks.0.img_mod.lin.weight'"),
            std::string::npos)
      << msg;
}

}  // namespace
}  // namespace fluxswap
