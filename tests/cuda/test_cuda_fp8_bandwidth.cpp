// Bandwidth of the FP8 path's memory-bound kernels at FLUX.1 sizes (1024x1024: 4608 tokens of 3072), printed for
// the record and checked for correctness (a fast wrong kernel must fail):
//  - the per-token quantiser on linear2's 15360-wide input (and the 3072-wide one), bit for bit against quant/fp8.h;
//  - the LayerNorm + AdaLN modulation that writes e4m3 (4608 x 3072), bit for bit against the bf16 LayerNorm
//    followed by the quantiser, whose combined time is printed beside it;
//  - the weight-streaming FP8 GEMV of a double block's modulation (18432 x 3072, one and two rows), within 1e-2 of
//    a float64 CPU product of the same e4m3 operands (max|a-b|/max|b|; float32 tensor-core sums, bf16 output);
//  - the gated residual fused into the LayerNorm that follows it (4608 x 3072; bf16 output at the transformer's
//    row stride 3072 + 64, and the e4m3 form), against gated_residual + the LayerNorm, bit for bit;
//  - all of a FLUX.1-dev step's modulation linears in one batched GEMV launch (57 items: 38 of 18432 x 3072, 19
//    double blocks x 2 streams; 38 of 9216 x 3072; one of 6144 x 3072; 3.2 GB of e4m3 weights) against 57
//    launches of the single GEMV, bit for bit, one and two rows.
// Times: cudaEvents around each launch on a stream of the test's own, median of 20 after 3 warm-ups. "cold": a
// 256 MiB memset before each timed launch evicts L2 (50 MiB on an H100), so the operands come from HBM; "warm": the
// same launches back to back (the LayerNorm's 42 MiB of traffic largely fits in L2). GB/s counts the bytes the
// kernel must move once: reads plus writes.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <functional>
#include <memory>
#include <vector>

#include "backend/cuda/cuda_check.h"
#include "backend/cuda/fp8_gemv.h"
#include "backend/cuda/fp8_quant_kernels.h"
#include "backend/cuda/kernels.h"
#include "core/dtype.h"
#include "quant/fp8.h"

namespace fluxswap::test {
namespace {

using cuda::check;

constexpr int kReps = 20, kWarmup = 3;
constexpr size_t kFlushBytes = size_t(256) << 20;

class CudaFp8Bandwidth : public ::testing::Test {
 protected:
  void SetUp() override {
    int count = 0;
    if (cudaGetDeviceCount(&count) != cudaSuccess || count == 0) {
      cudaGetLastError();
      GTEST_SKIP() << "no CUDA device";
    }
    check(cudaSetDevice(0), "test", "cudaSetDevice");
    cudaDeviceProp prop{};
    check(cudaGetDeviceProperties(&prop, 0), "test", "cudaGetDeviceProperties");
    device_ = prop.name;
    cc_ = prop.major * 10 + prop.minor;
    check(cudaStreamCreate(&stream_), "test", "cudaStreamCreate");
    check(cudaEventCreate(&start_), "test", "cudaEventCreate");
    check(cudaEventCreate(&stop_), "test", "cudaEventCreate");
    flush_ = alloc(kFlushBytes);
  }
  void TearDown() override {
    if (stream_) cudaStreamSynchronize(stream_);
    bufs_.clear();
    if (start_) cudaEventDestroy(start_);
    if (stop_) cudaEventDestroy(stop_);
    if (stream_) cudaStreamDestroy(stream_);
  }

  void* alloc(size_t bytes) {
    void* p = nullptr;
    check(cudaMalloc(&p, bytes), "test", "cudaMalloc");
    bufs_.emplace_back(p, [](void* q) { cudaFree(q); });
    return p;
  }
  template <typename T>
  T* alloc_n(size_t n) {
    return static_cast<T*>(alloc(n * sizeof(T)));
  }
  template <typename T>
  std::vector<T> download(const void* d, size_t n) {
    check(cudaStreamSynchronize(stream_), "test", "cudaStreamSynchronize");
    std::vector<T> h(n);
    check(cudaMemcpy(h.data(), d, n * sizeof(T), cudaMemcpyDeviceToHost), "test", "cudaMemcpy");
    return h;
  }
  __nv_bfloat16* random_bf16(size_t n, uint64_t seed, float std, float mean = 0.0f) {
    auto* p = alloc_n<__nv_bfloat16>(n);
    cuda::launch_fill_normal(p, true, int64_t(n), seed, mean, std, stream_);
    return p;
  }

