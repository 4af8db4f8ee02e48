// bf16 GEMMs whose algorithm is timed among cuBLASLt's first candidates (cublaslt_autotune.h) against the same
// GEMMs on the heuristic's first answer (skipped without a GPU): the timing writes a scratch output, so the first
// product is right, and an accumulating product (D += ...) adds its term exactly once.
//
// Tolerance: per output row, max|tuned - plain| / max|plain| <= 1e-2 (another algorithm may split K differently: a
// few bf16 roundings apart, 2^-9 relative each); an accumulation run twice would be off by ~100%.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <memory>
#include <vector>

#include "backend/cuda/cublaslt_linear.h"
#include "backend/cuda/cuda_check.h"
#include "backend/cuda/device_memory.h"
#include "core/counter_rng.h"
#include "core/dtype.h"

namespace fluxswap::test {
namespace {

using cuda::check;

std::vector<uint16_t> random_bf16(size_t n, uint64_t seed, float scale) {
  std::vector<uint16_t> h(n);
  for (size_t i = 0; i < n; ++i) h[i] = f32_to_bf16(normal_from_counter(seed, i) * scale);
  return h;
}

// Worst row of max|a - b| / max|b| over rows [T, N].
double worst_row_error(const std::vector<uint16_t>& a, const std::vector<uint16_t>& b, int64_t T, int64_t N) {
  double worst = 0;
  for (int64_t t = 0; t < T; ++t) {
    double row_max = 0, row_err = 0;
    for (int64_t o = 0; o < N; ++o) {
      const double x = bf16_to_f32(a[size_t(t * N + o)]), y = bf16_to_f32(b[size_t(t * N + o)]);
      row_max = std::max(row_max, std::fabs(y));
      row_err = std::max(row_err, std::isfinite(x) ? std::fabs(x - y) : INFINITY);
    }
    worst = std::max(worst, row_max > 0 ? row_err / row_max : row_err);
  }
  return worst;
}

TEST(GemmAutotune, TunedLinearMatchesTheHeuristicsOwnIncludingAccumulation) {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess || count == 0) {
    cudaGetLastError();
    GTEST_SKIP() << "no CUDA device";
  }
  check(cudaSetDevice(0), "test", "cudaSetDevice");
  cuda::DeviceMemory memory(0);
  cudaStream_t stream = nullptr;
  check(cudaStreamCreate(&stream), "test", "cudaStreamCreate");
  cuda::CublasLtLinear plain(memory), tuned(memory, 8);

  struct Case {
    int64_t T, K, N;
    cuda::GemmEpilogue epilogue;
    bool accumulate;
  };
  uint64_t seed = 7;
  for (const Case& c : {Case{333, 3072, 9216, cuda::GemmEpilogue::Bias, false},
                        Case{4608, 3072, 3072, cuda::GemmEpilogue::None, true},
                        Case{512, 12288, 3072, cuda::GemmEpilogue::GeluBias, false},
                        Case{7, 64, 48, cuda::GemmEpilogue::None, true}}) {
    const bool bias_on = c.epilogue == cuda::GemmEpilogue::Bias || c.epilogue == cuda::GemmEpilogue::GeluBias;
    const auto x_h = random_bf16(size_t(c.T * c.K), ++seed, 1.0f);
    const auto w_h = random_bf16(size_t(c.N * c.K), ++seed, 0.02f);
    const auto b_h = random_bf16(size_t(c.N), ++seed, 0.5f);
    const auto y0_h = random_bf16(size_t(c.T * c.N), ++seed, 1.0f);  // what an accumulation adds onto
    auto up = [&](const std::vector<uint16_t>& h) {
      std::shared_ptr<void> d = memory.allocate(h.size() * 2, "test");
      check(cudaMemcpy(d.get(), h.data(), h.size() * 2, cudaMemcpyHostToDevice), "test", "cudaMemcpy");
      return d;
    };
    const auto x = up(x_h), w = up(w_h), b = up(b_h);
    std::vector<std::vector<uint16_t>> outs;
    for (cuda::CublasLtLinear* lin : {&plain, &tuned}) {
      const auto y = up(y0_h);
      lin->run({x.get(), 1, c.T, c.T * c.K, c.K}, w.get(), bias_on ? b.get() : nullptr,
               {y.get(), 1, c.T, c.T * c.N, c.N}, c.K, c.N, c.epilogue, false, stream, c.accumulate);
      check(cudaStreamSynchronize(stream), "test", "cudaStreamSynchronize");
      outs.emplace_back(size_t(c.T * c.N));
      check(cudaMemcpy(outs.back().data(), y.get(), outs.back().size() * 2, cudaMemcpyDeviceToHost), "test",
            "cudaMemcpy");
    }
    const double err = worst_row_error(outs[1], outs[0], c.T, c.N);
    std::printf("[ autotune ] T %5lld K %5lld N %5lld%s: tuned vs heuristic, worst row %.2e\n", (long long)c.T,
                (long long)c.K, (long long)c.N, c.accumulate ? " (accumulating)" : "", err);
    EXPECT_LE(err, 1e-2) << "T " << c.T << " K " << c.K << " N " << c.N;
    // The accumulation really happened (the output is not just the product): y0 is of the product's size.
    if (c.accumulate) EXPECT_GT(worst_row_error(outs[0], y0_h, c.T, c.N), 0.1);
  }
  cudaStreamDestroy(stream);
}

}  // namespace
}  // namespace fluxswap::test
