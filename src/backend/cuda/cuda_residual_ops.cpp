// A block's FP8 output projection added onto the residual inside its GEMM, on the CUDA backend: x += gate * (the
// projection), the gate folded into cuBLASLt's outer-vector weight scales (per output feature) and the bias times the
// gate into the bias epilogue, with x read as the product's C (beta 1) and written as its D. The branch is then neither
// written nor read again by the next LayerNorm. A step's factors are made in two launches after its modulations
// (gated_output_factors); an op given none makes its own. Where cuBLASLt has no algorithm for the form (found on its
// first call, before any recording; sm_89 has no outer-vector scaling), the composition runs and the form is not
// offered again; FLUXSWAP_FUSED_RESIDUAL=0 turns it off (comparisons).
#include <algorithm>
#include <cstdlib>
#include <functional>
#include <string>

#include "backend/cuda/cuda_backend.h"
#include "backend/cuda/fp8_operands.h"
#include "backend/cuda/fp8_quant_kernels.h"

namespace fluxswap::cuda {

namespace {

bool fused_residual_wanted() {
  static const bool wanted = [] {
    const char* env = std::getenv("FLUXSWAP_FUSED_RESIDUAL");
    return !(env && std::string(env) == "0");
  }();
  return wanted;
}

// The factors' outputs, scale (F32) and bias_out (bf16, with a bias), as [B, n] contiguous: checked for shape only
// (the caller pairs them with their gate, weight and bias).
void check_factor_outputs(const Backend::GatedFactors& f, int64_t B, int64_t n, bool bias, const char* op) {
  const std::string shape = "[" + std::to_string(B) + ", " + std::to_string(n) + "] contiguous";
  check_cuda_tensor(f.scale, op, "scale", DType::F32);
  if (f.scale.shape() != Shape{B, n} || !f.scale.is_contiguous()) bad(op, "scale must be F32 " + shape);
  if (bias) {
    check_cuda_tensor(f.bias_out, op, "bias_out", DType::BF16);
    if (f.bias_out.shape() != Shape{B, n} || !f.bias_out.is_contiguous()) bad(op, "bias_out must be " + shape);
  }
}

// The factor kernel's item for gate rows G, weight scales and bias (undefined: none), written to scale and bias_out.
GatedFactorsItem factors_item(const VecsView& G, const Tensor& w_scale, const Tensor& bias, float* scale,
                              __nv_bfloat16* bias_out) {
  return {G.p, G.sb, w_scale.ptr<float>(), bias.defined() ? bias.ptr<__nv_bfloat16>() : nullptr, scale,
          bias.defined() ? bias_out : nullptr, G.C};
}

// Samples from..B-1 of rows [B, N, C] or per-sample vectors [B, C] (2-D rows are one sample: `from` is 0 there).
Tensor from_sample(const Tensor& t, int64_t from, int64_t B) { return from ? t.narrow(0, from, B - from) : t; }

}  // namespace

bool CudaBackend::fp8_residual_in_gemm() const { return fused_residual_wanted() && !fp8_residual_refused_; }

void CudaBackend::gated_output_factors(const std::vector<GatedFactors>& items) {
  const char* op = "gated_output_factors";
  std::vector<GatedFactorsItem> descs;
  int64_t B = -1;
  for (const GatedFactors& f : items) {
    const VecsView G = vecs_of(f.gate, op, "gate");
    const int64_t n = G.C;
    if (B >= 0 && G.B != B) bad(op, "every gate must have the same batch");
    B = G.B;
    check_cuda_tensor(f.w_scale, op, "w_scale", DType::F32);
    if (f.w_scale.numel() != n || !f.w_scale.is_contiguous())
      bad(op, "w_scale must be F32 [" + std::to_string(n) + "]");
    check_bias(f.bias, n, op);
    check_factor_outputs(f, B, n, f.bias.defined(), op);
    descs.push_back(factors_item(G, f.w_scale, f.bias, f.scale.ptr<float>(),
                                 f.bias.defined() ? f.bias_out.ptr<__nv_bfloat16>() : nullptr));
  }
  timed(op, [&] {
    for (size_t first = 0; first < descs.size(); first += kGatedFactorsPerLaunch) {
      GatedFactorsBatch batch{};
      batch.B = B;
      for (size_t i = first; i < descs.size() && i < first + kGatedFactorsPerLaunch; ++i) {
        batch.item[batch.n_items++] = descs[i];
        batch.max_n = std::max(batch.max_n, descs[i].n);
      }
      launch_gated_output_factors(batch, stream(), op);
    }
  });
}

int64_t CudaBackend::gated_residual_products(const RowsView& R, const VecsView& G, const Tensor& w_scale,
                                             const Tensor& bias, const GatedFactors& ready,
                                             const GatedProduct& product, const char* op) {
  const int64_t nout = R.C;
  // cuBLASLt writes the bf16 rows 16-byte aligned only: other rows take the composition.
  if (reinterpret_cast<uintptr_t>(R.p) % 16 || R.sn % 8 || (R.B > 1 && R.sb % 8) || nout % 8) return 0;
  if (ready.scale.defined()) check_factor_outputs(ready, R.B, nout, bias.defined(), op);
  float* scale = ready.scale.defined() ? ready.scale.ptr<float>() : nullptr;
  auto* gated_bias = bias.defined() && ready.scale.defined() ? ready.bias_out.ptr<__nv_bfloat16>() : nullptr;
  if (!scale) {
    // None ready: every sample's factors made here, into scratch that a later op rewrites in stream order.
    if (gated_scratch_scale_.empty() || gated_scratch_scale_.back().numel() < R.B * nout) {
      if (capturing_) bad(op, "a recording needs larger gated-factor buffers: run the work once eagerly first");
      gated_scratch_scale_.push_back(empty(DType::F32, {R.B * nout}));
      gated_scratch_bias_.push_back(empty(DType::BF16, {R.B * nout}));
    }
    scale = gated_scratch_scale_.back().ptr<float>();
    gated_bias = bias.defined() ? gated_scratch_bias_.back().ptr<__nv_bfloat16>() : nullptr;
    GatedFactorsBatch one{};
    one.item[0] = factors_item(G, w_scale, bias, scale, gated_bias);
    one.n_items = 1, one.B = R.B, one.max_n = nout;
    launch_gated_output_factors(one, stream(), op);
  }
  // One product per sample (each has its own gate). Samples may differ in their pointers' alignment, and so in their
  // plans: one refused after others were added leaves the rest to the caller.
  for (int64_t b = 0; b < R.B; ++b)
    if (!product(b, scale + b * nout, gated_bias ? gated_bias + b * nout : nullptr)) return b;
  return R.B;
}

void CudaBackend::linear_fp8_quantized_residual(const Tensor& xq, const Tensor& x_scale, const Tensor& wq,
                                                const Tensor& w_scale, const Tensor& bias, const Tensor& gate,
                                                const Tensor& x, const Tensor& branch, const GatedFactors& ready) {
  const char* op = "linear_fp8_quantized_residual";
  const Fp8RowsView X = fp8_rows_view(xq, op, "input");
  const RowsView R = rows_of(x, op, "residual");
  const VecsView G = vecs_of(gate, op, "gate");
  const int64_t K = X.C, nout = wq.size(0);
  check_fp8_quantized_product(X, xq, x_scale, wq, w_scale, bias, R, x, op);
  check_vecs_fit(G, R, op, "gate");
  CublasLtFp8Linear& gemm = fp8_gemm(fp8_, memory_, fp8_fast_accum_, capturing_, op);
  int64_t done = 0;
  if (fp8_residual_in_gemm())
    timed(gemm_key(profiler_.enabled(), op, X.B * X.N, nout, K).c_str(), [&] {
      done = gated_residual_products(R, G, w_scale, bias, ready, [&](int64_t b, float* scale, void* gated_bias) {
        // cuBLASLt takes outer-vector scales 16-byte aligned: a later sample's row scales are not when N is not a
        // multiple of 4. Those samples are composed, and the form stays offered to every other call.
        const float* row_scales = x_scale.ptr<float>() + b * X.N;
        if (reinterpret_cast<uintptr_t>(row_scales) % 16) return false;
        const bool ok = gemm.run_residual({X.p + b * X.sb, X.sn, row_scales},
                                          {wq.data(), wq.stride(0), scale}, gated_bias, R.p + b * R.sb, R.sn, R.N, K,
                                          nout, capturing_, stream(), op);
        // The form itself is refused when the first sample is (sm_89 has no outer-vector scaling); a later sample's
        // pointers may only ask for another plan, and that sample is composed.
        fp8_residual_refused_ = fp8_residual_refused_ || (!ok && b == 0);
        return ok;
      }, op);
    });
  if (done < R.B)
    Backend::linear_fp8_quantized_residual(from_sample(xq, done, R.B),
                                           done ? x_scale.narrow(0, done * X.N, (R.B - done) * X.N) : x_scale, wq,
                                           w_scale, bias, from_sample(gate, done, R.B), from_sample(x, done, R.B),
                                           from_sample(branch, done, R.B), GatedFactors{});
}

void CudaBackend::linear_fp8_residual(const Tensor& in, const Tensor& wq, const Tensor& w_scale, const Tensor& bias,
                                      const Tensor& gate, const Tensor& x, const Tensor& branch,
                                      const GatedFactors& ready) {
  const char* op = "linear_fp8_residual";
  const RowsView I = rows_of(in, op, "input"), R = rows_of(x, op, "residual");
  const VecsView G = vecs_of(gate, op, "gate");
  const int64_t K = I.C, nout = wq.size(0);
  check_fp8_rows(wq, w_scale, K, op, "weight");
  if (R.C != nout || I.B != R.B || I.N != R.N)
    bad(op, shape_str(in.shape()) + " x " + shape_str(wq.shape()) + "^T -> " + shape_str(x.shape()));
  check_vecs_fit(G, R, op, "gate");
  check_bias(bias, nout, op);
  CublasLtFp8Linear& gemm = fp8_gemm(fp8_, memory_, fp8_fast_accum_, capturing_, op);
  int64_t done = 0;
  if (fp8_residual_in_gemm()) {
    const int64_t ldq = fp8_activation_stride(K);
    const auto [q, sx] = fp8_activation_buffer(I.N, ldq, op);
    timed(gemm_key(profiler_.enabled(), op, I.B * I.N, nout, K).c_str(), [&] {
      done = gated_residual_products(R, G, w_scale, bias, ready, [&](int64_t b, float* scale, void* gated_bias) {
        launch_quantize_rows_e4m3(I.p + b * I.sb, I.sn, I.N, K, q, ldq, sx, stream(), op);
        const bool ok = gemm.run_residual({q, ldq, sx}, {wq.data(), wq.stride(0), scale}, gated_bias,
                                          R.p + b * R.sb, R.sn, R.N, K, nout, capturing_, stream(), op);
        fp8_residual_refused_ = fp8_residual_refused_ || (!ok && b == 0);
        return ok;
      }, op);
    });
  }
  if (done < R.B)
    Backend::linear_fp8_residual(from_sample(in, done, R.B), wq, w_scale, bias, from_sample(gate, done, R.B),
                                 from_sample(x, done, R.B), from_sample(branch, done, R.B), GatedFactors{});
}

}  // namespace fluxswap::cuda
