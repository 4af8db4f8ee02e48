// The NF4 kernels (backend/cuda/nf4_kernels.h) against the CPU reference (quant/nf4.h): dequantisation bit for bit,
// and both linear paths against a double-precision product of the same bf16 inputs and dequantised weights.
// Skipped without a GPU. Timings at T5-XXL sizes are printed for the record.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <functional>
#include <memory>
#include <random>
#include <vector>

#include "backend/cuda/nf4_kernels.h"
#include "core/dtype.h"
#include "core/error.h"
#include "quant/nf4.h"

namespace fluxswap {
namespace {

#define NF4_REQUIRE_GPU()                                                            \
  do {                                                                               \
    int count_ = 0;                                                                  \
    if (cudaGetDeviceCount(&count_) != cudaSuccess || count_ == 0) {                 \
      cudaGetLastError();                                                            \
      GTEST_SKIP() << "no CUDA device";                                              \
    }                                                                                \
  } while (0)

void ok(cudaError_t e, const char* what) { ASSERT_EQ(e, cudaSuccess) << what << ": " << cudaGetErrorString(e); }

// Device memory that frees itself.
struct DevBuf {
  void* p = nullptr;
  size_t bytes = 0;
  explicit DevBuf(size_t n) : bytes(n) {
    if (cudaMalloc(&p, std::max<size_t>(n, 1)) != cudaSuccess) throw Error("cudaMalloc failed");
  }
  DevBuf(const void* host, size_t n) : DevBuf(n) {
    if (cudaMemcpy(p, host, n, cudaMemcpyHostToDevice) != cudaSuccess) throw Error("cudaMemcpy failed");
  }
  ~DevBuf() { cudaFree(p); }
  DevBuf(const DevBuf&) = delete;
  DevBuf& operator=(const DevBuf&) = delete;
  template <class T>
  T* as() const {
    return static_cast<T*>(p);
  }
};

// An Nf4Tensor [rows, cols] uploaded part by part.
struct DeviceNf4 {
  std::vector<std::unique_ptr<DevBuf>> parts;
  cuda::Nf4Matrix m;