  // Median milliseconds of `launch` over kReps timed runs, L2 flushed before each when `cold`.
  double median_ms(const std::function<void()>& launch, bool cold) {
    for (int i = 0; i < kWarmup; ++i) launch();
    std::vector<float> ms;
    for (int i = 0; i < kReps; ++i) {
      if (cold) check(cudaMemsetAsync(flush_, i & 0xff, kFlushBytes, stream_), "test", "cudaMemsetAsync");
      check(cudaEventRecord(start_, stream_), "test", "cudaEventRecord");
      launch();
      check(cudaEventRecord(stop_, stream_), "test", "cudaEventRecord");
      check(cudaEventSynchronize(stop_), "test", "cudaEventSynchronize");
      float t = 0;
      check(cudaEventElapsedTime(&t, start_, stop_), "test", "cudaEventElapsedTime");
      ms.push_back(t);
    }
    std::sort(ms.begin(), ms.end());
    return 0.5 * (double(ms[kReps / 2 - 1]) + double(ms[kReps / 2]));
  }

  void report(const char* what, double bytes, const std::function<void()>& launch) {
    const double cold = median_ms(launch, true), warm = median_ms(launch, false);
    std::printf("[ bandwidth] %-44s %8.1f MB: cold %7.1f us %6.0f GB/s, warm %7.1f us %6.0f GB/s (%s)\n", what,
                bytes * 1e-6, cold * 1e3, bytes / cold * 1e-6, warm * 1e3, bytes / warm * 1e-6, device_.c_str());
  }

