// NF4 T5 on the GPU: Backend::dequantize_nf4 gives the CPU reference's values rounded to bf16 bit for bit, the tiny
// NF4 T5 matches its CPU reference within bf16 tolerance (and survives an offload round trip unchanged). The
// FLUX-sized NF4 vs bf16 cosine is reported by `bench --e2e --t5 nf4`, not asserted: on random weights 24 layers
// amplify the quantisation error until the embeddings decorrelate (0.27 measured), which says nothing of real ones.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <random>

#include "../test_support.h"
#include "cuda_test_util.h"
#include "model/component_weights.h"
#include "model/t5_encoder.h"
#include "quant/nf4.h"

namespace fluxswap {
namespace {

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
  const std::string dir = test::fixtures_dir() + "/tiny/pipeline/text_encoder_2";
  if (!std::filesystem::exists(dir + "/config.json")) GTEST_SKIP() << "no fixtures at " << dir;
  auto cpu = make_cpu_backend();
  T5Encoder on_gpu = T5Encoder::from_folder(dir, *gpu, /*nf4=*/true);
  T5Encoder on_cpu = T5Encoder::from_folder(dir, *cpu, /*nf4=*/true);
  const Tensor got = encode(on_gpu, *gpu, 2, 24, 1100);
  // bf16 activations on the GPU against float32 on the CPU through every layer, on the same NF4 weights: measured
  // 0.022.
  EXPECT_LE(max_rel_error(got, encode(on_cpu, *cpu, 2, 24, 1100)), 3e-2);
  on_gpu.offload();
  on_gpu.onload();
  const Tensor again = encode(on_gpu, *gpu, 2, 24, 1100);
  EXPECT_EQ(std::memcmp(again.data(), got.data(), got.nbytes()), 0);
}

}  // namespace
}  // namespace fluxswap
