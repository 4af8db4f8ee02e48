// The FP8 ops of the CUDA backend: per-row e4m3 quantisation and the FP8 linear (activations quantised per token
// on the fly, cuBLASLt with per-row scales on both sides).
#include "backend/cuda/cuda_backend.h"
#include "backend/cuda/fp8_gemv.h"
#include "backend/cuda/fp8_quant_kernels.h"

namespace fluxswap::cuda {

namespace {

// Rows as one matrix: [B, N, C] whose batches follow each other at the row stride, or a single batch.
struct Matrix {
  const void* p;
  int64_t rows, ld;
};
Matrix as_matrix(const RowsView& r, const char* op, const char* what) {
  if (r.B != 1 && r.sb != r.N * r.sn) bad(op, std::string(what) + " rows must be evenly strided across the batch");
  return {r.p, r.B * r.N, r.sn};
}

void check_fp8_rows(const Tensor& q, const Tensor& scale, int64_t cols, const char* op, const char* what) {
  check_cuda_tensor(q, op, what, DType::F8_E4M3);
  if (q.ndim() != 2 || q.size(1) != cols || q.stride(1) != 1)
    bad(op, std::string(what) + " must be [rows, " + std::to_string(cols) + "] with contiguous rows, got " +
                shape_str(q.shape()));
  check_cuda_tensor(scale, op, "scales", DType::F32);
  if (scale.ndim() != 1 || scale.size(0) != q.size(0) || !scale.is_contiguous())
    bad(op, "scales must be F32 [" + std::to_string(q.size(0)) + "], got " + shape_str(scale.shape()));
}

}  // namespace

void CudaBackend::quantize_fp8_rows(const Tensor& x, const Tensor& q, const Tensor& scale) {
  const char* op = "quantize_fp8_rows";
  const Matrix X = as_matrix(rows_of(x, op, "input"), op, "input");
  check_fp8_rows(q, scale, x.size(-1), op, "output");
  if (q.size(0) != X.rows) bad(op, "output must have the input's " + std::to_string(X.rows) + " rows");
  timed(op, [&] {
    launch_quantize_rows_e4m3(static_cast<const __nv_bfloat16*>(X.p), X.ld, X.rows, x.size(-1),
                              static_cast<uint8_t*>(q.data()), q.stride(0), scale.ptr<float>(), stream(), op);
  });
}

void CudaBackend::set_fp8_fast_accumulation(bool on) {
  if (on == fp8_fast_accum_) return;
  if (capturing_) bad("set_fp8_fast_accumulation", "cannot change while recording");
  fp8_fast_accum_ = on;
  fp8_.reset();  // plans are made with the option
}

void CudaBackend::linear_fp8(const Tensor& x, const Tensor& wq, const Tensor& w_scale, const Tensor& bias,
                             const Tensor& y, Activation act) {
  const char* op = "linear_fp8";
  const RowsView X = rows_of(x, op, "input"), Y = rows_of(y, op, "output");
  const int64_t K = X.C, nout = wq.size(0);
  check_fp8_rows(wq, w_scale, K, op, "weight");
  if (Y.C != nout || X.B != Y.B || X.N != Y.N)
    bad(op, shape_str(x.shape()) + " x " + shape_str(wq.shape()) + "^T -> " + shape_str(y.shape()));
  check_bias(bias, nout, op);
  if (!fp8_) {
    if (capturing_) bad(op, "the first FP8 linear must run before recording");
    cuda::Fp8LinearOptions options;
    options.fast_accum = fp8_fast_accum_;
    fp8_ = std::make_unique<cuda::CublasLtFp8Linear>(memory_, options);
  }
  // A few rows (the modulation linears' conditioning vectors): stream the weights instead of tiling a GEMM.
  const bool gemv = act == Activation::None && (X.B == 1 || X.sb == X.N * X.sn) && (Y.B == 1 || Y.sb == Y.N * Y.sn) &&
                    cuda::fp8_gemv_fits(X.B * X.N, K) && wq.stride(0) % 16 == 0 &&
                    reinterpret_cast<uintptr_t>(wq.data()) % 16 == 0 && X.sn % 8 == 0 &&
                    reinterpret_cast<uintptr_t>(X.p) % 16 == 0;
  if (gemv) {
    timed("linear_fp8 gemv", [&] {
      cuda::launch_fp8_gemv(X.p, X.sn, X.B * X.N, K, static_cast<const uint8_t*>(wq.data()), wq.stride(0),
                            w_scale.ptr<float>(), bias.defined() ? bias.ptr<__nv_bfloat16>() : nullptr, nout, Y.p,
                            Y.sn, stream());
    });
    return;
  }
  // One product over all rows when the batches follow each other at the row stride on both sides; else one per
  // batch (a stream's rows inside the [B, text + image, D] buffer).
  const bool one = X.B == 1 || (X.sb == X.N * X.sn && Y.sb == Y.N * Y.sn);
  const int64_t parts = one ? 1 : X.B, rows = one ? X.B * X.N : X.N;
  // The activations' e4m3 copy: rows padded to 16 bytes, as cuBLASLt's FP8 kernels want.
  const int64_t ldq = (K + 15) / 16 * 16;
  if (fp8_act_.empty() || fp8_act_.back().numel() < rows * ldq || fp8_act_scale_.back().numel() < rows) {
    if (capturing_) bad(op, "a recording needs larger FP8 activation buffers: run the work once eagerly first");
    fp8_act_.push_back(empty(DType::F8_E4M3, {rows * ldq}));
    fp8_act_scale_.push_back(empty(DType::F32, {rows}));
  }
  auto* q = static_cast<uint8_t*>(fp8_act_.back().data());
  float* sx = fp8_act_scale_.back().ptr<float>();
  const cuda::GemmEpilogue epilogue = epilogue_for(bias, act);
  const std::string key = profiler_.enabled() ? "linear_fp8 " + std::to_string(X.B * X.N) + "x" +
                                                    std::to_string(nout) + "x" + std::to_string(K)
                                              : std::string(op);
  timed(key.c_str(), [&] {
    for (int64_t b = 0; b < parts; ++b) {
      const __nv_bfloat16* xb = X.p + b * X.sb;
      launch_quantize_rows_e4m3(xb, X.sn, rows, K, q, ldq, sx, stream(), op);
      fp8_->run({q, ldq, sx}, {wq.data(), wq.stride(0), w_scale.ptr<float>()}, bias.data(), Y.p + b * Y.sb, Y.sn,
                rows, K, nout, epilogue, capturing_, stream(), op);
    }
    if (act == Activation::Silu || act == Activation::QuickGelu) cuda::launch_activation(Y, act, Y, stream());
  });
}

}  // namespace fluxswap::cuda
