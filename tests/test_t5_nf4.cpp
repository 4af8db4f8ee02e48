// NF4 T5 (linears stored NF4 on the device, dequantised one at a time before their product) on the CPU reference:
// the parallel quantiser gives quantize_nf4's bits, the backend's dequantisation is the scalar reference, and an NF4
// T5 encodes exactly as a T5 whose weights were replaced by their dequantised values.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <random>

#include "core/error.h"
#include "model/component_weights.h"
#include "pipeline/flux_pipeline.h"
#include "quant/nf4.h"
#include "test_support.h"

namespace fluxswap {
namespace {

using test::same_bytes;
using test::error_of;

std::vector<float> normals(size_t n, unsigned seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> d(0.0f, 1.0f);
  std::vector<float> v(n);
  for (float& x : v) x = d(rng);
  return v;
}

TEST(Nf4Parallel, SameBitsAsTheSerialQuantiser) {
  for (int64_t n : {1, 63, 64, 65, 1001, 64 * 37, 64 * 37 + 7}) {
    const std::vector<float> x = normals(size_t(n), unsigned(n));
    const Nf4Tensor serial = quantize_nf4(x.data(), n, 64);
    for (unsigned threads : {1u, 3u, 8u, 0u}) {
      const Nf4Tensor par = quantize_nf4_parallel(x.data(), n, 64, threads);
      EXPECT_TRUE(same_bytes(par.packed, serial.packed)) << n << " values, " << threads << " threads";
      EXPECT_TRUE(same_bytes(par.absmax, serial.absmax)) << n << " values, " << threads << " threads";
      EXPECT_EQ(par.shape, serial.shape);
      validate_nf4(par, "parallel");
    }
  }
  std::vector<float> bad = normals(1000, 1);
  bad[900] = std::nanf("");
  EXPECT_NE(error_of([&] { quantize_nf4_parallel(bad.data(), 1000, 64, 4); }).find("not finite"), std::string::npos);
}

TEST(Nf4Backend, DequantisationIsTheScalarReference) {
  auto be = make_cpu_backend();
  const int64_t rows = 7, cols = 45;  // an odd element count: a partial last block and a pad nibble
  const std::vector<float> x = normals(size_t(rows * cols), 3);
  const Nf4Tensor q = quantize_nf4(x.data(), rows * cols, 64);
  const Tensor out = Tensor::empty(DType::F32, {rows, cols});
  be->dequantize_nf4(q.packed, q.absmax, 64, out);
  const std::vector<float> want = dequantize_nf4(q);
  EXPECT_EQ(std::memcmp(out.data(), want.data(), want.size() * sizeof(float)), 0);

  EXPECT_NE(error_of([&] { be->dequantize_nf4(q.packed, q.absmax, 48, out); }).find("blocksize 48"),
            std::string::npos);
  EXPECT_NE(error_of([&] { be->dequantize_nf4(q.packed, q.absmax, 32, out); }).find("absmax must be"),
            std::string::npos);
  EXPECT_NE(error_of([&] { be->dequantize_nf4(q.packed, q.absmax, 64, Tensor::empty(DType::F32, {rows, cols + 2})); })
                .find("packed must be"),
            std::string::npos);
}

std::string t5_dir() { return test::fixtures_dir() + "/tiny/pipeline/text_encoder_2"; }

Tensor encode(T5Encoder& t5, Backend& be) {
  Tensor ids = Tensor::empty(DType::I32, {2, 9});
  for (int64_t i = 0; i < ids.numel(); ++i) ids.ptr<int32_t>()[i] = int32_t((i * 131) % 1100);
  const Tensor out = be.empty(be.compute_dtype(), {2, 9, t5.config().d_model});
  t5.encode(ids, out);
  return be.to_host_f32(out);
}

TEST(T5Nf4, EncodesAsTheDequantisedWeightsDo) {
  FLUXSWAP_REQUIRE_FIXTURES();
  auto be = make_cpu_backend();
  T5Encoder nf4 = T5Encoder::from_folder(t5_dir(), *be, /*nf4=*/true);
  EXPECT_TRUE(nf4.nf4());
  // The reference: the full-precision weights, each linear replaced by its NF4 values.
  const T5EncoderConfig config = T5EncoderConfig::from_json_file(t5_dir() + "/config.json");
  const SafetensorsCollection file = SafetensorsCollection::open(t5_dir() + "/model.safetensors");
  T5EncoderWeights w = load_t5_encoder_weights(file, config, *be);
  for (T5LayerWeights& l : w.layers)
    for (Tensor* m : {&l.qkv, &l.o, &l.wi, &l.wo}) {
      Nf4Tensor q = quantize_nf4(*m, kNf4WeightBlocksize);
      *m = dequantize_nf4_tensor(q, DType::F32);
    }
  T5Encoder reference(config, std::move(w), *be);
  const Tensor got = encode(nf4, *be);
  EXPECT_TRUE(same_bytes(got, encode(reference, *be)));

  // Quantising a loaded full-precision encoder gives the same encoder.
  T5Encoder later = T5Encoder::from_folder(t5_dir(), *be);
  const Tensor full = encode(later, *be);
  const uint64_t full_bytes = later.weight_bytes();
  later.quantize_nf4();
  EXPECT_TRUE(later.nf4());
  EXPECT_TRUE(same_bytes(encode(later, *be), got));
  EXPECT_LT(later.weight_bytes(), full_bytes);
  // NF4 is lossy, but close (0.93 on these random 40-wide weights; FLUX's T5-XXL: bench --e2e --t5 nf4).
  double dot = 0, na = 0, nb = 0;
  for (int64_t i = 0; i < got.numel(); ++i) {
    const double a = got.ptr<float>()[i], b = full.ptr<float>()[i];
    dot += a * b, na += a * a, nb += b * b;
  }
  EXPECT_GT(dot / std::sqrt(na * nb), 0.9);

  // It leaves the device and comes back like any encoder.
  later.offload();
  later.onload();
  EXPECT_TRUE(same_bytes(encode(later, *be), got));
}

TEST(T5Nf4, PipelinePlansItAsNf4) {
  FLUXSWAP_REQUIRE_FIXTURES();
  auto be = make_cpu_backend();
  PipelineLoadOptions options;
  options.t5_nf4 = true;
  auto pipe = FluxPipeline::from_pretrained(test::fixtures_dir() + "/tiny/pipeline", *be, options);
  EXPECT_TRUE(pipe->t5().nf4());
  GenerateParams p;
  p.prompts = {"a red fox"};
  p.width = p.height = 32;
  p.steps = 2;
  const MemoryPlanRequest r = measured_plan_request({1, pipe->workload_for(p), 0}, pipe->transformer(), pipe->t5(),
                                                    pipe->clip(), pipe->vae(), be->memory_in_use());
  EXPECT_EQ(r.t5.format, WeightFormat::NF4);
  EXPECT_EQ(r.t5.weight_bytes, pipe->t5().weight_bytes());
  EXPECT_EQ(pipe->generate(p).images.size(), 1u);
}

}  // namespace
}  // namespace fluxswap