  std::string device_;
  int cc_ = 0;
  cudaStream_t stream_ = nullptr;
  cudaEvent_t start_ = nullptr, stop_ = nullptr;
  void* flush_ = nullptr;
  std::vector<std::unique_ptr<void, void (*)(void*)>> bufs_;
};

// Codes equal but for +0 against -0 (harmless; test_fp8_linear.cpp counts them the same way).
int64_t code_mismatches(const std::vector<uint8_t>& a, const std::vector<uint8_t>& b) {
  int64_t bad = 0;
  for (size_t i = 0; i < a.size(); ++i) bad += a[i] != b[i] && !((a[i] & 0x7f) == 0 && (b[i] & 0x7f) == 0);
  return bad;
}

TEST_F(CudaFp8Bandwidth, RowQuantiser) {
  for (const int64_t cols : {int64_t(15360), int64_t(3072)}) {
    const int64_t rows = 4608;
    const size_t n = size_t(rows * cols);
    const __nv_bfloat16* x = random_bf16(n, 5 + cols, 1.0f);
    auto* q = alloc_n<uint8_t>(n);
    auto* s = alloc_n<float>(size_t(rows));
    char what[64];
    std::snprintf(what, sizeof what, "quantize_rows_e4m3 %lld x %lld", (long long)rows, (long long)cols);
    report(what, double(n) * 3 + double(rows) * 4, [&] {
      cuda::launch_quantize_rows_e4m3(x, cols, rows, cols, q, cols, s, stream_);
    });
    const auto xh = download<uint16_t>(x, n);
    const auto qh = download<uint8_t>(q, n);
    const auto sh = download<float>(s, size_t(rows));
    std::vector<uint8_t> q_ref(n);
    std::vector<float> s_ref(static_cast<size_t>(rows));
    quant::quantize_rows_e4m3(xh.data(), cols, rows, cols, q_ref.data(), cols, s_ref.data());
    EXPECT_EQ(std::memcmp(sh.data(), s_ref.data(), s_ref.size() * 4), 0) << what << ": row scales";
    EXPECT_EQ(code_mismatches(qh, q_ref), 0) << what << ": e4m3 codes differing from quant/fp8.h";
  }
}

TEST_F(CudaFp8Bandwidth, LayerNormModulateFp8) {
  const int64_t N = 4608, C = 3072;
  const size_t n = size_t(N * C);
  auto* x = random_bf16(n, 11, 1.0f, 0.2f);
  const __nv_bfloat16* mod = random_bf16(size_t(2 * C), 12, 0.5f);
  const cuda::RowsView X{x, 1, N, C, N * C, C};
  const cuda::VecsView shift{mod, 1, C, 2 * C}, scale{mod + C, 1, C, 2 * C};
  auto* q = alloc_n<uint8_t>(n);
  auto* s = alloc_n<float>(size_t(N));
  const cuda::Fp8RowsOut out{q, 0, C, s};
  const double bytes = double(n) * 3 + double(N) * 4 + double(C) * 4;
  report("layer_norm_modulate_fp8 4608 x 3072", bytes,
         [&] { cuda::launch_layer_norm_modulate_fp8(X, shift, scale, out, stream_); });

  // The unfused pair it replaces: bf16 y written and read back.
  auto* y = alloc_n<__nv_bfloat16>(n);
  const cuda::RowsView Y{y, 1, N, C, N * C, C};
  auto* q2 = alloc_n<uint8_t>(n);
  auto* s2 = alloc_n<float>(size_t(N));
  report("layer_norm_modulate + quantise (unfused)", double(n) * 7 + double(N) * 4 + double(C) * 4, [&] {
    cuda::launch_layer_norm_modulate(X, shift, scale, Y, stream_);
    cuda::launch_quantize_rows_e4m3(y, C, N, C, q2, C, s2, stream_);
  });
  const auto qa = download<uint8_t>(q, n), qb = download<uint8_t>(q2, n);
  const auto sa = download<float>(s, size_t(N)), sb = download<float>(s2, size_t(N));
  EXPECT_TRUE(qa == qb) << "fused codes differ from layer_norm_modulate + quantiser";
  EXPECT_EQ(std::memcmp(sa.data(), sb.data(), sa.size() * 4), 0) << "fused scales differ";
}

TEST_F(CudaFp8Bandwidth, GatedResidualLayerNorm) {
  const int64_t N = 4608, C = 3072, R = 64;
  const size_t n = size_t(N * C);
  auto* x0 = random_bf16(n, 31, 1.0f, 0.2f);  // pristine copy: both paths start from it for the bit check
  auto* x = alloc_n<__nv_bfloat16>(n);
  auto* x2 = alloc_n<__nv_bfloat16>(n);
  const __nv_bfloat16* branch = random_bf16(n, 32, 1.0f);
  const __nv_bfloat16* mod = random_bf16(size_t(6 * C), 33, 0.5f);
  auto reset = [&] {
    check(cudaMemcpyAsync(x, x0, n * 2, cudaMemcpyDeviceToDevice, stream_), "test", "cudaMemcpyAsync");
    check(cudaMemcpyAsync(x2, x0, n * 2, cudaMemcpyDeviceToDevice, stream_), "test", "cudaMemcpyAsync");
  };
  reset();
  const cuda::RowsView X{x, 1, N, C, N * C, C}, X2{x2, 1, N, C, N * C, C};
  const cuda::RowsView Br{const_cast<__nv_bfloat16*>(branch), 1, N, C, N * C, C};
  const cuda::VecsView gate{mod + 2 * C, 1, C, 6 * C}, shift{mod + 3 * C, 1, C, 6 * C}, scale{mod + 4 * C, 1, C, 6 * C};
  auto* y = alloc_n<__nv_bfloat16>(size_t(N * (C + R)));
  auto* y2 = alloc_n<__nv_bfloat16>(size_t(N * (C + R)));
  const cuda::RowsView Y{y, 1, N, C, N * (C + R), C + R}, Y2{y2, 1, N, C, N * (C + R), C + R};
  const double vecs = double(C) * 2 * 3;
  // bf16: reads x and the branch, writes x and y; unfused, x is written and read back once more.
  report("gated_residual_layer_norm_modulate 4608 x 3072", double(n) * 8 + vecs,
         [&] { cuda::launch_gated_residual_layer_norm_modulate(X, gate, Br, shift, scale, Y, stream_); });
  report("gated_residual + layer_norm_modulate (unfused)", double(n) * 10 + vecs, [&] {
    cuda::launch_gated_residual(X2, gate, Br, stream_);
    cuda::launch_layer_norm_modulate(X2, shift, scale, Y2, stream_);
  });
  auto* q = alloc_n<uint8_t>(n);
  auto* q2 = alloc_n<uint8_t>(n);
  auto* s = alloc_n<float>(size_t(N));
  auto* s2 = alloc_n<float>(size_t(N));
  const cuda::Fp8RowsOut Q{q, 0, C, s}, Q2{q2, 0, C, s2};
  report("gated_residual_layer_norm_modulate_fp8", double(n) * 7 + double(N) * 4 + vecs,
         [&] { cuda::launch_gated_residual_layer_norm_modulate_fp8(X, gate, Br, shift, scale, Q, stream_); });
  report("gated_residual + layer_norm_modulate_fp8 (unfused)", double(n) * 9 + double(N) * 4 + vecs, [&] {
    cuda::launch_gated_residual(X2, gate, Br, stream_);
    cuda::launch_layer_norm_modulate_fp8(X2, shift, scale, Q2, stream_);
  });

  // One call of each from the same x.
  reset();
  cuda::launch_gated_residual_layer_norm_modulate(X, gate, Br, shift, scale, Y, stream_);
  cuda::launch_gated_residual(X2, gate, Br, stream_);
  cuda::launch_layer_norm_modulate(X2, shift, scale, Y2, stream_);
  EXPECT_TRUE(download<uint16_t>(x, n) == download<uint16_t>(x2, n)) << "bf16 form: residual differs";
  EXPECT_TRUE(download<uint16_t>(y, size_t(N * (C + R))) == download<uint16_t>(y2, size_t(N * (C + R))))
      << "bf16 form: normed rows differ";
  reset();
  cuda::launch_gated_residual_layer_norm_modulate_fp8(X, gate, Br, shift, scale, Q, stream_);
  cuda::launch_gated_residual(X2, gate, Br, stream_);
  cuda::launch_layer_norm_modulate_fp8(X2, shift, scale, Q2, stream_);
  EXPECT_TRUE(download<uint16_t>(x, n) == download<uint16_t>(x2, n)) << "fp8 form: residual differs";
  EXPECT_TRUE(download<uint8_t>(q, n) == download<uint8_t>(q2, n)) << "fp8 form: codes differ";
  const auto sa = download<float>(s, size_t(N)), sb = download<float>(s2, size_t(N));
  EXPECT_EQ(std::memcmp(sa.data(), sb.data(), sa.size() * 4), 0) << "fp8 form: scales differ";
}

TEST_F(CudaFp8Bandwidth, GemvBatch) {
  if (cc_ < 89) GTEST_SKIP() << "e4m3 tensor-core products need sm_89";
  const int64_t K = 3072;
  std::vector<int64_t> nouts(38, 18432);
  nouts.insert(nouts.end(), 38, 9216);
  nouts.push_back(6144);
  // Each item's weights quantised from its own random bf16 matrix (one scratch buffer, refilled).
  auto* w = alloc_n<__nv_bfloat16>(size_t(18432 * K));
  int64_t total = 0, tiles = 0;
  for (int64_t o : nouts) total += o;
  auto* y = alloc_n<__nv_bfloat16>(size_t(2 * total));
  auto* y2 = alloc_n<__nv_bfloat16>(size_t(2 * total));
  std::vector<cuda::Fp8GemvItem> items;
  double weight_bytes = 0;
  for (size_t i = 0; i < nouts.size(); ++i) {
    const int64_t o = nouts[i];
    cuda::launch_fill_normal(w, true, o * K, 100 + i, 0.0f, 0.02f, stream_);
    auto* wq = alloc_n<uint8_t>(size_t(o * K));
    auto* ws = alloc_n<float>(size_t(o));
    cuda::launch_quantize_rows_e4m3(w, K, o, K, wq, K, ws, stream_);
    const __nv_bfloat16* bias = random_bf16(size_t(o), 300 + i, 0.5f);
    const int64_t col = items.empty() ? 0 : items.back().y - y + items.back().nout;
    items.push_back({wq, K, ws, bias, y + col, total, o, tiles});
    tiles += cuda::fp8_gemv_tiles(o);
    weight_bytes += double(o) * (double(K) + 4 + 2);
  }
  auto* list = static_cast<cuda::Fp8GemvItem*>(alloc(items.size() * sizeof(cuda::Fp8GemvItem)));
  check(cudaMemcpy(list, items.data(), items.size() * sizeof(cuda::Fp8GemvItem), cudaMemcpyHostToDevice), "test",
        "cudaMemcpy");
  const __nv_bfloat16* x = random_bf16(size_t(2 * K), 24, 2.0f);
  for (const int64_t rows : {int64_t(1), int64_t(2)}) {
    const double bytes = weight_bytes + double(rows) * (double(K) + double(total)) * 2;
    char what[80];
    std::snprintf(what, sizeof what, "fp8_gemv_batch, 57 modulation linears, %lld row%s", (long long)rows,
                  rows > 1 ? "s" : "");
    report(what, bytes,
           [&] { cuda::launch_fp8_gemv_batch(x, K, rows, K, list, int64_t(items.size()), tiles, stream_); });
    std::snprintf(what, sizeof what, "fp8_gemv x 57 launches, %lld row%s", (long long)rows, rows > 1 ? "s" : "");
    report(what, bytes, [&] {
      for (const cuda::Fp8GemvItem& it : items)
        cuda::launch_fp8_gemv(x, K, rows, K, it.wq, it.ldw, it.w_scale, it.bias, it.nout, y2 + (it.y - y), total,
                              stream_);
    });
    const size_t out = size_t(rows * total);
    EXPECT_TRUE(download<uint16_t>(y, out) == download<uint16_t>(y2, out))
        << rows << " rows: the batch differs from the single launches";
  }
}

TEST_F(CudaFp8Bandwidth, Gemv) {
  if (cc_ < 89) GTEST_SKIP() << "e4m3 tensor-core products need sm_89";
  const int64_t nout = 18432, K = 3072;
  const __nv_bfloat16* w = random_bf16(size_t(nout * K), 21, 0.02f);
  auto* wq = alloc_n<uint8_t>(size_t(nout * K));
  auto* ws = alloc_n<float>(size_t(nout));
  cuda::launch_quantize_rows_e4m3(w, K, nout, K, wq, K, ws, stream_);
  const __nv_bfloat16* bias = random_bf16(size_t(nout), 22, 0.5f);
  const __nv_bfloat16* x = random_bf16(size_t(2 * K), 23, 2.0f);
  auto* y = alloc_n<__nv_bfloat16>(size_t(2 * nout));
  const auto wqh = download<uint8_t>(wq, size_t(nout * K));
  const auto wsh = download<float>(ws, size_t(nout));
  const auto bh = download<uint16_t>(bias, size_t(nout));
  const auto xh = download<uint16_t>(x, size_t(2 * K));
  for (const int64_t rows : {int64_t(1), int64_t(2)}) {
    char what[64];
    std::snprintf(what, sizeof what, "fp8_gemv %lld x %lld, %lld row%s", (long long)nout, (long long)K,
                  (long long)rows, rows > 1 ? "s" : "");
    const double bytes = double(nout) * (double(K) + 4 + 2) + double(rows) * (double(K) + double(nout)) * 2;
    report(what, bytes, [&] {
      cuda::launch_fp8_gemv(x, K, rows, K, wq, K, ws, bias, nout, y, nout, stream_);
    });
    const auto yh = download<uint16_t>(y, size_t(rows * nout));
    std::vector<uint8_t> xq(size_t(rows * K));
    std::vector<float> sx(static_cast<size_t>(rows));
    quant::quantize_rows_e4m3(xh.data(), K, rows, K, xq.data(), K, sx.data());
    double max_err = 0, max_ref = 0;
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t o = 0; o < nout; ++o) {
        double acc = 0;
        for (int64_t k = 0; k < K; ++k)
          acc += double(quant::e4m3_to_f32(xq[size_t(r * K + k)])) * quant::e4m3_to_f32(wqh[size_t(o * K + k)]);
        const double ref = acc * sx[size_t(r)] * wsh[size_t(o)] + bf16_to_f32(bh[size_t(o)]);
        const double got = bf16_to_f32(yh[size_t(r * nout + o)]);
        max_err = std::max(max_err, std::isfinite(got) ? std::fabs(got - ref) : INFINITY);
        max_ref = std::max(max_ref, std::fabs(ref));
      }
    const double err = max_err / max_ref;
    std::printf("[ bandwidth] %s: max rel error %.3g vs float64\n", what, err);
    EXPECT_LE(err, 1e-2) << what;
  }
}

}  // namespace
}  // namespace fluxswap::test
