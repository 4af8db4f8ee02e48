// The FP8 GEMM building blocks on the GPU (skipped without a GPU; the GEMM tests also below sm_89):
//  - the quantisation kernels against the CPU reference in quant/fp8.h, bit for bit (e4m3 codes, row scales and
//    dequantised bf16), over vectorised, strided, unaligned and register-cache-overflowing rows, exact e4m3 ties,
//    zero, tiny, huge and NaN-holding rows;
//  - the scaling epilogue kernel against float32 math;
//  - CublasLtFp8Linear on both paths (cuBLASLt outer-vector scales; the forced fallback) against a CPU product of
//    the dequantised operands, at token counts 1, 7, 333 and 4608 and FLUX widths, with bias and GELU.
//
// GEMM tolerance: per output row, max|gpu - ref| / max|ref| <= 1e-2. The reference takes the very e4m3 codes and
// scales the GPU used and computes in double, so what is left is float32 accumulation on the tensor cores and bf16
// rounding (2^-9 relative per rounding; the fallback rounds twice: the unscaled accumulator, then the output).
// Per row, because row scales span 2^-5..2^5 here: a scale applied to the wrong row or column shows in every row.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

#include "backend/cuda/cublaslt_linear.h"
#include "backend/cuda/cuda_check.h"
#include "backend/cuda/device_memory.h"
#include "backend/cuda/fp8_linear.h"
#include "backend/cuda/fp8_quant_kernels.h"
#include "backend/cuda/kernels.h"
#include "core/counter_rng.h"
#include "core/dtype.h"
#include "core/error.h"
#include "quant/fp8.h"

namespace fluxswap::test {
namespace {

using cuda::check;
using cuda::CublasLtFp8Linear;
using cuda::Fp8GemmPath;
using cuda::Fp8Rows;
using cuda::GemmEpilogue;
using quant::e4m3_to_f32;

constexpr double kGemmTol = 1e-2;
constexpr uint16_t kBf16NaN = 0xFFFF;  // output poison: an element left unwritten stays NaN

template <typename F>
void parallel_for(int64_t n, F f) {
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(std::thread::hardware_concurrency(), n));
  std::vector<std::thread> pool;
  for (int64_t t = 0; t < threads; ++t)
    pool.emplace_back([&f, n, t, threads] {
      for (int64_t i = n * t / threads; i < n * (t + 1) / threads; ++i) f(i);
    });
  for (auto& th : pool) th.join();
}

bool bf16_is_nan(uint16_t h) { return (h & 0x7fff) > 0x7f80; }

// bf16 rows [rows, cols] at row stride ld, `offset` elements into the buffer: normal(seed) * base * 2^g with g
// cycling over [-span, span] from row to row, and every 997th element 16x (outliers that set their row's amax).
// Everything outside the rows is 1e30, so a kernel that read it would get a wrong scale.
std::vector<uint16_t> random_rows(int64_t rows, int64_t cols, int64_t ld, int64_t offset, uint64_t seed, float base,
                                  int span) {
  std::vector<uint16_t> h(size_t(offset + rows * ld), f32_to_bf16(1e30f));
  parallel_for(rows, [&](int64_t r) {
    const float gain = base * std::ldexp(1.0f, int(r * 37 % (2 * span + 1)) - span);
    for (int64_t c = 0; c < cols; ++c) {
      const int64_t i = r * cols + c;
      float v = normal_from_counter(seed, uint64_t(i)) * gain;
      if (i % 997 == 0) v *= 16.0f;
      h[size_t(offset + r * ld + c)] = f32_to_bf16(v);
    }
  });
  return h;
}

class Fp8Gpu : public ::testing::Test {
 protected:
  void SetUp() override {
    int count = 0;
    if (cudaGetDeviceCount(&count) != cudaSuccess || count == 0) {
      cudaGetLastError();
      GTEST_SKIP() << "no CUDA device";
    }
    check(cudaSetDevice(0), "test", "cudaSetDevice");
    memory_ = std::make_unique<cuda::DeviceMemory>(0);
    check(cudaStreamCreate(&stream_), "test", "cudaStreamCreate");
    fp8_ = cuda::fp8_gemm_supported(0, &why_);
  }
  void TearDown() override {
    if (stream_) cudaStreamDestroy(stream_);
  }