  DeviceNf4(const Nf4Tensor& t, int64_t rows, int64_t cols) {
    auto up = [&](const Tensor& h) {
      parts.push_back(std::make_unique<DevBuf>(h.data(), h.nbytes()));
      return parts.back()->p;
    };
    m.packed = static_cast<const uint8_t*>(up(t.packed));
    m.rows = rows;
    m.cols = cols;
    m.blocksize = t.blocksize;
    if (t.nested) {
      m.absmax_q = static_cast<const uint8_t*>(up(t.absmax));
      m.nested_absmax = static_cast<const float*>(up(t.nested_absmax));
      m.nested_code = static_cast<const float*>(up(t.nested_code));
      m.nested_blocksize = t.nested_blocksize;
      m.nested_offset = t.nested_offset;
    } else {
      m.absmax = static_cast<const float*>(up(t.absmax));
    }
    std::memcpy(m.code, t.code.data(), sizeof m.code);
  }
};

std::vector<float> normal(int64_t n, uint32_t seed, float std) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> d(0.0f, std);
  std::vector<float> v(n);
  for (auto& x : v) x = d(rng);
  return v;
}

std::vector<uint16_t> to_bf16(const std::vector<float>& v) {
  std::vector<uint16_t> b(v.size());
  for (size_t i = 0; i < v.size(); ++i) b[i] = f32_to_bf16(v[i]);
  return b;
}

struct DequantCase {
  int64_t rows, cols, blocksize;
  bool nested;
  int64_t ld_pad;     // extra output columns per row (poisoned, must stay untouched)
  int64_t out_shift;  // output starts this many elements into its buffer (1 breaks 16-byte alignment)
};

TEST(Nf4Cuda, DequantizeIsBitExactWithTheCpuReference) {
  NF4_REQUIRE_GPU();
  const DequantCase cases[] = {
      {40, 96, 64, false, 0, 0},    {40, 96, 64, true, 8, 0},     {128, 4096, 64, true, 0, 0},
      {7, 33, 64, false, 3, 0},     {5, 70, 32, true, 0, 0},      {64, 256, 256, false, 0, 1},
      {300, 512, 128, true, 16, 0}, {1, 4097, 4096, false, 0, 0}, {3, 1000, 64, true, 5, 1},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(testing::Message() << "[" << c.rows << ", " << c.cols << "] block " << c.blocksize << " nested "
                                    << c.nested << " pad " << c.ld_pad << " shift " << c.out_shift);
    const int64_t n = c.rows * c.cols, ld = c.cols + c.ld_pad;
    auto x = normal(n, uint32_t(n + c.blocksize), 0.03f);
    for (int64_t i = 0; i < n; i += 13) x[i] *= 8.0f;  // outliers, so blocks differ in scale
    const Nf4Tensor q = quantize_nf4(x.data(), n, c.blocksize, c.nested);
    const std::vector<float> ref = dequantize_nf4(q);
    DeviceNf4 w(q, c.rows, c.cols);

    const size_t out_elems = size_t(c.out_shift + c.rows * ld);
    std::vector<uint16_t> host(out_elems, 0xFFFF);  // NaN poison
    DevBuf out(host.data(), out_elems * 2);
    auto* dst = out.as<__nv_bfloat16>() + c.out_shift;
    cuda::launch_nf4_dequantize(w.m, dst, ld, nullptr);
    ok(cudaDeviceSynchronize(), "dequantize");
    ok(cudaMemcpy(host.data(), out.p, out_elems * 2, cudaMemcpyDeviceToHost), "download");
    int64_t wrong = 0, touched_outside = 0;
    for (int64_t r = 0; r < c.rows; ++r) {
      for (int64_t col = 0; col < ld; ++col) {
        const uint16_t got = host[c.out_shift + r * ld + col];
        if (col < c.cols)
          wrong += got != f32_to_bf16(ref[r * c.cols + col]);
        else
          touched_outside += got != 0xFFFF;
      }
    }
    for (int64_t i = 0; i < c.out_shift; ++i) touched_outside += host[i] != 0xFFFF;
    EXPECT_EQ(wrong, 0);
    EXPECT_EQ(touched_outside, 0);
  }
}

// The product of the bf16 inputs with the bf16-rounded dequantised weights in double; the GPU sees exactly these.
std::vector<double> reference_linear(const std::vector<uint16_t>& x, int64_t T, int64_t in,
                                     const std::vector<float>& w_deq, int64_t out) {
  std::vector<double> wd(w_deq.size()), xd(x.size()), y(size_t(T * out));
  for (size_t i = 0; i < w_deq.size(); ++i) wd[i] = bf16_to_f32(f32_to_bf16(w_deq[i]));
  for (size_t i = 0; i < x.size(); ++i) xd[i] = bf16_to_f32(x[i]);
  for (int64_t t = 0; t < T; ++t)
    for (int64_t o = 0; o < out; ++o) {
      double s = 0;
      for (int64_t k = 0; k < in; ++k) s += xd[t * in + k] * wd[o * in + k];
      y[t * out + o] = s;
    }
  return y;
}

struct LinearCase {
  int64_t T, in, out, blocksize;
  bool nested;
  int64_t ldx_pad, ldy_pad;
};

class Nf4CudaLinear : public ::testing::Test {
 protected:
  void SetUp() override {
    NF4_REQUIRE_GPU();
    ASSERT_EQ(cublasLtCreate(&handle_), CUBLAS_STATUS_SUCCESS);
    static bool printed = false;
    size_t free_bytes = 0, total_bytes = 0;
    if (!printed && cudaMemGetInfo(&free_bytes, &total_bytes) == cudaSuccess) {
      // For the memory planner's reserve: what a context and a cuBLASLt handle take before any allocation.
      std::printf("[ memory   ] in use with a context and a cuBLASLt handle: %.0f MiB of %.0f MiB\n",
                  double(total_bytes - free_bytes) / 1048576.0, double(total_bytes) / 1048576.0);
      printed = true;
    }
    workspace_ = std::make_unique<DevBuf>(kWorkspace);
  }
  void TearDown() override {
    if (handle_) cublasLtDestroy(handle_);
  }

