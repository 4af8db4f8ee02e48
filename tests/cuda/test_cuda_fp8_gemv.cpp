// The FP8 linear's few-rows path (fp8_gemv: the modulation linears' conditioning vectors) against the CPU
// reference of linear_fp8 on the same bf16 values: the same e4m3 operands and scales, float32 sums in another
// order, bf16 output. Tolerance max|a-b|/max|b| <= 1e-2 (two bf16 roundings and reordered sums; measured values are
// printed). Three rows take the GEMM path: the two paths must agree on the same inputs.
#include "cuda_test_util.h"

namespace fluxswap::test {
namespace {

struct GemvCase {
  int64_t rows, K, N;
  bool bias;
};

class CudaFp8Gemv : public GpuAndCpu, public ::testing::WithParamInterface<GemvCase> {};

TEST_P(CudaFp8Gemv, MatchesTheCpuReference) {
  const auto [rows, K, N, with_bias] = GetParam();
  const Pair x = random_pair(*gpu_, {rows, K}, 21, 2.0f);
  const Pair w = random_pair(*gpu_, {N, K}, 22, 0.02f);
  const Pair bias = with_bias ? random_pair(*gpu_, {N}, 23, 0.5f) : Pair{};
  Pair wq{gpu_->empty(DType::F8_E4M3, {N, K}), cpu_->empty(DType::F8_E4M3, {N, K})};
  Pair ws{gpu_->empty(DType::F32, {N}), cpu_->empty(DType::F32, {N})};
  gpu_->quantize_fp8_rows(w.gpu, wq.gpu, ws.gpu);
  cpu_->quantize_fp8_rows(w.cpu, wq.cpu, ws.cpu);
  Pair y{gpu_->empty(DType::BF16, {rows, N}), cpu_->empty(DType::F32, {rows, N})};
  gpu_->linear_fp8(x.gpu, wq.gpu, ws.gpu, bias.gpu, y.gpu, Activation::None);
  cpu_->linear_fp8(x.cpu, wq.cpu, ws.cpu, bias.cpu, y.cpu, Activation::None);
  const Tensor got = gpu_->to_host_f32(y.gpu);
  const double err = max_rel_error(got, y.cpu);
  std::printf("[ fp8 gemv ] rows %lld K %lld N %lld%s: max rel error %.3g\n", (long long)rows, (long long)K,
              (long long)N, with_bias ? " + bias" : "", err);
  EXPECT_LE(err, 1e-2);
}

INSTANTIATE_TEST_SUITE_P(Shapes, CudaFp8Gemv,
                         ::testing::Values(GemvCase{1, 3072, 18432, true}, GemvCase{2, 3072, 9216, true},
                                           GemvCase{1, 64, 1000, false}, GemvCase{2, 48, 33, true},
                                           GemvCase{3, 3072, 6144, true}));

}  // namespace
}  // namespace fluxswap::test
