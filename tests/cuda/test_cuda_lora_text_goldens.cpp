// The LoRA controller and the text encoders on the CUDA backend against the reference outputs of the fixtures:
// the tiny transformer with lora_a_peft merged and at runtime (max|a-b|/max|b| <= 2e-2, as the base golden), a
// swap a -> b -> a replayed through one recorded graph (bit-identical to the first a), and the tiny pipelines'
// CLIP pooled and T5 prompt embeddings (<= 2e-2: bf16 weights and activations through every layer).
#include <cstring>
#include <random>
#include <tuple>

#include "../test_support.h"
#include "cuda_test_util.h"
#include "gpu_fixture_model.h"
#include "io/safetensors.h"
#include "lora/clip_lora.h"
#include "lora/lora_controller.h"
#include "model/clip_text_model.h"
#include "model/flux_transformer_io.h"
#include "model/t5_encoder.h"
#include "text/clip_tokenizer.h"
#include "text/t5_tokenizer.h"

namespace fluxswap::test {
namespace {

constexpr double kTolerance = 2e-2;

const char* mode_name(LoraMode m) { return m == LoraMode::Merged ? "merged" : "runtime"; }

TEST(CudaLoraGolden, MergedAndRuntimeMatchTheReference) {
  FLUXSWAP_REQUIRE_FIXTURES();
  FLUXSWAP_CUDA_BACKEND(gpu);
  for (LoraMode mode : {LoraMode::Merged, LoraMode::Runtime}) {
    GpuModel m(*gpu);
    LoraController lora(m.transformer, mode);
    lora.set_adapters({{m.lora("a_peft"), 1.0f}});
    m.forward();
    const double err = max_rel_error(m.result(), m.goldens->tensor("out.lora_a_scale1"));
    EXPECT_LE(err, kTolerance) << mode_name(mode);
    std::printf("[ golden   ] tiny + lora_a_peft, %s: max rel error %.3g\n", mode_name(mode), err);
    lora.clear();
    m.forward();
    EXPECT_LE(max_rel_error(m.result(), m.goldens->tensor("out.base")), kTolerance) << mode_name(mode) << " cleared";
  }
}

// A swap rewrites weights (merged) or slot contents (runtime) in place, so one recording serves every adapter.
TEST(CudaLoraGolden, SwapReplayedThroughARecordingIsBitIdentical) {
  FLUXSWAP_REQUIRE_FIXTURES();
  FLUXSWAP_CUDA_BACKEND(gpu);
  for (LoraMode mode : {LoraMode::Runtime, LoraMode::Merged}) {
    GpuModel m(*gpu);
    LoraController lora(m.transformer, mode);
    auto a = m.lora("a_peft"), b = m.lora("b_peft");
    lora.set_adapters({{a, 1.0f}});
    m.forward();  // eager: makes every plan the recording needs
    const Tensor eager_a = m.result();
    auto step = gpu->record([&] { m.forward(); });
    const Tensor first_a = m.result();
    EXPECT_EQ(std::memcmp(first_a.data(), eager_a.data(), first_a.nbytes()), 0) << mode_name(mode) << ": recording";
    lora.set_adapters({{b, 1.0f}});
    step->replay();
    const Tensor with_b = m.result();
    EXPECT_GT(max_rel_error(with_b, first_a), 1e-3) << mode_name(mode) << ": b changed nothing";
    EXPECT_LE(max_rel_error(with_b, m.goldens->tensor("out.lora_b_scale1")), kTolerance) << mode_name(mode);
    lora.set_adapters({{a, 1.0f}});
    step->replay();
    const Tensor again_a = m.result();
    EXPECT_EQ(std::memcmp(again_a.data(), first_a.data(), first_a.nbytes()), 0) << mode_name(mode) << ": a -> b -> a";
  }
}

// ---- Text encoders ----

std::string pipeline_dir(const std::string& model) { return fixtures_dir() + "/" + model + "/pipeline"; }

std::shared_ptr<SafetensorsFile> pipeline_goldens(const std::string& model) {
  return SafetensorsFile::open(fixtures_dir() + "/" + model + "/pipeline_goldens.safetensors");
}

// Token ids [1, n] uploaded as int32, as the pipeline feeds the encoders.
Tensor upload_ids(Backend& be, const std::vector<int32_t>& ids) {
  Tensor host = Tensor::empty(DType::I32, {1, int64_t(ids.size())});
  std::memcpy(host.data(), ids.data(), ids.size() * sizeof(int32_t));
  Tensor dev = be.empty(DType::I32, host.shape());
  be.copy_from_host(host, dev);
  return dev;
}

const char* const kPipelines[] = {"tiny", "tiny_schnell"};

TEST(CudaTextGolden, ClipPooledMatchesPipelineGoldens) {
  FLUXSWAP_REQUIRE_FIXTURES();
  FLUXSWAP_CUDA_BACKEND(gpu);
  for (const std::string model : kPipelines) {
    auto goldens = pipeline_goldens(model);
    ClipTextModel clip = ClipTextModel::from_folder(pipeline_dir(model) + "/text_encoder", *gpu);
    const ClipTokenizer tok = ClipTokenizer::from_folder(pipeline_dir(model) + "/tokenizer");
    const TokenEncoding enc = tok.encode(goldens->metadata().at("prompt0"), ClipTokenizer::kMaxLength);
    Tensor pooled = gpu->empty(DType::BF16, {1, clip.config().hidden_size});
    clip.encode(upload_ids(*gpu, enc.ids), {int64_t(enc.eos_index)}, pooled);
    const double err = max_rel_error(gpu->to_host_f32(pooled), goldens->tensor("pooled_prompt_embeds"));
    EXPECT_LE(err, kTolerance) << model;
    std::printf("[ golden   ] %s CLIP pooled: max rel error %.3g\n", model.c_str(), err);
  }
}

// CLIP with LoRA branches (lora_linear beside the fused qkv, out_proj and fc2, QuickGELU after fc1's sum) against
// the CPU reference with the same adapter: <= 2e-2, while the LoRA moves the pooled output by far more than that.
TEST(CudaTextGolden, ClipWithLoraMatchesTheCpuReference) {
  FLUXSWAP_REQUIRE_FIXTURES();
  FLUXSWAP_CUDA_BACKEND(gpu);
  auto cpu = make_cpu_backend();
  const std::string dir = pipeline_dir("tiny");
  TempDir tmp;
  std::mt19937 rng(11);
  std::vector<std::pair<std::string, Tensor>> file;
  for (const auto& [stem, out, in] : {std::tuple{"layers_0_self_attn_k_proj", 24, 24}, {"layers_1_mlp_fc1", 37, 24},
                                      {"layers_0_mlp_fc2", 24, 37}, {"layers_1_self_attn_out_proj", 24, 24}}) {
    Tensor down = Tensor::empty(DType::F32, {4, in}), up = Tensor::empty(DType::F32, {out, 4});
    fill_normal(down, rng, 0.5f);
    fill_normal(up, rng, 0.2f);
    const std::string key = std::string("lora_te1_text_model_encoder_") + stem;
    file.emplace_back(key + ".lora_down.weight", down);
    file.emplace_back(key + ".lora_up.weight", up);
  }
  write_safetensors(tmp / "clip.safetensors", file);
  auto adapter = std::make_shared<const LoraAdapter>(load_lora_adapter(
      tmp / "clip.safetensors", FluxConfig::from_json_file(fixtures_dir() + "/tiny/config.json")));
  const ClipTokenizer tok = ClipTokenizer::from_folder(dir + "/tokenizer");
  const TokenEncoding enc = tok.encode("a lighthouse at dusk, oil painting", ClipTokenizer::kMaxLength);
  auto pooled = [&](Backend& be, bool with_lora) {
    ClipTextModel clip = ClipTextModel::from_folder(dir + "/text_encoder", be);
    if (with_lora) clip.set_lora(prepare_clip_loras({{adapter, 0.8f}}, clip).linears);
    Tensor out = be.empty(be.compute_dtype(), {1, clip.config().hidden_size});
    clip.encode(upload_ids(be, enc.ids), {int64_t(enc.eos_index)}, out);
    return be.to_host_f32(out);
  };
  const Tensor ref = pooled(*cpu, true), got = pooled(*gpu, true), base = pooled(*gpu, false);
  const double err = max_rel_error(got, ref), effect = max_rel_error(base, ref);
  EXPECT_LE(err, kTolerance);
  EXPECT_GT(effect, 10 * kTolerance) << "the LoRA hardly changes the output: the comparison proves little";
  std::printf("[ golden   ] tiny CLIP + 4 LoRAs: max rel error %.3g vs the CPU (the LoRA's effect: %.3g)\n", err,
              effect);
}

TEST(CudaTextGolden, T5EmbedsMatchPipelineGoldens) {
  FLUXSWAP_REQUIRE_FIXTURES();
  FLUXSWAP_CUDA_BACKEND(gpu);
  for (const std::string model : kPipelines) {
    auto goldens = pipeline_goldens(model);
    T5Encoder t5 = T5Encoder::from_folder(pipeline_dir(model) + "/text_encoder_2", *gpu);
    const T5Tokenizer tok = T5Tokenizer::from_folder(pipeline_dir(model) + "/tokenizer_2");
    const size_t len = std::stoul(goldens->metadata().at("max_sequence_length"));
    const TokenEncoding enc = tok.encode(goldens->metadata().at("prompt0"), len);
    Tensor embeds = gpu->empty(DType::BF16, {1, int64_t(len), t5.config().d_model});
    t5.encode(upload_ids(*gpu, enc.ids), embeds);
    const double err = max_rel_error(gpu->to_host_f32(embeds), goldens->tensor("prompt_embeds"));
    EXPECT_LE(err, kTolerance) << model;
    std::printf("[ golden   ] %s T5 embeds: max rel error %.3g\n", model.c_str(), err);
  }
}

}  // namespace
}  // namespace fluxswap::test