  // Runs one path; returns max|y - ref| / max|ref| and checks the padding columns of y stayed untouched.
  double run(const LinearCase& c, bool fused) {
    const int64_t ldx = c.in + c.ldx_pad, ldy = c.out + c.ldy_pad;
    const auto wf = normal(c.out * c.in, uint32_t(c.out * 7 + c.in), 0.02f);
    const Nf4Tensor q = quantize_nf4(wf.data(), c.out * c.in, c.blocksize, c.nested);
    const auto w_deq = dequantize_nf4(q);
    const auto xs = to_bf16(normal(c.T * c.in, uint32_t(c.T + 3), 1.0f));
    std::vector<uint16_t> x_padded(size_t(c.T * ldx), 0);
    for (int64_t t = 0; t < c.T; ++t) std::memcpy(&x_padded[t * ldx], &xs[t * c.in], size_t(c.in) * 2);
    DeviceNf4 w(q, c.out, c.in);
    DevBuf x(x_padded.data(), x_padded.size() * 2);
    std::vector<uint16_t> y_host(size_t(c.T * ldy), 0xFFFF);
    DevBuf y(y_host.data(), y_host.size() * 2);
    if (fused) {
      cuda::launch_nf4_fused_gemm(w.m, x.as<__nv_bfloat16>(), ldx, c.T, y.as<__nv_bfloat16>(), ldy, nullptr);
    } else {
      DevBuf scratch(size_t(c.out * c.in) * 2);
      cuda::nf4_linear_cublaslt(handle_, w.m, x.as<__nv_bfloat16>(), ldx, c.T, y.as<__nv_bfloat16>(), ldy,
                                scratch.as<__nv_bfloat16>(), workspace_->p, kWorkspace, nullptr);
      ok(cudaDeviceSynchronize(), "linear");
    }
    ok(cudaDeviceSynchronize(), "linear");
    ok(cudaMemcpy(y_host.data(), y.p, y_host.size() * 2, cudaMemcpyDeviceToHost), "download");
    const auto ref = reference_linear(xs, c.T, c.in, w_deq, c.out);
    double max_err = 0, max_ref = 0;
    int64_t touched = 0;
    for (int64_t t = 0; t < c.T; ++t)
      for (int64_t o = 0; o < ldy; ++o) {
        const uint16_t got = y_host[t * ldy + o];
        if (o >= c.out) {
          touched += got != 0xFFFF;
          continue;
        }
        const double g = bf16_to_f32(got), r = ref[t * c.out + o];
        max_err = std::max(max_err, std::isfinite(g) ? std::fabs(g - r) : INFINITY);
        max_ref = std::max(max_ref, std::fabs(r));
      }
    EXPECT_EQ(touched, 0) << "padding columns of y were written";
    return max_err / max_ref;
  }

