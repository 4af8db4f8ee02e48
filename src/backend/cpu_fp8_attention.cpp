// The float32 reference of FP8 attention (Backend::qk_norm_rope_fp8 / attention_fp8): every tensor the GPU keeps in
// e4m3 is rounded through e4m3 here at the same scale, and the products are exact float32.
//
// One difference from cuDNN's kernel is inherent: a flash-attention kernel quantises exp(s - m) against the running
// row maximum of the key blocks seen so far, this reference against the row's true maximum. Both keep every value
// <= 1 (so <= 448 after the probability scale); they round different numbers, so the GPU is compared with this
// reference under a tolerance, not bit for bit.
#include <algorithm>
#include <cblas.h>
#include <cmath>
#include <vector>

#include "backend/cpu_ops.h"
#include "quant/fp8.h"

namespace fluxswap::cpu_ops {

namespace {
float round_e4m3(float x) { return quant::e4m3_to_f32(quant::e4m3_from_f32(x)); }

void check_heads(const Tensor& t, DType dtype, const Shape& shape, const char* op, const char* what) {
  if (t.dtype() != dtype || t.shape() != shape || !t.is_contiguous())
    fail(op, std::string(what) + " must be " + std::string(dtype_name(dtype)) + " " + shape_str(shape) +
                 " (contiguous), got " + std::string(dtype_name(t.dtype())) + " " + shape_str(t.shape()));
}
}  // namespace

void quantize_qk_heads_e4m3(const Tensor& q, const Tensor& k, int64_t seq_offset, int64_t n, float qk_scale,
                            const Tensor& q8, const Tensor& k8) {
  const int64_t B = q.size(0), H = q.size(1), S = q.size(2), D = q.size(3);
  for (int part = 0; part < 2; ++part) {
    const float* src = (part == 0 ? q : k).ptr<float>();
    uint8_t* dst = (part == 0 ? q8 : k8).ptr<uint8_t>();
    for (int64_t bh = 0; bh < B * H; ++bh)
      for (int64_t i = (bh * S + seq_offset) * D; i < (bh * S + seq_offset + n) * D; ++i)
        dst[i] = quant::e4m3_from_f32(src[i] * qk_scale);
  }
}

float max_abs_rows(const Tensor& v, int64_t seq_offset, int64_t n) {
  const int64_t BH = v.size(0) * v.size(1), S = v.size(2), D = v.size(3);
  float m = 0.0f;
  for (int64_t bh = 0; bh < BH; ++bh)
    for (int64_t i = (bh * S + seq_offset) * D; i < (bh * S + seq_offset + n) * D; ++i)
      m = std::max(m, std::fabs(v.ptr<float>()[i]));
  return m;
}

void attention_fp8(const Tensor& q8, const Tensor& k8, const Tensor& v, float qk_scale, float v_amax,
                   const Tensor& out, const Tensor& out8, const Tensor& out_scale) {
  const char* op = out8.defined() ? "attention_fp8_rows" : "attention_fp8";
  if (q8.ndim() != 4) fail(op, "q8 must be [B, H, S, D], got " + shape_str(q8.shape()));
  const int64_t B = q8.size(0), H = q8.size(1), S = q8.size(2), D = q8.size(3);
  check_heads(q8, DType::F8_E4M3, q8.shape(), op, "q8");
  check_heads(k8, DType::F8_E4M3, q8.shape(), op, "k8");
  check_heads(v, DType::F32, q8.shape(), op, "v");
  Rows O{};
  if (out8.defined()) {
    if (out8.dtype() != DType::F8_E4M3 || out8.shape() != Shape{B, S, H * D} || !out8.is_contiguous())
      fail(op, "out8 must be F8_E4M3 " + shape_str({B, S, H * D}) + " contiguous, got " + shape_str(out8.shape()));
    if (out_scale.dtype() != DType::F32 || out_scale.numel() != B * S || !out_scale.is_contiguous())
      fail(op, "out_scale must be F32 [" + std::to_string(B * S) + "] contiguous, got " + shape_str(out_scale.shape()));
  } else {
    O = rows_of(out, op, "output");
    if (O.B != B || O.N != S || O.C != H * D) fail(op, "output " + shape_str(out.shape()) + " does not match q8");
  }
  if (!(qk_scale > 0.0f) || !std::isfinite(qk_scale)) fail(op, "qk_scale must be a positive finite number");

  const float v_scale = quant::kE4m3Max / std::max(v_amax, quant::kE4m3AmaxFloor);
  const float p_scale = quant::kE4m3Max, o_scale = v_scale;
  const float o_descale = 1.0f / o_scale;  // the GPU multiplies by the reciprocal, as here
  if (out8.defined()) std::fill_n(out_scale.ptr<float>(), B * S, o_descale);
  const int64_t n = B * H * S * D;
  std::vector<float> qd(static_cast<size_t>(n)), kd(static_cast<size_t>(n)), vd(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) {
    qd[size_t(i)] = quant::e4m3_to_f32(q8.ptr<uint8_t>()[i]) / qk_scale;
    kd[size_t(i)] = quant::e4m3_to_f32(k8.ptr<uint8_t>()[i]) / qk_scale;
    vd[size_t(i)] = round_e4m3(v.ptr<float>()[i] * v_scale) / v_scale;
  }
  std::vector<float> p(size_t(S * S)), o(size_t(S * D));
  for (int64_t bh = 0; bh < B * H; ++bh) {
    const int64_t head = bh * S * D;
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, int(S), int(S), int(D), 1.0f / std::sqrt(float(D)),
                qd.data() + head, int(D), kd.data() + head, int(D), 0.0f, p.data(), int(S));
    std::vector<double> row_sum(static_cast<size_t>(S));
    for (int64_t i = 0; i < S; ++i) {
      float* r = p.data() + i * S;
      const float m = *std::max_element(r, r + S);
      double sum = 0;
      for (int64_t j = 0; j < S; ++j) {
        const float e = std::exp(r[j] - m);
        sum += e;  // the normaliser sums the unrounded exponentials, as a flash-attention kernel does
        r[j] = round_e4m3(e * p_scale) / p_scale;
      }
      row_sum[size_t(i)] = sum;
    }
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, int(S), int(D), int(S), 1.0f, p.data(), int(S),
                vd.data() + head, int(D), 0.0f, o.data(), int(D));
    const int64_t b = bh / H, h = bh % H;
    for (int64_t i = 0; i < S; ++i)
      for (int64_t d = 0; d < D; ++d) {
        const uint8_t code = quant::e4m3_from_f32(float(o[size_t(i * D + d)] / row_sum[size_t(i)]) * o_scale);
        if (out8.defined())
          out8.ptr<uint8_t>()[(b * S + i) * H * D + h * D + d] = code;
        else
          O.row(b, i)[h * D + d] = quant::e4m3_to_f32(code) * o_descale;
      }
  }
}

}  // namespace fluxswap::cpu_ops
