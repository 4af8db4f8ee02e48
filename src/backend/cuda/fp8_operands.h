#pragma once
// Operand checks and helpers the CUDA backend's FP8 ops share (cuda_fp8_ops.cpp, cuda_residual_ops.cpp): e4m3 rows
// as the GEMMs read them, their row scales, the FP8 GEMM made on first use, and profiling names by shape.
#include <memory>
#include <string>

#include "backend/cuda/cuda_backend.h"

namespace fluxswap::cuda {

inline void check_fp8_rows(const Tensor& q, const Tensor& scale, int64_t cols, const char* op, const char* what) {
  check_cuda_tensor(q, op, what, DType::F8_E4M3);
  if (q.ndim() != 2 || q.size(1) != cols || q.stride(1) != 1)
    bad(op, std::string(what) + " must be [rows, " + std::to_string(cols) + "] with contiguous rows, got " +
                shape_str(q.shape()));
  check_cuda_tensor(scale, op, "scales", DType::F32);
  if (scale.ndim() != 1 || scale.size(0) != q.size(0) || !scale.is_contiguous())
    bad(op, "scales must be F32 [" + std::to_string(q.size(0)) + "], got " + shape_str(scale.shape()));
}

// e4m3 rows [B, N, C] on the device ([rows, C] is one batch), contiguous last dimension; strides in bytes.
struct Fp8RowsView {
  uint8_t* p;
  int64_t B, N, C, sb, sn;
};
inline Fp8RowsView fp8_rows_view(const Tensor& t, const char* op, const char* what) {
  check_cuda_tensor(t, op, what, DType::F8_E4M3);
  if ((t.ndim() != 2 && t.ndim() != 3) || t.stride(-1) != 1)
    bad(op, std::string(what) + " must be 2-D or 3-D e4m3 rows with a contiguous last dimension, got " +
                shape_str(t.shape()));
  auto* p = static_cast<uint8_t*>(t.data());
  if (t.ndim() == 3) return {p, t.size(0), t.size(1), t.size(2), t.size(0) == 1 ? 0 : t.stride(0), t.stride(1)};
  return {p, 1, t.size(0), t.size(1), 0, t.stride(0)};
}

inline void check_row_scales(const Tensor& s, int64_t rows, const char* op, const char* what) {
  check_cuda_tensor(s, op, what, DType::F32);
  if (s.ndim() != 1 || s.size(0) != rows || !s.is_contiguous())
    bad(op, std::string(what) + " must be F32 [" + std::to_string(rows) + "] contiguous, got " + shape_str(s.shape()));
}

// An FP8 product's operands: quantised rows X of xq (row scales x_scale) times wq^T (scales w_scale) into rows Y of y,
// with an optional bias [nout].
inline void check_fp8_quantized_product(const Fp8RowsView& X, const Tensor& xq, const Tensor& x_scale,
                                        const Tensor& wq, const Tensor& w_scale, const Tensor& bias,
                                        const RowsView& Y, const Tensor& y, const char* op) {
  const int64_t nout = wq.size(0);
  check_fp8_rows(wq, w_scale, X.C, op, "weight");
  check_row_scales(x_scale, X.B * X.N, op, "input scales");
  if (Y.C != nout || X.B != Y.B || X.N != Y.N)
    bad(op, shape_str(xq.shape()) + " x " + shape_str(wq.shape()) + "^T -> " + shape_str(y.shape()));
  check_bias(bias, nout, op);
}

// Made on first use: it refuses GPUs below sm_89, and its plans need eager runs before any recording.
inline CublasLtFp8Linear& fp8_gemm(std::unique_ptr<CublasLtFp8Linear>& fp8, DeviceMemory& memory, bool fast_accum,
                            bool capturing, const char* op) {
  if (!fp8) {
    if (capturing) bad(op, "the first FP8 linear must run before recording");
    Fp8LinearOptions options;
    options.fast_accum = fast_accum;
    fp8 = std::make_unique<CublasLtFp8Linear>(memory, options);
  }
  return *fp8;
}

// While profiling, FP8 GEMMs are told apart by shape, as in linear().
inline std::string gemm_key(bool profiling, const char* op, int64_t rows, int64_t nout, int64_t k) {
  if (!profiling) return op;
  return std::string(op) + " " + std::to_string(rows) + "x" + std::to_string(nout) + "x" + std::to_string(k);
}

}  // namespace fluxswap::cuda