  static constexpr size_t kWorkspace = size_t(32) << 20;
  cublasLtHandle_t handle_ = nullptr;
  std::unique_ptr<DevBuf> workspace_;
};

// Tolerance: the output is rounded to bf16 (relative 2^-9 of each value, at most 0.2% of max|y|); float32
// accumulation in another order adds far less at these lengths. 4e-3 of max|y| leaves room for both.
constexpr double kLinearTolerance = 4e-3;

const LinearCase kLinearCases[] = {
    {1, 64, 40, 64, false, 0, 0},      {7, 4096, 128, 64, true, 0, 0},   {77, 256, 1000, 64, true, 8, 3},
    {333, 1024, 333, 128, false, 0, 0}, {64, 512, 64, 32, true, 16, 0},  {129, 4096, 4096, 64, true, 0, 0},
    {2, 128, 4097, 256, false, 0, 1},
};

TEST_F(Nf4CudaLinear, CublasLtPathMatchesReference) {
  for (const auto& c : kLinearCases) {
    SCOPED_TRACE(testing::Message() << "T " << c.T << " in " << c.in << " out " << c.out);
    EXPECT_LE(run(c, false), kLinearTolerance);
  }
}

TEST_F(Nf4CudaLinear, FusedKernelMatchesReference) {
  for (const auto& c : kLinearCases) {
    SCOPED_TRACE(testing::Message() << "T " << c.T << " in " << c.in << " out " << c.out);
    EXPECT_LE(run(c, true), kLinearTolerance);
  }
}

TEST_F(Nf4CudaLinear, FusedKernelRefusesUnsupportedShapes) {
  const auto wf = normal(40 * 96, 1, 0.02f);
  const Nf4Tensor q = quantize_nf4(wf.data(), 40 * 96, 64, false);
  DeviceNf4 w(q, 40, 96);
  DevBuf x(size_t(96) * 2 * 4), y(size_t(40) * 2 * 4);
  EXPECT_FALSE(cuda::nf4_fused_gemm_supported(w.m, x.as<__nv_bfloat16>(), 96));
  EXPECT_THROW(cuda::launch_nf4_fused_gemm(w.m, x.as<__nv_bfloat16>(), 96, 4, y.as<__nv_bfloat16>(), 40, nullptr),
               Error);
}

// T5-XXL's linears at a 512-token prompt: both paths, timed with events after a warm-up.
TEST_F(Nf4CudaLinear, TimingT5Size) {
  struct Shape3 {
    const char* what;
    int64_t out, in;
  };
  const Shape3 shapes[] = {{"qkv 4096 -> 12288", 12288, 4096}, {"wi  4096 -> 20480", 20480, 4096},
                           {"wo 10240 -> 4096", 4096, 10240}};
  for (const auto& s : shapes) {
    const auto wf = normal(s.out * s.in, 9, 0.02f);
    const Nf4Tensor q = quantize_nf4(wf.data(), s.out * s.in, 64, true);
    DeviceNf4 w(q, s.out, s.in);
    for (int64_t T : {512, 16}) {
      DevBuf x(size_t(T * s.in) * 2), y(size_t(T * s.out) * 2), scratch(size_t(s.out * s.in) * 2);
      ok(cudaMemset(x.p, 0x3c, x.bytes), "memset");  // bf16 0x3c3c ~ 0.0115: finite input
      cudaEvent_t e0, e1;
      cudaEventCreate(&e0);
      cudaEventCreate(&e1);
      auto time_ms = [&](const std::function<void()>& fn) {
        for (int i = 0; i < 3; ++i) fn();
        cudaEventRecord(e0);
        const int reps = 20;
        for (int i = 0; i < reps; ++i) fn();
        cudaEventRecord(e1);
        cudaEventSynchronize(e1);
        float ms = 0;
        cudaEventElapsedTime(&ms, e0, e1);
        return double(ms) / reps;
      };
      const double dq_ms = time_ms([&] { cuda::launch_nf4_dequantize(w.m, scratch.as<__nv_bfloat16>(), s.in, nullptr); });
      const double lt_ms = time_ms([&] {
        cuda::nf4_linear_cublaslt(handle_, w.m, x.as<__nv_bfloat16>(), s.in, T, y.as<__nv_bfloat16>(), s.out,
                                  scratch.as<__nv_bfloat16>(), workspace_->p, kWorkspace, nullptr);
      });
      const double fu_ms = time_ms([&] {
        cuda::launch_nf4_fused_gemm(w.m, x.as<__nv_bfloat16>(), s.in, T, y.as<__nv_bfloat16>(), s.out, nullptr);
      });
      ok(cudaDeviceSynchronize(), "timing");
      const double flop = 2.0 * double(T) * double(s.in) * double(s.out);
      std::printf("[ timing   ] nf4 T %4lld %s: dequant %.3f ms (%.0f GB/s written), dequant+cuBLASLt %.3f ms "
                  "(%.0f TFLOP/s), fused %.3f ms (%.0f TFLOP/s)\n",
                  (long long)T, s.what, dq_ms, double(s.out * s.in) * 2 / dq_ms * 1e-6, lt_ms, flop / lt_ms * 1e-9,
                  fu_ms, flop / fu_ms * 1e-9);
      cudaEventDestroy(e0);
      cudaEventDestroy(e1);
    }
  }
}

}  // namespace
}  // namespace fluxswap
