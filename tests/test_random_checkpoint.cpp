// Random checkpoints written in place (make-random-model): the streaming safetensors writer, sharding with its
// index, values that follow the seed and not the thread count, and component layouts that match the files the
// reference libraries wrote for the tiny fixture pipeline.
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <set>

#include "io/safetensors.h"
#include "io/safetensors_stream_writer.h"
#include "model/random_pipeline_files.h"
#include "quant/fp8.h"
#include "test_support.h"

namespace fluxswap {
namespace {

namespace fsys = std::filesystem;
using test::error_of;

std::string file_bytes(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(f), {});
}

std::vector<RandomTensor> sample_tensors() {
  return {
      {"big", {2100, 2000}, DType::BF16, 0.5f, 2.0f},  // more than one 4M-element chunk
      {"f32", {300, 7}, DType::F32, -1.0f, 0.25f},
      {"fp8", {64, 33}, DType::F8_E4M3, 0.0f, 0.1f, 0.1f * 7.0f / 448.0f},
      {"scale", {}, DType::F32, 0.125f, 0.0f},
      {"marker", {0}, DType::F8_E4M3, 0.0f, 0.0f},
  };
}

void mean_std(const Tensor& t, double& mean, double& std) {
  const Tensor f = t.to_f32();
  double s = 0, s2 = 0;
  for (int64_t i = 0; i < f.numel(); ++i) {
    s += f.ptr<float>()[i];
    s2 += double(f.ptr<float>()[i]) * f.ptr<float>()[i];
  }
  mean = s / double(f.numel());
  std = std::sqrt(s2 / double(f.numel()) - mean * mean);
}

TEST(RandomCheckpoint, ShardsLoadAndValuesFollowTheSeedNotTheThreads) {
  test::TempDir tmp;
  std::vector<std::vector<RandomCheckpointFile>> runs;
  for (const auto& [dir, seed, threads] : {std::tuple{"a", 7, 1u}, {"b", 7, 3u}, {"c", 8, 2u}}) {
    fsys::create_directories(tmp / dir);
    // 4 MB shards: "big" (8.4 MB) alone in one, the small ones together in the next.
    runs.push_back(plan_random_checkpoint(tmp / dir, "model", sample_tensors(), 4'000'000));
    RandomWriteOptions o;
    o.seed = uint64_t(seed);
    o.threads = threads;
    write_random_checkpoints(runs.back(), o);
  }
  ASSERT_EQ(runs[0].size(), 2u);
  EXPECT_EQ(fsys::path(runs[0][0].path).filename(), "model-00001-of-00002.safetensors");
  for (size_t f = 0; f < runs[0].size(); ++f) {
    EXPECT_EQ(file_bytes(runs[0][f].path), file_bytes(runs[1][f].path)) << "thread count changed the values";
    EXPECT_NE(file_bytes(runs[0][f].path), file_bytes(runs[2][f].path)) << "the seed changed nothing";
  }
  EXPECT_FALSE(fsys::exists(runs[0][0].path + ".tmp"));

  const SafetensorsCollection c = SafetensorsCollection::open(tmp / "a/model.safetensors.index.json");
  EXPECT_EQ(c.keys(), (std::vector<std::string>{"big", "f32", "fp8", "marker", "scale"}));
  double mean, std;
  mean_std(c.tensor("big"), mean, std);
  EXPECT_NEAR(mean, 0.5, 0.01);
  EXPECT_NEAR(std, 2.0, 0.01);
  mean_std(c.tensor("f32"), mean, std);
  EXPECT_NEAR(mean, -1.0, 0.03);
  EXPECT_NEAR(std, 0.25, 0.03);
  EXPECT_EQ(c.tensor("scale").to_f32().ptr<float>()[0], 0.125f);
  EXPECT_EQ(c.entry("marker").shape, Shape{0});
  // e4m3 codes of value / scale: dequantised, the values again, to e4m3's precision.
  const Tensor q = c.tensor("fp8");
  std::vector<float> dq(size_t(q.numel()));
  const float scale = 0.1f * 7.0f / 448.0f;
  for (size_t i = 0; i < dq.size(); ++i) dq[i] = quant::e4m3_to_f32(q.ptr<uint8_t>()[i]) * scale;
  mean_std(Tensor::borrow(dq.data(), DType::F32, q.shape(), Device::CPU, nullptr), mean, std);
  EXPECT_NEAR(mean, 0.0, 0.01);
  EXPECT_NEAR(std, 0.1, 0.01);
}

TEST(SafetensorsStreamWriter, IncompleteOrOutOfRangeWritesAreErrorsAndLeaveNoFile) {
  test::TempDir tmp;
  const std::string path = tmp / "x.safetensors";
  {
    SafetensorsStreamWriter w(path, {{"a", DType::F32, {4}}, {"b", DType::BF16, {3}}});
    const float a[4] = {1, 2, 3, 4};
    w.write(0, 0, a, sizeof a);
    EXPECT_NE(error_of([&] { w.write(1, 4, a, 4); }).find("outside tensor #1"), std::string::npos);
    const std::string msg = error_of([&] { w.finish(); });
    EXPECT_NE(msg.find("tensor 'b' got 0 of its 6 bytes"), std::string::npos) << msg;
  }
  EXPECT_FALSE(fsys::exists(path));
  EXPECT_FALSE(fsys::exists(path + ".tmp"));
  EXPECT_NE(error_of([&] { SafetensorsStreamWriter(path, {{"a", DType::F32, {1}}, {"a", DType::F32, {1}}}); })
                .find("given twice"),
            std::string::npos);
}

// Names and shapes as transformers/diffusers wrote the fixture's tiny pipeline (configs made to match it).
std::map<std::string, Shape> layout(const std::vector<RandomTensor>& tensors) {
  std::map<std::string, Shape> m;
  for (const auto& t : tensors) m[t.name] = t.shape;
  return m;
}
std::map<std::string, Shape> layout(const std::string& path, const std::string& prefix = "",
                                    const std::string& only = "") {
  auto f = SafetensorsFile::open(path);
  std::map<std::string, Shape> m;
  for (const auto& k : f->keys())
    if (k.rfind(only, 0) == 0) m[prefix + k] = f->find(k)->shape;
  return m;
}

TEST(RandomPipelineFiles, TinyLayoutsMatchTheReferenceFiles) {
  FLUXSWAP_REQUIRE_FIXTURES();
  const std::string p = test::fixtures_dir() + "/tiny/pipeline/";
  const FluxConfig flux = FluxConfig::from_json_file(p + "transformer/config.json");
  EXPECT_EQ(layout(flux_transformer_random_tensors(flux, FluxNaming::Diffusers, false)),
            layout(p + "transformer/diffusion_pytorch_model.safetensors"));
  // (This transformers version writes CLIP without the `text_model.` prefix that FLUX.1's own file has.)
  const ClipTextConfig clip = ClipTextConfig::from_json_file(p + "text_encoder/config.json");
  EXPECT_EQ(layout(clip_text_random_tensors(clip)), layout(p + "text_encoder/model.safetensors", "text_model."));
  const T5EncoderConfig t5 = T5EncoderConfig::from_json_file(p + "text_encoder_2/config.json");
  EXPECT_EQ(layout(t5_encoder_random_tensors(t5)), layout(p + "text_encoder_2/model.safetensors"));
  const VaeConfig vae = VaeConfig::from_json_file(p + "vae/config.json");
  EXPECT_EQ(layout(vae_decoder_random_tensors(vae)), layout(p + "vae/diffusion_pytorch_model.safetensors", "", "decoder."));

  // The FP8 single file: BFL names, each linear weight with its scale, and ComfyUI's marker.
  std::map<std::string, Shape> bfl = layout(test::fixtures_dir() + "/tiny/transformer_bfl.safetensors");
  for (const auto& [k, s] : std::map<std::string, Shape>(bfl))
    if (s.size() == 2) bfl[k.substr(0, k.size() - 7) + ".scale_weight"] = {};
  bfl["scaled_fp8"] = {0};
  EXPECT_EQ(layout(flux_transformer_random_tensors(flux, FluxNaming::BFL, true)), bfl);
}

}  // namespace
}  // namespace fluxswap
