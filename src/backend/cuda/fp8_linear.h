#pragma once
// y = act((xq wq^T) * (sx outer sw) + bias) on cuBLASLt with e4m3 operands: xq [T, K] and wq [nout, K] hold e4m3
// codes with one float32 scale per row (sx per token, sw per output feature; fp8_quant_kernels.h makes them), y is
// bf16 [T, nout] at any row stride. Accumulation is float32 (CUBLAS_COMPUTE_32F).
//
// cuBLASLt's column-major view is the one CublasLtLinear uses: A = wq as [K, nout] (transposed by the op), B = xq^T
// as [K, T], D = y^T as [nout, T]. That is the "TN" layout, the only one cuBLASLt runs FP8 in.
//
// Three ways to apply the scales, chosen per problem on its first run and cached with its plan:
//  - OuterVec: cuBLASLt's outer-vector scaling (CUBLASLT_MATMUL_MATRIX_SCALE_OUTER_VEC_32F: A scale = sw,
//    length nout; B scale = sx, length T) with bias and GELU fused as cuBLASLt epilogues. One kernel.
//  - OuterVecThenEpilogue: outer-vector scaling without a cuBLASLt epilogue, then bias/GELU by a small kernel in
//    place; for when no algorithm combines the two.
//  - Fallback: no scales in cuBLASLt (the unscaled accumulator goes to y as bf16), then one kernel applies
//    sx, sw, bias and GELU in place. For GPUs and cuBLASLt versions without outer-vector scaling (sm_89).
// A path counts as available when the heuristic offers an algorithm and the first cublasLtMatmul with it accepts
// the problem (cuBLASLt reports some unsupported scale combinations only when the product is issued).
//
// Plans are made on first use and cached per shape, stride, alignment and epilogue; making one while a CUDA graph
// is being captured is an error (run the work once eagerly first), as in CublasLtLinear.
#include <cublasLt.h>
#include <cuda_runtime.h>

#include <map>
#include <memory>
#include <string>

#include "backend/cuda/cublaslt_linear.h"
#include "backend/cuda/device_memory.h"

namespace fluxswap::cuda {

// Whether cuBLASLt can run FP8 GEMMs on `device` (compute capability 8.9 or newer); `why` says why not.
bool fp8_gemm_supported(int device, std::string* why = nullptr);

// e4m3 rows [rows, K] at row stride ld (bytes), with one float32 scale per row.
struct Fp8Rows {
  const void* q;
  int64_t ld;
  const float* scale;
};

// (Outside the class: a nested struct with default member initialisers cannot be a default argument in it.)
struct Fp8LinearOptions {
  bool force_fallback = false;  // always take the Fallback path (tests, comparisons)
  // CUBLASLT_MATMUL_DESC_FAST_ACCUM: Hopper keeps partial sums in the tensor cores' reduced-precision accumulator
  // instead of promoting them to float32 periodically. Faster, less accurate over long K.
  bool fast_accum = false;
};

enum class Fp8GemmPath { OuterVec, OuterVecThenEpilogue, Fallback };
const char* fp8_gemm_path_name(Fp8GemmPath path);

class CublasLtFp8Linear {
 public:
  using Options = Fp8LinearOptions;

  // Owns a cuBLASLt handle and a 32 MiB workspace allocated from `memory`. Throws Error on a device below sm_89.
  explicit CublasLtFp8Linear(DeviceMemory& memory, Options options = {});
  // Borrows a handle and workspace (they must outlive this object; work sharing the workspace must be on the same
  // stream). Throws Error on a device below sm_89.
  CublasLtFp8Linear(cublasLtHandle_t handle, void* workspace, size_t workspace_bytes, Options options = {});
  ~CublasLtFp8Linear();
  CublasLtFp8Linear(const CublasLtFp8Linear&) = delete;
  CublasLtFp8Linear& operator=(const CublasLtFp8Linear&) = delete;

  // y[T, nout] (bf16, row stride ldy) = act((x.q · w.q^T) * (x.scale[t] * w.scale[o]) + bias[o]).
  // Requirements of cuBLASLt's FP8 kernels, checked here: K, x.ld and w.ld multiples of 16, x.q and w.q 16-byte
  // aligned, nout and ldy multiples of 8, y 16-byte aligned. bias (bf16 [nout]) is given exactly when the epilogue
  // has one (Bias, GeluBias). `op` names the backend op in errors.
  void run(const Fp8Rows& x, const Fp8Rows& w, const void* bias, void* y, int64_t ldy, int64_t T, int64_t K,
           int64_t nout, GemmEpilogue epilogue, bool capturing, cudaStream_t stream, const char* op = "linear_fp8");

  // A gated output projection added onto the residual in the same call: acc[T, nout] (bf16, row stride ld, updated
  // in place) += (x.q · w.q^T) * (x.scale[t] * w.scale[o]) + bias[o], where w.scale and bias are the projection's
  // per-step factors (its weight scales and bias times the gate: launch_gated_output_factors). acc is read as the
  // product's C (beta 1) and written as its D. Only on the outer-vector path with cuBLASLt's bias epilogue; returns
  // false, having issued nothing, where cuBLASLt has no algorithm for it (found on the shape's first call, before
  // any recording, and remembered). Requirements as run().
  bool run_residual(const Fp8Rows& x, const Fp8Rows& w, const void* bias, void* acc, int64_t ld, int64_t T, int64_t K,
                    int64_t nout, bool capturing, cudaStream_t stream, const char* op = "linear_fp8_residual");

  // The path the last run() took (for tests and benchmarks).
  Fp8GemmPath last_path() const { return last_path_; }
  const Options& options() const { return options_; }

 private:
  struct Key {
    int64_t m, n, k, ldx, ldw, ldy;
    int epilogue, align_x, align_w, align_y, align_bias, align_sx, align_sw;
    bool residual;
    auto operator<=>(const Key&) const = default;
  };
  struct Plan;
  struct Pointers;
  std::unique_ptr<Plan> make_plan(const Key& key, Fp8GemmPath path, const Pointers& ptr, const char* op);
  std::unique_ptr<Plan> first_plan(const Key& key, Fp8GemmPath from, const Pointers& ptr, const char* op);
  // run() and run_residual(): false only for a residual product cuBLASLt cannot do.
  bool issue(const Fp8Rows& x, const Fp8Rows& w, const void* bias, void* y, int64_t ldy, int64_t T, int64_t K,
             int64_t nout, GemmEpilogue epilogue, bool residual, bool capturing, cudaStream_t stream, const char* op);

  Options options_;
  cublasLtHandle_t handle_ = nullptr;
  bool own_handle_ = false;
  std::shared_ptr<void> own_workspace_;
  void* workspace_ = nullptr;
  size_t workspace_bytes_ = 0;
  std::map<Key, std::unique_ptr<Plan>> plans_;  // null: a residual product cuBLASLt has no algorithm for
  Fp8GemmPath last_path_ = Fp8GemmPath::Fallback;
};

}  // namespace fluxswap::cuda