  void* alloc(size_t bytes) {
    bufs_.push_back(memory_->allocate(bytes, "test"));
    return bufs_.back().get();
  }
  void release() {
    sync();
    bufs_.clear();
  }
  void sync() { check(cudaStreamSynchronize(stream_), "test", "cudaStreamSynchronize"); }
  template <typename T>
  T* upload(const std::vector<T>& h) {
    void* d = alloc(h.size() * sizeof(T));
    check(cudaMemcpy(d, h.data(), h.size() * sizeof(T), cudaMemcpyHostToDevice), "test", "cudaMemcpy");
    return static_cast<T*>(d);
  }
  template <typename T>
  std::vector<T> download(const void* d, size_t count) {
    sync();
    std::vector<T> h(count);
    check(cudaMemcpy(h.data(), d, count * sizeof(T), cudaMemcpyDeviceToHost), "test", "cudaMemcpy");
    return h;
  }
  void poison(void* d, size_t bytes, int byte) { check(cudaMemsetAsync(d, byte, bytes, stream_), "test", "memset"); }

  std::unique_ptr<cuda::DeviceMemory> memory_;
  std::vector<std::shared_ptr<void>> bufs_;
  cudaStream_t stream_ = nullptr;
  bool fp8_ = false;
  std::string why_;
};

#define FLUXSWAP_REQUIRE_FP8() \
  if (!fp8_) GTEST_SKIP() << why_

// ---------------------------------------------------------------------------------------------------------------
// Quantisation and dequantisation kernels: bit-exact.

struct QuantCase {
  int64_t rows, cols, ldx, offset, ldq;
  const char* what;
};

TEST_F(Fp8Gpu, QuantiseAndDequantiseMatchTheCpuBitForBit) {
  const QuantCase cases[] = {
      {1, 3072, 3072, 0, 3072, "one token"},
      {7, 3072, 3096, 8, 3072, "column slice of a wider buffer (16-byte aligned)"},
      {333, 12288, 12288, 0, 12304, "padded e4m3 rows"},
      {64, 15360, 15360, 0, 15360, "7.5 register chunks per thread"},
      {6, 20000, 20000, 0, 20000, "longer than the register cache"},
      {9, 100, 107, 3, 100, "unaligned (element by element)"},
      {6, 17, 17, 0, 17, "odd width"},
      {6, 40, 40, 0, 41, "e4m3 stride not a multiple of 8"},
  };
  int64_t zero_sign_only = 0;
  for (const QuantCase& qc : cases) {
    SCOPED_TRACE(qc.what);
    std::vector<uint16_t> x = random_rows(qc.rows, qc.cols, qc.ldx, qc.offset, 11, 1.0f, 5);
    auto at = [&](int64_t r, int64_t c) -> uint16_t& { return x[size_t(qc.offset + r * qc.ldx + c)]; };
    if (qc.rows >= 6) {
      for (int64_t c = 0; c < qc.cols; ++c) {
        at(1, c) = 0;                                                        // all zero: the floor scale
        at(2, c) = f32_to_bf16(bf16_to_f32(at(2, c)) * std::ldexp(1.0f, -100));  // tiny
        at(3, c) = f32_to_bf16(bf16_to_f32(at(3, c)) * std::ldexp(1.0f, 100));   // huge
      }
      at(4, 0) = 0x7FC0;  // NaN: skipped by the amax, encoded as NaN
      // Row 5: amax 448, so the scale is exactly 1 and every other element is an exact tie between two e4m3
      // values; the hardware conversion must round them all to even, as the reference does.
      at(5, 0) = f32_to_bf16(448.0f);
      for (int64_t c = 1; c < qc.cols; ++c) {
        const int code = int((c - 1) % 0x7E);
        const float mid = (e4m3_to_f32(uint8_t(code)) + e4m3_to_f32(uint8_t(code + 1))) / 2;
        at(5, c) = f32_to_bf16(c % 2 ? mid : -mid);
        ASSERT_EQ(bf16_to_f32(at(5, c)), c % 2 ? mid : -mid) << "tie not representable in bf16";
      }
    }
    const auto* dx = upload(x);
    auto* q = static_cast<uint8_t*>(alloc(size_t(qc.rows * qc.ldq)));
    auto* scales = static_cast<float*>(alloc(size_t(qc.rows) * 4));
    poison(q, size_t(qc.rows * qc.ldq), 0xAB);
    poison(scales, size_t(qc.rows) * 4, 0xFF);
    cuda::launch_quantize_rows_e4m3(reinterpret_cast<const __nv_bfloat16*>(dx + qc.offset), qc.ldx, qc.rows,
                                    qc.cols, q, qc.ldq, scales, stream_);
    const auto q_gpu = download<uint8_t>(q, size_t(qc.rows * qc.ldq));
    const auto s_gpu = download<float>(scales, size_t(qc.rows));

    std::vector<uint8_t> q_ref(q_gpu.size(), 0xAB);
    std::vector<float> s_ref(s_gpu.size());
    quant::quantize_rows_e4m3(x.data() + qc.offset, qc.ldx, qc.rows, qc.cols, q_ref.data(), qc.ldq, s_ref.data());
    for (int64_t r = 0; r < qc.rows; ++r)
      EXPECT_EQ(std::memcmp(&s_gpu[size_t(r)], &s_ref[size_t(r)], 4), 0)
          << "row " << r << " scale " << s_gpu[size_t(r)] << " vs " << s_ref[size_t(r)];
    int64_t bad = 0;
    for (size_t i = 0; i < q_gpu.size(); ++i) {
      const uint8_t a = q_gpu[i], b = q_ref[i];
      if (a == b) continue;
      if ((a & 0x7f) == 0 && (b & 0x7f) == 0) {  // +0 against -0: harmless, counted and reported below
        ++zero_sign_only;
        continue;
      }
      if (++bad <= 5) {
        const int64_t r = int64_t(i) / qc.ldq, c = int64_t(i) % qc.ldq;
        ADD_FAILURE() << "row " << r << " col " << c << ": gpu 0x" << std::hex << int(a) << " cpu 0x" << int(b)
                      << std::dec << " (x " << (c < qc.cols ? bf16_to_f32(at(r, c)) : 0.0f) << ")";
      }
    }
    EXPECT_EQ(bad, 0) << "e4m3 codes differing from the CPU reference (padding included)";

    // Dequantisation of the same codes, into a padded bf16 output.
    const int64_t ldy = qc.cols + 8;
    auto* y = static_cast<__nv_bfloat16*>(alloc(size_t(qc.rows * ldy) * 2));
    poison(y, size_t(qc.rows * ldy) * 2, 0xFF);
    cuda::launch_dequantize_rows_e4m3(q, qc.ldq, scales, qc.rows, qc.cols, y, ldy, stream_);
    const auto y_gpu = download<uint16_t>(y, size_t(qc.rows * ldy));
    std::vector<float> y_ref(size_t(qc.rows * qc.cols));
    quant::dequantize_rows_e4m3(q_ref.data(), qc.ldq, s_ref.data(), qc.rows, qc.cols, y_ref.data(), qc.cols);
    int64_t bad_y = 0;
    for (int64_t r = 0; r < qc.rows; ++r)
      for (int64_t c = 0; c < ldy; ++c) {
        const uint16_t g = y_gpu[size_t(r * ldy + c)];
        if (c >= qc.cols) {
          bad_y += g != kBf16NaN;
          continue;
        }
        const uint16_t want = f32_to_bf16(y_ref[size_t(r * qc.cols + c)]);
        if (g == want || (bf16_is_nan(g) && bf16_is_nan(want))) continue;
        if ((g & 0x7fff) == 0 && (want & 0x7fff) == 0) continue;  // +0 against -0, from the codes above
        if (++bad_y <= 5)
          ADD_FAILURE() << "dequantised row " << r << " col " << c << ": gpu " << bf16_to_f32(g) << " cpu "
                        << bf16_to_f32(want);
      }
    EXPECT_EQ(bad_y, 0) << "dequantised bf16 values differing from the CPU (or written outside the rows)";
    release();
  }
  if (zero_sign_only)
    std::printf("[ note     ] %lld e4m3 zeros differ from the CPU reference in sign only\n",
                (long long)zero_sign_only);
}

// ---------------------------------------------------------------------------------------------------------------
// The scaling epilogue kernel.

struct EpilogueCase {
  int64_t rows, cols, lda, ldy;
  bool f32, in_place, scales, bias, gelu;
};

TEST_F(Fp8Gpu, ScaleEpilogueMatchesFloatMath) {
  const EpilogueCase cases[] = {
      {37, 264, 272, 280, false, false, true, true, true},   {37, 264, 268, 264, true, false, true, true, false},
      {37, 264, 0, 272, false, true, true, true, true},      {37, 264, 0, 264, false, true, false, true, true},
      {13, 100, 103, 105, false, false, true, false, true},  {13, 100, 101, 100, true, false, true, true, true},
      {13, 100, 0, 104, false, true, true, false, false},
  };
  for (const EpilogueCase& ec : cases) {
    SCOPED_TRACE(testing::Message() << "rows " << ec.rows << " cols " << ec.cols << " f32 " << ec.f32 << " in place "
                                    << ec.in_place << " scales " << ec.scales << " bias " << ec.bias << " gelu "
                                    << ec.gelu);
    const int64_t lda = ec.in_place ? ec.ldy : ec.lda;
    // Unscaled accumulators are large (sums of products of values up to 448), the scales small.
    std::vector<float> acc(size_t(ec.rows * lda)), sx(size_t(ec.rows)), sw(size_t(ec.cols));
    std::vector<uint16_t> acc_bf16(acc.size(), kBf16NaN), bias(size_t(ec.cols));
    for (int64_t r = 0; r < ec.rows; ++r)
      for (int64_t c = 0; c < ec.cols; ++c) {
        const float v = bf16_to_f32(f32_to_bf16(normal_from_counter(21, uint64_t(r * ec.cols + c)) * 3e4f));
        acc[size_t(r * lda + c)] = v;
        acc_bf16[size_t(r * lda + c)] = f32_to_bf16(v);
      }
    for (int64_t r = 0; r < ec.rows; ++r) sx[size_t(r)] = std::ldexp(1.0f, int(r % 5) - 9) * 1.3f;
    for (int64_t c = 0; c < ec.cols; ++c) {
      sw[size_t(c)] = std::ldexp(1.0f, int(c % 7) - 12) * 1.7f;
      bias[size_t(c)] = f32_to_bf16(normal_from_counter(22, uint64_t(c)) * 0.5f);
    }
    const float* d_sx = ec.scales ? upload(sx) : nullptr;
    const float* d_sw = ec.scales ? upload(sw) : nullptr;
    const auto* d_bias = ec.bias ? reinterpret_cast<const __nv_bfloat16*>(upload(bias)) : nullptr;
    __nv_bfloat16* y;
    cuda::Fp8Accumulator a{};
    if (ec.in_place) {
      y = reinterpret_cast<__nv_bfloat16*>(upload(acc_bf16));
      a = {y, false, ec.ldy};
    } else {
      y = static_cast<__nv_bfloat16*>(alloc(size_t(ec.rows * ec.ldy) * 2));
      poison(y, size_t(ec.rows * ec.ldy) * 2, 0xFF);
      a = {ec.f32 ? static_cast<const void*>(upload(acc)) : static_cast<const void*>(upload(acc_bf16)), ec.f32, lda};
    }
    cuda::launch_fp8_scale_epilogue(a, d_sx, d_sw, d_bias, ec.gelu, ec.rows, ec.cols, y, ec.ldy, stream_);
    const auto y_gpu = download<uint16_t>(y, size_t(ec.rows * ec.ldy));

    std::vector<double> ref(size_t(ec.rows * ec.cols));
    double max_ref = 0;
    for (int64_t r = 0; r < ec.rows; ++r)
      for (int64_t c = 0; c < ec.cols; ++c) {
        const double in = ec.f32 ? acc[size_t(r * lda + c)] : bf16_to_f32(acc_bf16[size_t(r * lda + c)]);
        double v = in * (ec.scales ? double(sx[size_t(r)]) * sw[size_t(c)] : 1.0);
        if (ec.bias) v += bf16_to_f32(bias[size_t(c)]);
        if (ec.gelu) v = 0.5 * v * (1.0 + std::tanh(0.7978845608028654 * (v + 0.044715 * v * v * v)));
        ref[size_t(r * ec.cols + c)] = v;
        max_ref = std::max(max_ref, std::fabs(v));
      }
    int64_t bad = 0;
    for (int64_t r = 0; r < ec.rows; ++r)
      for (int64_t c = 0; c < ec.ldy; ++c) {
        const uint16_t g = y_gpu[size_t(r * ec.ldy + c)];
        if (c >= ec.cols) {
          if (!ec.in_place) bad += g != kBf16NaN;  // in place, the padding holds the accumulator's padding
          continue;
        }
        const double want = ref[size_t(r * ec.cols + c)], got = bf16_to_f32(g);
        // A bf16 rounding (2^-8 relative at most, both sides of a rounding boundary) plus float32 ulps.
        if (!(std::fabs(got - want) <= std::ldexp(1.0, -7) * std::fabs(want) + 1e-5 * max_ref) && ++bad <= 5)
          ADD_FAILURE() << "row " << r << " col " << c << ": gpu " << got << " ref " << want;
      }
    EXPECT_EQ(bad, 0);
    release();
  }
}

// ---------------------------------------------------------------------------------------------------------------
// The FP8 linear against a CPU product of the dequantised operands.

struct LinearCase {
  int64_t T, K, N;
  GemmEpilogue epilogue;
  int64_t y_pad;  // > 0: y is a column slice (8 elements in) of rows N + y_pad wide
};

const char* epilogue_name(GemmEpilogue e) {
  switch (e) {
    case GemmEpilogue::None: return "none";
    case GemmEpilogue::Bias: return "bias";
    case GemmEpilogue::Gelu: return "gelu";
    case GemmEpilogue::GeluBias: return "gelu+bias";
  }
  return "?";
}

// Rows the reference checks: all of a small problem, 64 spread over a large one (first and last included).
std::vector<int64_t> checked_rows(int64_t T) {
  std::vector<int64_t> rows;
  if (T <= 64) {
    for (int64_t t = 0; t < T; ++t) rows.push_back(t);
  } else {
    for (int64_t i = 0; i < 64; ++i) rows.push_back(i * (T - 1) / 63);
  }
  return rows;
}

TEST_F(Fp8Gpu, LinearMatchesDequantisedReferenceOnBothPaths) {
  FLUXSWAP_REQUIRE_FP8();
  std::vector<LinearCase> cases;
  for (const int64_t T : {1, 7, 333, 4608}) {
    cases.push_back({T, 3072, 9216, GemmEpilogue::Bias, 0});       // qkv
    cases.push_back({T, 12288, 3072, GemmEpilogue::GeluBias, 16});  // mlp out, epilogue exercised at K = 12288
  }
  cases.push_back({7, 64, 48, GemmEpilogue::None, 8});
  cases.push_back({33, 256, 136, GemmEpilogue::Gelu, 0});

  CublasLtFp8Linear fast(*memory_), fallback(*memory_, {.force_fallback = true});
  int device_major = 0;
  check(cudaDeviceGetAttribute(&device_major, cudaDevAttrComputeCapabilityMajor, 0), "test", "cudaDeviceGetAttribute");
  uint64_t seed = 100;
  for (const LinearCase& lc : cases) {
    const bool bias_on = lc.epilogue == GemmEpilogue::Bias || lc.epilogue == GemmEpilogue::GeluBias;
    const bool gelu_on = lc.epilogue == GemmEpilogue::Gelu || lc.epilogue == GemmEpilogue::GeluBias;
    const auto x_h = random_rows(lc.T, lc.K, lc.K, 0, ++seed, 1.0f, 5);
    const auto w_h = random_rows(lc.N, lc.K, lc.K, 0, ++seed, 0.02f, 3);
    std::vector<uint16_t> bias_h(size_t(lc.N));
    for (int64_t o = 0; o < lc.N; ++o) bias_h[size_t(o)] = f32_to_bf16(normal_from_counter(++seed, 0) * 0.5f);

    const auto* x = reinterpret_cast<const __nv_bfloat16*>(upload(x_h));
    const auto* w = reinterpret_cast<const __nv_bfloat16*>(upload(w_h));
    const void* bias = bias_on ? static_cast<const void*>(upload(bias_h)) : nullptr;
    auto* xq = static_cast<uint8_t*>(alloc(size_t(lc.T * lc.K)));
    auto* wq = static_cast<uint8_t*>(alloc(size_t(lc.N * lc.K)));
    auto* sx = static_cast<float*>(alloc(size_t(lc.T) * 4));
    auto* sw = static_cast<float*>(alloc(size_t(lc.N) * 4));
    cuda::launch_quantize_rows_e4m3(x, lc.K, lc.T, lc.K, xq, lc.K, sx, stream_);
    cuda::launch_quantize_rows_e4m3(w, lc.K, lc.N, lc.K, wq, lc.K, sw, stream_);

    const int64_t ldy = lc.N + lc.y_pad, y0 = lc.y_pad ? 8 : 0, y_elems = y0 + lc.T * ldy;
    auto* y_buf = static_cast<uint16_t*>(alloc(size_t(y_elems) * 2));
    std::vector<std::vector<uint16_t>> outs;
    std::vector<Fp8GemmPath> paths;
    for (CublasLtFp8Linear* lin : {&fast, &fallback}) {
      poison(y_buf, size_t(y_elems) * 2, 0xFF);
      lin->run({xq, lc.K, sx}, {wq, lc.K, sw}, bias, y_buf + y0, ldy, lc.T, lc.K, lc.N, lc.epilogue, false, stream_);
      outs.push_back(download<uint16_t>(y_buf, size_t(y_elems)));
      paths.push_back(lin->last_path());
    }
    EXPECT_EQ(paths[1], Fp8GemmPath::Fallback);
    // cuBLASLt documents outer-vector scaling for compute capability 9.0: on Hopper the transformer's token counts
    // must take it (tiny T may legitimately get no outer-vector algorithm).
    if (device_major == 9 && lc.T >= 256) EXPECT_NE(paths[0], Fp8GemmPath::Fallback) << "no outer-vector scaling on this Hopper";

    // The reference from the GPU's own codes and scales (bit-identical to the CPU's, tested above).
    const auto xq_h = download<uint8_t>(xq, size_t(lc.T * lc.K));
    const auto wq_h = download<uint8_t>(wq, size_t(lc.N * lc.K));
    const auto sx_h = download<float>(sx, size_t(lc.T));
    const auto sw_h = download<float>(sw, size_t(lc.N));
    std::vector<float> wd(size_t(lc.N * lc.K));
    parallel_for(lc.N, [&](int64_t o) {
      for (int64_t k = 0; k < lc.K; ++k) wd[size_t(o * lc.K + k)] = e4m3_to_f32(wq_h[size_t(o * lc.K + k)]);
    });
    const std::vector<int64_t> rows = checked_rows(lc.T);
    std::vector<double> ref(rows.size() * size_t(lc.N));
    parallel_for(int64_t(rows.size()), [&](int64_t i) {
      const int64_t t = rows[size_t(i)];
      std::vector<float> xd(size_t(lc.K));
      for (int64_t k = 0; k < lc.K; ++k) xd[size_t(k)] = e4m3_to_f32(xq_h[size_t(t * lc.K + k)]);
      for (int64_t o = 0; o < lc.N; ++o) {
        const float* wr = &wd[size_t(o * lc.K)];
        double acc = 0;
        for (int64_t k = 0; k < lc.K; ++k) acc += double(xd[size_t(k)] * wr[k]);  // e4m3 products are exact
        double v = acc * double(sx_h[size_t(t)]) * double(sw_h[size_t(o)]);
        if (bias_on) v += bf16_to_f32(bias_h[size_t(o)]);
        if (gelu_on) v = 0.5 * v * (1.0 + std::tanh(0.7978845608028654 * (v + 0.044715 * v * v * v)));
        ref[size_t(i) * size_t(lc.N) + size_t(o)] = v;
      }
    });

    for (size_t p = 0; p < outs.size(); ++p) {
      const auto& y = outs[p];
      double worst = 0;
      int64_t worst_row = -1, poison_broken = 0, non_finite = 0;
      for (size_t i = 0; i < rows.size(); ++i) {
        const int64_t t = rows[i];
        double row_max = 0, row_err = 0;
        for (int64_t o = 0; o < lc.N; ++o) {
          const double want = ref[i * size_t(lc.N) + size_t(o)];
          const float got = bf16_to_f32(y[size_t(y0 + t * ldy + o)]);
          if (!std::isfinite(got)) ++non_finite;
          row_max = std::max(row_max, std::fabs(want));
          row_err = std::max(row_err, std::isfinite(got) ? std::fabs(double(got) - want) : INFINITY);
        }
        for (int64_t c = lc.N; c < ldy; ++c) poison_broken += y[size_t(y0 + t * ldy + c)] != kBf16NaN;
        const double rel = row_max > 0 ? row_err / row_max : row_err;
        if (rel > worst || worst_row < 0) worst = rel, worst_row = t;
      }
      std::printf("[ fp8      ] T %5lld K %5lld N %5lld %-9s %-26s worst row %5lld: max|err|/max|ref| %.2e\n",
                  (long long)lc.T, (long long)lc.K, (long long)lc.N, epilogue_name(lc.epilogue),
                  cuda::fp8_gemm_path_name(paths[p]), (long long)worst_row, worst);
      EXPECT_LE(worst, kGemmTol) << cuda::fp8_gemm_path_name(paths[p]) << " T " << lc.T << " K " << lc.K << " N "
                                 << lc.N << " " << epilogue_name(lc.epilogue) << ", worst row " << worst_row;
      EXPECT_EQ(non_finite, 0) << "elements not written (NaN poison) or overflowed";
      EXPECT_EQ(poison_broken, 0) << "elements written outside the output rows";
    }
    release();
  }
}

TEST_F(Fp8Gpu, LinearRejectsBadProblemsAndNewShapesWhileRecording) {
  FLUXSWAP_REQUIRE_FP8();
  const int64_t T = 5, K = 64, N = 32;
  auto* xq = static_cast<uint8_t*>(alloc(size_t(T * K)));
  auto* wq = static_cast<uint8_t*>(alloc(size_t(N * K)));
  auto* s = static_cast<float*>(alloc(size_t(std::max(T, N)) * 4));
  auto* y = static_cast<uint16_t*>(alloc(size_t(T * N) * 2 + 64));
  auto* bias = alloc(size_t(N) * 2);
  check(cudaMemsetAsync(xq, 0x38, size_t(T * K), stream_), "test", "memset");  // 1.0
  check(cudaMemsetAsync(wq, 0x38, size_t(N * K), stream_), "test", "memset");
  const std::vector<float> ones(size_t(std::max(T, N)), 1.0f);
  check(cudaMemcpy(s, ones.data(), ones.size() * 4, cudaMemcpyHostToDevice), "test", "cudaMemcpy");
  check(cudaMemsetAsync(bias, 0, size_t(N) * 2, stream_), "test", "memset");
  CublasLtFp8Linear lin(*memory_);
  const Fp8Rows x{xq, K, s}, w{wq, K, s};

  EXPECT_THROW(lin.run(x, w, nullptr, y, N, T, K, N, GemmEpilogue::None, true, stream_), Error)
      << "a plan made while recording";
  lin.run(x, w, nullptr, y, N, T, K, N, GemmEpilogue::None, false, stream_);
  EXPECT_NO_THROW(lin.run(x, w, nullptr, y, N, T, K, N, GemmEpilogue::None, true, stream_)) << "the plan exists now";
  const auto out = download<uint16_t>(y, size_t(T * N));
  for (const uint16_t v : out) EXPECT_EQ(bf16_to_f32(v), float(K));  // sum of K products 1 x 1

  EXPECT_THROW(lin.run({xq, 40, s}, {wq, 40, s}, nullptr, y, N, T, 40, N, GemmEpilogue::None, false, stream_), Error)
      << "K not a multiple of 16";
  EXPECT_THROW(lin.run(x, w, nullptr, y, 12, T, K, 12, GemmEpilogue::None, false, stream_), Error)
      << "nout not a multiple of 8";
  EXPECT_THROW(lin.run(x, w, nullptr, y + 1, N, T, K, N, GemmEpilogue::None, false, stream_), Error)
      << "unaligned output";
  EXPECT_THROW(lin.run(x, w, nullptr, y, N, T, K, N, GemmEpilogue::Bias, false, stream_), Error) << "missing bias";
  EXPECT_THROW(lin.run(x, w, bias, y, N, T, K, N, GemmEpilogue::None, false, stream_), Error) << "stray bias";
  EXPECT_THROW(lin.run({xq, K, nullptr}, w, nullptr, y, N, T, K, N, GemmEpilogue::None, false, stream_), Error)
      << "missing scales";
  sync();
}

// ---------------------------------------------------------------------------------------------------------------
// Timings at FLUX.1 size (4608 tokens), for the record: run with --gtest_also_run_disabled_tests.

class Fp8LinearBench : public Fp8Gpu {};

double median_ms(cudaStream_t stream, const std::function<void()>& f, int reps = 20) {
  for (int i = 0; i < 3; ++i) f();
  std::vector<cudaEvent_t> ev(size_t(reps) + 1);
  for (auto& e : ev) check(cudaEventCreate(&e), "bench", "cudaEventCreate");
  for (int i = 0; i < reps; ++i) {
    check(cudaEventRecord(ev[size_t(i)], stream), "bench", "cudaEventRecord");
    f();
  }
  check(cudaEventRecord(ev[size_t(reps)], stream), "bench", "cudaEventRecord");
  check(cudaEventSynchronize(ev[size_t(reps)]), "bench", "cudaEventSynchronize");
  std::vector<float> ms(static_cast<size_t>(reps));
  for (int i = 0; i < reps; ++i)
    check(cudaEventElapsedTime(&ms[size_t(i)], ev[size_t(i)], ev[size_t(i) + 1]), "bench", "cudaEventElapsedTime");
  for (auto& e : ev) cudaEventDestroy(e);
  std::sort(ms.begin(), ms.end());
  return (ms[size_t(reps / 2 - 1)] + ms[size_t(reps / 2)]) / 2;
}

TEST_F(Fp8LinearBench, DISABLED_FluxShapes) {
  FLUXSWAP_REQUIRE_FP8();
  constexpr int64_t T = 4608;
  const struct {
    int64_t K, N;
    const char* what;
  } shapes[] = {{3072, 21504, "single linear1"}, {15360, 3072, "single linear2"}, {3072, 9216, "double qkv"},
                {12288, 3072, "double mlp out"}};
  cudaDeviceProp prop{};
  check(cudaGetDeviceProperties(&prop, 0), "bench", "cudaGetDeviceProperties");
  std::printf("[ bench    ] %s, median of 20 after 3 warm-up runs, bias epilogue, T = %lld\n", prop.name,
              (long long)T);
  cuda::CublasLtLinear bf16(*memory_);
  CublasLtFp8Linear fp8(*memory_), fp8_fast(*memory_, {.fast_accum = true}),
      fp8_fallback(*memory_, {.force_fallback = true});
  for (const auto& s : shapes) {
    const int64_t K = s.K, N = s.N;
    auto* x = static_cast<__nv_bfloat16*>(alloc(size_t(T * K) * 2));
    auto* w = static_cast<__nv_bfloat16*>(alloc(size_t(N * K) * 2));
    auto* bias = static_cast<__nv_bfloat16*>(alloc(size_t(N) * 2));
    auto* y = static_cast<__nv_bfloat16*>(alloc(size_t(T * N) * 2));
    auto* xq = static_cast<uint8_t*>(alloc(size_t(T * K)));
    auto* wq = static_cast<uint8_t*>(alloc(size_t(N * K)));
    auto* sx = static_cast<float*>(alloc(size_t(T) * 4));
    auto* sw = static_cast<float*>(alloc(size_t(N) * 4));
    cuda::launch_fill_normal(x, true, T * K, 1, 0.0f, 1.0f, stream_);
    cuda::launch_fill_normal(w, true, N * K, 2, 0.0f, 0.02f, stream_);
    cuda::launch_fill_normal(bias, true, N, 3, 0.0f, 0.5f, stream_);
    cuda::launch_quantize_rows_e4m3(w, K, N, K, wq, K, sw, stream_);
    cuda::launch_quantize_rows_e4m3(x, K, T, K, xq, K, sx, stream_);
    const double flop = 2.0 * double(T) * double(K) * double(N);
    auto tflops = [&](double ms) { return flop / ms * 1e-9; };

    const double ms_bf16 = median_ms(stream_, [&] {
      bf16.run({x, 1, T, T * K, K}, w, bias, {y, 1, T, T * N, N}, K, N, GemmEpilogue::Bias, false, stream_);
    });
    double ms_fp8[3];
    Fp8GemmPath path[3];
    CublasLtFp8Linear* lins[3] = {&fp8, &fp8_fast, &fp8_fallback};
    for (int i = 0; i < 3; ++i) {
      ms_fp8[i] = median_ms(stream_, [&] {
        lins[i]->run({xq, K, sx}, {wq, K, sw}, bias, y, N, T, K, N, GemmEpilogue::Bias, false, stream_);
      });
      path[i] = lins[i]->last_path();
    }
    const double ms_quant =
        median_ms(stream_, [&] { cuda::launch_quantize_rows_e4m3(x, K, T, K, xq, K, sx, stream_); });
    std::printf("[ bench    ] %-15s %lldx%lld -> %lld\n", s.what, (long long)T, (long long)K, (long long)N);
    std::printf("[ bench    ]   bf16                          %7.3f ms  %6.1f TFLOP/s\n", ms_bf16, tflops(ms_bf16));
    const char* labels[3] = {"fp8", "fp8 fast-accum", "fp8 forced"};
    for (int i = 0; i < 3; ++i)
      std::printf("[ bench    ]   %-14s %-14s %7.3f ms  %6.1f TFLOP/s  (%.2fx bf16; + act quant %.3f ms)\n", labels[i],
                  cuda::fp8_gemm_path_name(path[i]), ms_fp8[i], tflops(ms_fp8[i]), ms_bf16 / ms_fp8[i],
                  ms_fp8[i] + ms_quant);
    std::printf("[ bench    ]   act quant [%lld, %lld] bf16 -> e4m3  %7.3f ms  %6.0f GB/s\n", (long long)T,
                (long long)K, ms_quant, double(T) * double(K) * 3.0 / ms_quant * 1e-6);
    release();
  }
}

}  // namespace
}  // namespace fluxswap::test
