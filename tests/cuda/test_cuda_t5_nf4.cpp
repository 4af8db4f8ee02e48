// NF4 T5 on the GPU: Backend::dequantize_nf4 gives the CPU reference's values rounded to bf16 bit for bit, the tiny
// NF4 T5 matches its CPU reference within bf16 tolerance (and survives an offload round trip unchanged), and a
// FLUX-sized random T5-XXL keeps the direction of its embeddings in NF4 (the cosine is printed).
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <random>

#include "cuda_test_util.h"
#include "model/component_weights.h"
#include "model/random_component_weights.h"
#include "model/t5_encoder.h"
#include "quant/nf4.h"

namespace fluxswap {
namespace {

std::string fixtures() {
  if (const char* env = std::getenv("FLUXSWAP_FIXTURES")) return env;
  return FLUXSWAP_FIXTURES;
}

double cosine(const Tensor& a, const Tensor& b) {
  double dot = 0, na = 0, nb = 0;
  for (int64_t i = 0; i < a.numel(); ++i) {
    const double x = a.ptr<float>()[i], y = b.ptr<float>()[i];
    dot += x * y, na += x * x, nb += y * y;
  }
  return dot / std::sqrt(na * nb);
}

Tensor encode(T5Encoder& t5, Backend& be, int64_t batch, int64_t len, int64_t vocab) {
  Tensor ids = Tensor::empty(DType::I32, {batch, len});
  for (int64_t i = 0; i < ids.numel(); ++i) ids.ptr<int32_t>()[i] = int32_t((i * 131 + 7) % vocab);
  const Tensor ids_dev = be.empty(DType::I32, ids.shape());
  be.copy_from_host(ids, ids_dev);
  const Tensor out = be.empty(be.compute_dtype(), {batch, len, t5.config().d_model});
  t5.encode(ids_dev, out);
  return be.to_host_f32(out);
}

TEST(CudaNf4, DequantisationIsTheReferenceInBf16) {
  FLUXSWAP_CUDA_BACKEND(gpu);
  for (auto [rows, cols] : {std::pair<int64_t, int64_t>{64, 256}, {7, 45}, {300, 1000}}) {
    std::mt19937 rng(unsigned(rows * cols));
    std::normal_distribution<float> d(0.0f, 0.05f);
    std::vector<float> x(size_t(rows * cols));
    for (float& v : x) v = d(rng);
    const Nf4Tensor q = quantize_nf4(x.data(), rows * cols, 64);
    const Tensor packed = gpu->empty(DType::U8, q.packed.shape()), absmax = gpu->empty(DType::F32, q.absmax.shape());
    gpu->copy_from_host(q.packed, packed);
    gpu->copy_from_host(q.absmax, absmax);
    const Tensor out = gpu->empty(DType::BF16, {rows, cols});
    gpu->dequantize_nf4(packed, absmax, 64, out);
    const Tensor got = gpu->to_host_f32(out);
    const Tensor want = dequantize_nf4_tensor(q, DType::BF16).to_f32();
    EXPECT_EQ(std::memcmp(got.data(), want.data(), got.nbytes()), 0) << rows << " x " << cols;
  }
}

TEST(CudaNf4, TinyT5MatchesTheCpuReference) {
  FLUXSWAP_CUDA_BACKEND(gpu);
  const std::string dir = fixtures() + "/tiny/pipeline/text_encoder_2";
  if (!std::filesystem::exists(dir + "/config.json")) GTEST_SKIP() << "no fixtures at " << dir;
  auto cpu = make_cpu_backend();
  T5Encoder on_gpu = T5Encoder::from_folder(dir, *gpu, /*nf4=*/true);
  T5Encoder on_cpu = T5Encoder::from_folder(dir, *cpu, /*nf4=*/true);
  const Tensor got = encode(on_gpu, *gpu, 2, 24, 1100);
  EXPECT_LE(max_rel_error(got, encode(on_cpu, *cpu, 2, 24, 1100)), 2e-2);
  on_gpu.offload();
  on_gpu.onload();
  const Tensor again = encode(on_gpu, *gpu, 2, 24, 1100);
  EXPECT_EQ(std::memcmp(again.data(), got.data(), got.nbytes()), 0);
}

TEST(CudaNf4, FluxSizedT5KeepsItsEmbeddings) {
  FLUXSWAP_CUDA_BACKEND(gpu);
  const T5EncoderConfig c = T5EncoderConfig::flux1();
  T5Encoder t5(c, random_t5_encoder_weights(c, *gpu, 7), *gpu);
  const Tensor full = encode(t5, *gpu, 1, 512, c.vocab_size);
  const uint64_t bf16_bytes = t5.weight_bytes();
  t5.quantize_nf4();
  const Tensor nf4 = encode(t5, *gpu, 1, 512, c.vocab_size);
  const double cos = cosine(nf4, full);
  std::printf("[ nf4      ] random T5-XXL, 512 tokens: %.2f GB -> %.2f GB, cosine %.5f against bf16, max rel error "
              "%.3g\n",
              double(bf16_bytes) / 1e9, double(t5.weight_bytes()) / 1e9, cos, max_rel_error(nf4, full));
  EXPECT_GT(cos, 0.9);
  EXPECT_LT(double(t5.weight_bytes()), 0.32 * double(bf16_bytes));
}

}  // namespace
}  // namespace fluxswap
