#pragma once
// y = act(x w^T + bias) on cuBLASLt: bf16 operands, float32 accumulation (CUBLAS_COMPUTE_32F), bias and GELU
// fused as epilogues. Row-major rows map onto cuBLASLt's column-major view as y^T = w x^T, so the leading
// dimensions are the row strides and column slices of wider buffers need no copies.
//
// The plan (descriptors, heuristic algorithm) for each shape, stride, alignment and epilogue is made on its first
// use and cached; the 32 MiB workspace is allocated once. Making a plan while a CUDA graph is being captured is an
// error: run the work once eagerly first.
#include <cublasLt.h>
#include <cuda_runtime.h>

#include <map>
#include <memory>

#include "backend/cuda/device_memory.h"

namespace fluxswap::cuda {

enum class GemmEpilogue { None, Bias, Gelu, GeluBias };

struct GemmRows {
  void* p;
  int64_t B, N, sb, sn;  // [B, N, width] rows
};

class CublasLtLinear {
 public:
  explicit CublasLtLinear(DeviceMemory& memory);
  ~CublasLtLinear();
  CublasLtLinear(const CublasLtLinear&) = delete;
  CublasLtLinear& operator=(const CublasLtLinear&) = delete;

  // x rows [B, N, K], w [nout, K] contiguous, bias [nout] (or null), y rows [B, N, nout]; all bf16.
  void run(const GemmRows& x, const void* w, const void* bias, const GemmRows& y, int64_t K, int64_t nout,
           GemmEpilogue epilogue, bool capturing, cudaStream_t stream);

 private:
  // Column-major problem: D[m, n] = op(A)[m, k] B[k, n], batched over `batch` with the given B and D strides.
  struct Key {
    int64_t m, n, k, ldb, ldd, batch, stride_b, stride_d;
    int epilogue, align_a, align_b, align_d, align_bias;
    auto operator<=>(const Key&) const = default;
  };
  struct Plan;
  Plan& plan_for(const Key& key, const void* bias, bool capturing);

  cublasLtHandle_t handle_ = nullptr;
  std::shared_ptr<void> workspace_;
  size_t workspace_bytes_;
  std::map<Key, std::unique_ptr<Plan>> plans_;
};

}  // namespace fluxswap::cuda
