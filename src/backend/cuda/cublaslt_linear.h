#pragma once
// y = act(x w^T + bias) on cuBLASLt: bf16 operands, float32 accumulation (CUBLAS_COMPUTE_32F), bias and GELU
// fused as epilogues. Row-major rows map onto cuBLASLt's column-major view as y^T = w x^T, so the leading
// dimensions are the row strides and column slices of wider buffers need no copies. The same plans serve the
// general products the LoRA and attention ops need (matmul()), and an accumulating form (D += ...) of both.
//
// The plan (descriptors, heuristic algorithm) for each shape, stride, alignment and epilogue is made on its first
// use and cached; the 32 MiB workspace is allocated once. Making a plan while a CUDA graph is being captured is an
// error: run the work once eagerly first.
#include <cublasLt.h>
#include <cuda_runtime.h>

#include <map>
#include <memory>
#include <vector>

#include "backend/cuda/device_memory.h"

namespace fluxswap::cuda {

enum class GemmEpilogue { None, Bias, Gelu, GeluBias };

struct GemmRows {
  void* p;
  int64_t B, N, sb, sn;  // [B, N, width] rows
};

// One product in cuBLASLt's column-major terms, over `batch` matrices at the given strides (elements):
//   D[m, n] = alpha * op(A)[m, k] * B[k, n] (+ C when accumulate), then the epilogue (bias [m], GELU).
// C is D unless `c` is given: a matrix of D's layout read in its place, so a sum onto another matrix needs no copy.
// A is stored [k, m] when trans_a (op(A) = A^T), else [m, k]; B is stored [k, n]. A and B are bf16; D is bf16, or
// float32 when f32_out (no epilogue then). With accumulate the epilogue sees the sum: act(alpha A B + D + bias).
struct Matmul {
  bool trans_a = false;
  int64_t m = 0, n = 0, k = 0, batch = 1;
  const void* a = nullptr;
  int64_t lda = 0, stride_a = 0;
  const void* b = nullptr;
  int64_t ldb = 0, stride_b = 0;
  void* d = nullptr;
  int64_t ldd = 0, stride_d = 0;
  const void* c = nullptr;
  bool f32_out = false, accumulate = false;
  float alpha = 1.0f;
  GemmEpilogue epilogue = GemmEpilogue::None;
  const void* bias = nullptr;
};

class CublasLtLinear {
 public:
  explicit CublasLtLinear(DeviceMemory& memory);
  ~CublasLtLinear();
  CublasLtLinear(const CublasLtLinear&) = delete;
  CublasLtLinear& operator=(const CublasLtLinear&) = delete;

  // x rows [B, N, K], w [nout, K] with row stride ldw (0: K), bias [nout] (or null), y rows [B, N, nout]; all
  // bf16. With accumulate, y = act(x w^T + y + bias). `op` names the backend op in errors.
  void run(const GemmRows& x, const void* w, const void* bias, const GemmRows& y, int64_t K, int64_t nout,
           GemmEpilogue epilogue, bool capturing, cudaStream_t stream, bool accumulate = false,
           const char* op = "linear", int64_t ldw = 0);

  void matmul(const Matmul& mm, bool capturing, cudaStream_t stream, const char* op);

  // Device memory of at least `bytes` for intermediates between GEMMs (attention scores). It grows only outside
  // recordings; a buffer it outgrows stays allocated, because a recording may still write it.
  void* scratch(size_t bytes, bool capturing, const char* op);

 private:
  struct Key {
    int64_t m, n, k, lda, ldb, ldd, batch, stride_a, stride_b, stride_d;
    int trans_a, f32_out, epilogue, align_a, align_b, align_d, align_bias;
    auto operator<=>(const Key&) const = default;
  };
  struct Plan;
  Plan& plan_for(const Key& key, const void* bias, bool capturing, const char* op);

  DeviceMemory& memory_;
  cublasLtHandle_t handle_ = nullptr;
  std::shared_ptr<void> workspace_;
  size_t workspace_bytes_;
  std::map<Key, std::unique_ptr<Plan>> plans_;
  std::vector<std::shared_ptr<void>> scratch_;  // the last one is the largest
  size_t scratch_bytes_ = 0;
};

}  // namespace fluxswap::cuda
