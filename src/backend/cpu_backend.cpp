// The float32 reference backend: plain loops plus OpenBLAS for the matrix products. Every op computes exactly
// what backend.h states, in float32, so the CUDA backend can be tested against it op by op.
#include <cblas.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <utility>
#include <vector>

#include "backend/backend.h"
#include "backend/cpu_ops.h"
#include "core/counter_rng.h"
#include "core/error.h"
#include "quant/fp8.h"

namespace fluxswap {

namespace {

using cpu_ops::check_same_rows;

// q F8_E4M3 [rows, cols] with contiguous rows, scale F32 [rows], both on the host.
void check_fp8_rows(const Tensor& q, const Tensor& scale, int64_t rows, int64_t cols, const char* op) {
  if (q.dtype() != DType::F8_E4M3 || q.ndim() != 2 || q.size(0) != rows || q.size(1) != cols || q.stride(1) != 1 ||
      q.device() != Device::CPU)
    throw Error(std::string("cpu backend: ") + op + ": fp8 rows must be F8_E4M3 [" + std::to_string(rows) + ", " +
                std::to_string(cols) + "] host tensors, got " + std::string(dtype_name(q.dtype())) + " " +
                shape_str(q.shape()));
  if (scale.dtype() != DType::F32 || scale.ndim() != 1 || scale.size(0) != rows || !scale.is_contiguous())
    throw Error(std::string("cpu backend: ") + op + ": scales must be F32 [" + std::to_string(rows) + "], got " +
                shape_str(scale.shape()));
}
using cpu_ops::Rows;
using cpu_ops::rows_of;

// e4m3 rows [B, N, C] on the host ([rows, C] is one batch), contiguous last dimension.
struct Fp8Rows {
  uint8_t* p;
  int64_t B, N, C, sb, sn;
  uint8_t* row(int64_t b, int64_t n) const { return p + b * sb + n * sn; }
};

Fp8Rows fp8_rows_of(const Tensor& t, const char* op, const char* what) {
  if (t.dtype() != DType::F8_E4M3 || t.device() != Device::CPU || (t.ndim() != 2 && t.ndim() != 3) ||
      t.stride(-1) != 1)
    cpu_ops::fail(op, std::string(what) + " must be F8_E4M3 host rows (2-D or 3-D, contiguous last dimension), got " +
                          std::string(dtype_name(t.dtype())) + " " + shape_str(t.shape()));
  if (t.ndim() == 3) return {t.ptr<uint8_t>(), t.size(0), t.size(1), t.size(2), t.stride(0), t.stride(1)};
  return {t.ptr<uint8_t>(), 1, t.size(0), t.size(1), 0, t.stride(0)};
}

// One float32 scale per row of `rows` rows, contiguous.
void check_row_scales(const Tensor& s, int64_t rows, const char* op, const char* what) {
  if (s.dtype() != DType::F32 || s.device() != Device::CPU || s.ndim() != 1 || s.size(0) != rows ||
      !s.is_contiguous())
    cpu_ops::fail(op, std::string(what) + " must be F32 [" + std::to_string(rows) + "] contiguous, got " +
                          shape_str(s.shape()));
}

// Per-sample vectors [B, C] with any batch stride.
struct Vecs {
  const float* p;
  int64_t B, C, sb;
  const float* at(int64_t b) const { return p + b * sb; }
};

Vecs vecs_of(const Tensor& t, const char* what) {
  if (t.ndim() != 2 || t.stride(1) != 1 || t.dtype() != DType::F32)
    throw Error(std::string("cpu backend: ") + what + " must be a float32 [B, C] view, got " + shape_str(t.shape()));
  return {t.ptr<float>(), t.size(0), t.size(1), t.stride(0)};
}

class CpuBackend final : public Backend {
 public:
  explicit CpuBackend(bool residual_in_gemm) : residual_in_gemm_(residual_in_gemm) {}
  Device device() const override { return Device::CPU; }
  std::string name() const override { return "cpu (float32 reference)"; }
  DType compute_dtype() const override { return DType::F32; }

  Tensor empty(DType dtype, const Shape& shape) override { return Tensor::empty(dtype, shape); }
  Tensor upload_weight(const Tensor& host) override {
    return host.dtype() == DType::F32 && host.is_contiguous() ? host : host.to_f32();
  }
  void copy_from_host(const Tensor& host, const Tensor& dst) override {
    if (host.shape() != dst.shape())
      throw Error("copy_from_host: shape " + shape_str(host.shape()) + " into " + shape_str(dst.shape()));
    if (!dst.is_contiguous()) throw Error("copy_from_host: destination must be contiguous");
    if (!dtype_is_float(host.dtype()) || !dtype_is_float(dst.dtype())) {
      if (host.dtype() != dst.dtype() || !host.is_contiguous())
        throw Error("copy_from_host: integer tensors are copied as they are, " +
                    std::string(dtype_name(host.dtype())) + " into " + std::string(dtype_name(dst.dtype())));
      std::memcpy(dst.data(), host.data(), host.nbytes());
      return;
    }
    Tensor f = host.to_f32();
    convert_from_f32(f.ptr<float>(), dst.dtype(), dst.data(), size_t(f.numel()));
  }
  Tensor to_host_f32(const Tensor& src) override { return src.to_f32(); }
  void synchronize() override {}

  void fill_normal(const Tensor& t, uint64_t seed, float mean, float std) override {
    if (!t.is_contiguous()) throw Error("fill_normal: tensor must be contiguous");
    std::vector<float> v(size_t(t.numel()));
    for (size_t i = 0; i < v.size(); ++i) v[i] = mean + std * normal_from_counter(seed, i);
    convert_from_f32(v.data(), t.dtype(), t.data(), v.size());
  }

  std::unique_ptr<RecordedWork> record(const std::function<void()>& fn) override {
    struct Rerun final : RecordedWork {
      std::function<void()> fn;
      void replay() override { fn(); }
    };
    fn();
    auto r = std::make_unique<Rerun>();
    r->fn = fn;
    return r;
  }

  void layer_norm(const Tensor& x, const Tensor& w, const Tensor& b, float eps, const Tensor& y) override {
    cpu_ops::layer_norm(x, w, b, eps, y);
  }
  void rms_norm(const Tensor& x, const Tensor& w, float eps, const Tensor& y) override { cpu_ops::rms_norm(x, w, eps, y); }
  void embedding(const Tensor& ids, const Tensor& table, const Tensor& pos, const Tensor& out) override {
    cpu_ops::embedding(ids, table, pos, out);
  }
  void split_heads(const Tensor& x, const Tensor& out) override { cpu_ops::split_heads(x, out); }
  void attention_ex(const Tensor& q, const Tensor& k, const Tensor& v, float scale, const Tensor& bias, bool causal,
                    const Tensor& out) override {
    cpu_ops::attention_ex(q, k, v, scale, bias, causal, out);
  }
  void activation(const Tensor& x, Activation act, const Tensor& y) override { cpu_ops::activation(x, act, y); }
  void mul(const Tensor& y, const Tensor& x) override { cpu_ops::mul(y, x); }
  void conv2d(const Tensor& x, const Tensor& w, const Tensor& b, int pad, const Tensor& y) override {
    cpu_ops::conv2d(x, w, b, pad, y);
  }
  void group_norm(const Tensor& x, const Tensor& w, const Tensor& b, int groups, float eps, bool silu,
                  const Tensor& y) override {
    cpu_ops::group_norm(x, w, b, groups, eps, silu, y);
  }
  void upsample_nearest2x(const Tensor& x, const Tensor& y) override { cpu_ops::upsample_nearest2x(x, y); }
  void transpose_last2(const Tensor& x, const Tensor& y) override { cpu_ops::transpose_last2(x, y); }

  void set_profiling(bool) override {}
  std::map<std::string, double> profile_ms() const override { return {}; }
  size_t memory_in_use() const override { return 0; }
  size_t peak_memory() const override { return 0; }

  void axpy(const Tensor& y, float alpha, const Tensor& x) override {
    Rows Y = rows_of(y, "axpy", "output"), X = rows_of(x, "axpy", "input");
    check_same_rows(X, Y, "axpy");
    for (int64_t b = 0; b < X.B; ++b)
      for (int64_t n = 0; n < X.N; ++n)
        for (int64_t c = 0; c < X.C; ++c) Y.row(b, n)[c] += alpha * X.row(b, n)[c];
  }

  void copy(const Tensor& src, const Tensor& dst) override {
    if (src.shape() != dst.shape() || src.dtype() != dst.dtype())
      throw Error("cpu backend: copy " + shape_str(src.shape()) + " -> " + shape_str(dst.shape()));
    if (src.is_contiguous() && dst.is_contiguous()) {
      std::memmove(dst.data(), src.data(), src.nbytes());
      return;
    }
    Rows S = rows_of(src, "copy", "source"), D = rows_of(dst, "copy", "destination");
    for (int64_t b = 0; b < S.B; ++b)
      for (int64_t n = 0; n < S.N; ++n) std::memmove(D.row(b, n), S.row(b, n), size_t(S.C) * 4);
  }

  void add_matmul(const Tensor& base, const Tensor& up, const Tensor& down, const Tensor& out, float alpha) override {
    const int64_t M = out.size(0), K = out.size(1), R = down.size(0);
    if (base.shape() != out.shape() || up.size(0) != M || up.size(1) != R || down.size(1) != K ||
        !up.is_contiguous() || !down.is_contiguous() || !out.is_contiguous())
      throw Error("cpu backend: add_matmul " + shape_str(up.shape()) + " @ " + shape_str(down.shape()) + " + " +
                  shape_str(base.shape()));
    if (base.data() != out.data()) copy(base, out);
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, int(M), int(K), int(R), alpha, up.ptr<float>(), int(R),
                down.ptr<float>(), int(K), 1.0f, out.ptr<float>(), int(K));
  }

  void zero(const Tensor& t) override {
    if (t.is_contiguous()) {
      std::memset(t.data(), 0, t.nbytes());
      return;
    }
    Rows T = rows_of(t, "zero", "tensor");
    for (int64_t b = 0; b < T.B; ++b)
      for (int64_t n = 0; n < T.N; ++n) std::memset(T.row(b, n), 0, size_t(T.C) * 4);
  }

  void quantize_fp8_rows(const Tensor& x, const Tensor& q, const Tensor& scale) override {
    Rows X = rows_of(x, "quantize_fp8_rows", "input");
    check_fp8_rows(q, scale, X.B * X.N, X.C, "quantize_fp8_rows");
    if (X.B != 1 && X.sb != X.N * X.sn) throw Error("cpu backend: quantize_fp8_rows needs evenly strided rows");
    quant::quantize_rows_e4m3(X.p, X.sn, X.B * X.N, X.C, q.ptr<uint8_t>(), q.stride(0), scale.ptr<float>());
  }

  // The reference of the GPU's FP8 linear: the same quantised operands, multiplied out in float32.
  void linear_fp8(const Tensor& x, const Tensor& wq, const Tensor& w_scale, const Tensor& bias, const Tensor& y,
                  Activation act) override {
    const auto [xq, xs] = quantized_rows(x, "linear_fp8");
    linear_fp8_quantized(xq, xs, wq, w_scale, bias, y, act);
  }
  // x's rows quantised per row as the FP8 linears take them: codes with x's shape (contiguous) and [B * N] scales.
  static std::pair<Tensor, Tensor> quantized_rows(const Tensor& x, const char* op) {
    const Rows X = rows_of(x, op, "input");
    Tensor xq = Tensor::empty(DType::F8_E4M3, {X.B, X.N, X.C}), xs = Tensor::empty(DType::F32, {X.B * X.N});
    for (int64_t b = 0; b < X.B; ++b)
      quant::quantize_rows_e4m3(X.row(b, 0), X.sn, X.N, X.C, xq.ptr<uint8_t>() + b * X.N * X.C, X.C,
                                xs.ptr<float>() + b * X.N);
    return {x.ndim() == 2 ? xq.select(0, 0) : xq, xs};
  }

  void linear_fp8_quantized(const Tensor& xq, const Tensor& x_scale, const Tensor& wq, const Tensor& w_scale,
                            const Tensor& bias, const Tensor& y, Activation act) override {
    const char* op = "linear_fp8_quantized";
    const Fp8Rows X = fp8_rows_of(xq, op, "input");
    check_row_scales(x_scale, X.B * X.N, op, "input scales");
    check_fp8_rows(wq, w_scale, wq.size(0), X.C, op);
    Tensor w = Tensor::empty(DType::F32, {wq.size(0), X.C});
    quant::dequantize_rows_e4m3(wq.ptr<uint8_t>(), wq.stride(0), w_scale.ptr<float>(), wq.size(0), X.C,
                                w.ptr<float>(), X.C);
    Tensor xd = Tensor::empty(DType::F32, {X.B, X.N, X.C});
    for (int64_t b = 0; b < X.B; ++b)
      quant::dequantize_rows_e4m3(X.row(b, 0), X.sn, x_scale.ptr<float>() + b * X.N, X.N, X.C,
                                  xd.ptr<float>() + b * X.N * X.C, X.C);
    linear(xq.ndim() == 2 ? xd.select(0, 0) : xd, w, bias, y, act);
  }

  // layer_norm_modulate, then the row quantiser on its float32 output (the compute dtype here).
  void layer_norm_modulate_fp8(const Tensor& x, const Tensor& shift, const Tensor& scale, const Tensor& q,
                               const Tensor& q_scale) override {
    const char* op = "layer_norm_modulate_fp8";
    const Rows X = rows_of(x, op, "input");
    const Fp8Rows Q = fp8_rows_of(q, op, "output");
    if (q.ndim() != x.ndim() || Q.B != X.B || Q.N != X.N || Q.C != X.C)
      cpu_ops::fail(op, "output " + shape_str(q.shape()) + " does not match the input " + shape_str(x.shape()));
    if (Q.sn % 16 || (Q.B > 1 && Q.sb % 16))
      cpu_ops::fail(op, "the output's row and batch strides must be multiples of 16 (FP8 GEMM operands)");
    check_row_scales(q_scale, X.B * X.N, op, "output scales");
    Tensor y = Tensor::empty(DType::F32, x.shape());
    layer_norm_modulate(x, shift, scale, y);
    const Rows Y = rows_of(y, op, "normed");
    for (int64_t b = 0; b < X.B; ++b)
      quant::quantize_rows_e4m3(Y.row(b, 0), Y.sn, X.N, X.C, Q.row(b, 0), Q.sn, q_scale.ptr<float>() + b * X.N);
  }

  void add_lora_branch(const Tensor& x, const Tensor& down, const Tensor& up, const Tensor& scratch, const Tensor& y,
                       Activation act) override {
    const int64_t R = down.size(0);
    Tensor t = scratch.narrow(-1, 0, R);
    linear(x, down, Tensor(), t, Activation::None);
    Rows T = rows_of(t, "add_lora_branch", "scratch"), Y = rows_of(y, "add_lora_branch", "output");
    for (int64_t b = 0; b < Y.B; ++b) {
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, int(Y.N), int(Y.C), int(R), 1.0f, T.row(b, 0), int(T.sn),
                  up.ptr<float>(), int(up.stride(0)), 1.0f, Y.row(b, 0), int(Y.sn));
      if (act == Activation::None) continue;
      for (int64_t n = 0; n < Y.N; ++n)
        for (int64_t j = 0; j < Y.C; ++j) Y.row(b, n)[j] = cpu_ops::activate(Y.row(b, n)[j], act);
    }
  }

  void lora_linear(const Tensor& x, const Tensor& w, const Tensor& bias, const Tensor& down, const Tensor& up,
                   const Tensor& scratch, const Tensor& y, Activation act) override {
    linear(x, w, bias, y, Activation::None);
    add_lora_branch(x, down, up, scratch, y, act);
  }


  void linear(const Tensor& x, const Tensor& w, const Tensor& bias, const Tensor& y, Activation act) override {
    Rows X = rows_of(x, "linear", "input"), Y = rows_of(y, "linear", "output");
    if (w.ndim() != 2 || w.stride(1) != 1 || w.stride(0) < w.size(1) || w.dtype() != DType::F32)
      throw Error("cpu backend: linear weight must be a float32 [Nout, K] tensor with contiguous rows");
    const int64_t nout = w.size(0), k = w.size(1);
    if (X.C != k || Y.C != nout || X.B != Y.B || X.N != Y.N)
      throw Error("cpu backend: linear " + shape_str(x.shape()) + " x " + shape_str(w.shape()) + "^T -> " +
                  shape_str(y.shape()));
    const float* bp = bias.data() ? bias.ptr<float>() : nullptr;
    for (int64_t b = 0; b < X.B; ++b) {
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, int(X.N), int(nout), int(k), 1.0f, X.row(b, 0),
                  int(X.sn), w.ptr<float>(), int(w.stride(0)), 0.0f, Y.row(b, 0), int(Y.sn));
      for (int64_t n = 0; n < X.N; ++n) {
        float* r = Y.row(b, n);
        for (int64_t j = 0; j < nout; ++j) {
          r[j] = cpu_ops::activate(r[j] + (bp ? bp[j] : 0.0f), act);
        }
      }
    }
  }

  void silu(const Tensor& x, const Tensor& y) override {
    Rows X = rows_of(x, "silu", "input"), Y = rows_of(y, "silu", "output");
    check_same_rows(X, Y, "silu");
    for (int64_t b = 0; b < X.B; ++b)
      for (int64_t n = 0; n < X.N; ++n)
        for (int64_t c = 0; c < X.C; ++c) Y.row(b, n)[c] = cpu_ops::silu(X.row(b, n)[c]);
  }

  void timestep_embedding(const Tensor& t, float t_scale, const Tensor& out) override {
    Rows O = rows_of(out, "timestep_embedding", "output");
    const int64_t half = O.C / 2;
    for (int64_t b = 0; b < O.N; ++b) {
      const double tv = double(t.ptr<float>()[b]) * t_scale;
      float* r = O.row(0, b);
      for (int64_t i = 0; i < half; ++i) {
        // The reference computes the frequencies in float32, then the product in float32.
        const float f = std::exp(-std::log(10000.0f) * float(i) / float(half));
        const float arg = float(tv) * f;
        r[i] = std::cos(arg);
        r[half + i] = std::sin(arg);
      }
    }
  }

  void add(const Tensor& y, const Tensor& x) override {
    Rows Y = rows_of(y, "add", "output"), X = rows_of(x, "add", "input");
    check_same_rows(X, Y, "add");
    for (int64_t b = 0; b < X.B; ++b)
      for (int64_t n = 0; n < X.N; ++n)
        for (int64_t c = 0; c < X.C; ++c) Y.row(b, n)[c] += X.row(b, n)[c];
  }

  void layer_norm_modulate(const Tensor& x, const Tensor& shift, const Tensor& scale, const Tensor& y) override {
    Rows X = rows_of(x, "layer_norm_modulate", "input"), Y = rows_of(y, "layer_norm_modulate", "output");
    Vecs Sh = vecs_of(shift, "shift"), Sc = vecs_of(scale, "scale");
    check_same_rows(X, Y, "layer_norm_modulate");
    for (int64_t b = 0; b < X.B; ++b)
      for (int64_t n = 0; n < X.N; ++n) {
        const float* r = X.row(b, n);
        const cpu_ops::NormStats st = cpu_ops::norm_stats(r, X.C, 1e-6);
        float* o = Y.row(b, n);
        for (int64_t c = 0; c < X.C; ++c) o[c] = (r[c] - st.mean) * st.inv * (1.0f + Sc.at(b)[c]) + Sh.at(b)[c];
      }
  }

  void qk_norm_rope(const Tensor& qkv, const Tensor& q_norm, const Tensor& k_norm, const Tensor& rope,
                    int64_t seq_offset, const Tensor& q, const Tensor& k, const Tensor& v) override {
    Rows X = rows_of(qkv, "qk_norm_rope", "qkv");
    const int64_t H = q.size(1), S = q.size(2), D = q.size(3);
    if (X.C != 3 * H * D || seq_offset + X.N > S || q.size(0) != X.B)
      throw Error("cpu backend: qk_norm_rope: qkv " + shape_str(qkv.shape()) + " does not fit q " +
                  shape_str(q.shape()) + " at offset " + std::to_string(seq_offset));
    const float* rp = rope.ptr<float>();
    float* outs[3] = {q.ptr<float>(), k.ptr<float>(), v.defined() ? v.ptr<float>() : nullptr};
    const float* norms[2] = {q_norm.ptr<float>(), k_norm.ptr<float>()};
    for (int64_t b = 0; b < X.B; ++b)
      for (int64_t n = 0; n < X.N; ++n) {
        const int64_t s = seq_offset + n;
        for (int part = 0; part < (outs[2] ? 3 : 2); ++part)
          for (int64_t h = 0; h < H; ++h) {
            const float* src = X.row(b, n) + part * H * D + h * D;
            float* dst = outs[part] + ((b * H + h) * S + s) * D;
            if (part == 2) {
              std::memcpy(dst, src, size_t(D) * 4);
              continue;
            }
            const float inv = cpu_ops::inv_rms(src, D, 1e-6);
            for (int64_t j = 0; j < D / 2; ++j) {
              const float a = src[2 * j] * inv * norms[part][2 * j];
              const float c = src[2 * j + 1] * inv * norms[part][2 * j + 1];
              const float cs = rp[(s * (D / 2) + j) * 2], sn = rp[(s * (D / 2) + j) * 2 + 1];
              dst[2 * j] = a * cs - c * sn;
              dst[2 * j + 1] = c * cs + a * sn;
            }
          }
      }
  }

  void attention(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out) override {
    if (q.ndim() != 4) throw Error("cpu backend: attention: q must be [B, H, S, D], got " + shape_str(q.shape()));
    cpu_ops::attention_ex(q, k, v_heads(v, q.shape(), "attention"), 1.0f / std::sqrt(float(q.size(3))), Tensor(),
                          /*causal=*/false, out);
  }

  void qk_norm_rope_fp8(const Tensor& qkv, const Tensor& q_norm, const Tensor& k_norm, const Tensor& rope,
                        int64_t seq_offset, float qk_scale, const Tensor& q8, const Tensor& k8, const Tensor& v,
                        const Tensor& v_amax) override {
    if (v_amax.dtype() != DType::F32 || v_amax.numel() != 1)
      throw Error("cpu backend: qk_norm_rope_fp8: v_amax must be F32 [1], got " + shape_str(v_amax.shape()));
    Tensor q = Tensor::empty(DType::F32, q8.shape()), k = Tensor::empty(DType::F32, q8.shape());
    const Tensor vh = v.defined() ? v : Tensor::empty(DType::F32, q8.shape());
    qk_norm_rope(qkv, q_norm, k_norm, rope, seq_offset, q, k, vh);
    const int64_t n = qkv.size(1);
    cpu_ops::quantize_qk_heads_e4m3(q, k, seq_offset, n, qk_scale, q8, k8);
    float& amax = v_amax.ptr<float>()[0];
    amax = std::max(amax, cpu_ops::max_abs_rows(vh, seq_offset, n));
  }

  void attention_fp8(const Tensor& q8, const Tensor& k8, const Tensor& v, float qk_scale, const Tensor& v_amax,
                     const Tensor& out) override {
    cpu_ops::attention_fp8(q8, k8, v_heads(v, q8.shape(), "attention_fp8"), qk_scale, v_amax.ptr<float>()[0], out);
    v_amax.ptr<float>()[0] = 0.0f;
  }

  void attention_fp8_rows(const Tensor& q8, const Tensor& k8, const Tensor& v, float qk_scale, const Tensor& v_amax,
                          const Tensor& out8, const Tensor& out_scale) override {
    cpu_ops::attention_fp8(q8, k8, v_heads(v, q8.shape(), "attention_fp8_rows"), qk_scale, v_amax.ptr<float>()[0],
                           Tensor(), out8, out_scale);
    v_amax.ptr<float>()[0] = 0.0f;
  }

  // Attention's v: heads [B, H, S, D] as they are, or rows [B, S, H*D] (the v columns of qkv) split into heads.
  Tensor v_heads(const Tensor& v, const Shape& heads, const char* op) {
    if (v.ndim() != 3) return v;
    if (heads.size() != 4 || v.size(0) != heads[0] || v.size(1) != heads[2] || v.size(2) != heads[1] * heads[3])
      throw Error(std::string("cpu backend: ") + op + ": v rows " + shape_str(v.shape()) + " do not match the heads " +
                  shape_str(heads));
    Tensor out = Tensor::empty(DType::F32, heads);
    split_heads(v, out);
    return out;
  }

  // The float32 values of [a8 * a_scale | b], then the row quantiser.
  void quantize_fp8_rows_joined(const Tensor& a8, const Tensor& a_scale, const Tensor& b, const Tensor& q,
                                const Tensor& scale) override {
    const char* op = "quantize_fp8_rows_joined";
    const Fp8Rows A = fp8_rows_of(a8, op, "a8");
    const Rows Bv = rows_of(b, op, "b");
    const int64_t rows = A.B * A.N, ca = A.C, cb = Bv.C;
    if (Bv.B * Bv.N != rows || (Bv.B != 1 && Bv.sb != Bv.N * Bv.sn))
      cpu_ops::fail(op, "b must have a8's " + std::to_string(rows) + " rows, evenly strided, got " + shape_str(b.shape()));
    check_row_scales(a_scale, rows, op, "a_scale");
    check_fp8_rows(q, scale, rows, ca + cb, op);
    std::vector<float> joined(size_t(rows * (ca + cb)));
    for (int64_t r = 0; r < rows; ++r) {
      float* j = joined.data() + r * (ca + cb);
      const uint8_t* ar = A.row(r / A.N, r % A.N);
      for (int64_t c = 0; c < ca; ++c) j[c] = quant::e4m3_to_f32(ar[c]) * a_scale.ptr<float>()[r];
      std::memcpy(j + ca, Bv.row(r / Bv.N, r % Bv.N), size_t(cb) * sizeof(float));
    }
    quant::quantize_rows_e4m3(joined.data(), ca + cb, rows, ca + cb, q.ptr<uint8_t>(), q.stride(0), scale.ptr<float>());
  }

  void gated_residual(const Tensor& x, const Tensor& gate, const Tensor& y) override {
    Rows X = rows_of(x, "gated_residual", "residual"), Y = rows_of(y, "gated_residual", "gated branch");
    Vecs G = vecs_of(gate, "gate");
    check_same_rows(X, Y, "gated_residual");
    for (int64_t b = 0; b < X.B; ++b)
      for (int64_t n = 0; n < X.N; ++n)
        for (int64_t c = 0; c < X.C; ++c) X.row(b, n)[c] += G.at(b)[c] * Y.row(b, n)[c];
  }

  // The FP8 residual projections' fused form (when asked for): x += acc * (gate * w_scale) + gate * bias, with acc
  // the product of the e4m3 codes at unit weight scales; the composition otherwise.
  bool fp8_residual_in_gemm() const override { return residual_in_gemm_; }
  void gated_output_factors(const std::vector<GatedFactors>& items) override {
    for (const GatedFactors& f : items) make_factors(f);
  }
  void linear_fp8_quantized_residual(const Tensor& xq, const Tensor& x_scale, const Tensor& wq, const Tensor& w_scale,
                                     const Tensor& bias, const Tensor& gate, const Tensor& x, const Tensor& branch,
                                     const GatedFactors& ready) override {
    if (!residual_in_gemm_) {
      Backend::linear_fp8_quantized_residual(xq, x_scale, wq, w_scale, bias, gate, x, branch, ready);
      return;
    }
    const Tensor unit = Tensor::empty(DType::F32, {wq.size(0)});
    std::fill_n(unit.ptr<float>(), wq.size(0), 1.0f);
    linear_fp8_quantized(xq, x_scale, wq, unit, Tensor(), branch, Activation::None);
    add_gated_product(x, branch, ready.scale.defined() ? ready : factors(gate, w_scale, bias, x),
                      "linear_fp8_quantized_residual");
  }
  void linear_fp8_residual(const Tensor& in, const Tensor& wq, const Tensor& w_scale, const Tensor& bias,
                           const Tensor& gate, const Tensor& x, const Tensor& branch,
                           const GatedFactors& ready) override {
    if (!residual_in_gemm_) {
      Backend::linear_fp8_residual(in, wq, w_scale, bias, gate, x, branch, ready);
      return;
    }
    const auto [q, s] = quantized_rows(in, "linear_fp8_residual");
    linear_fp8_quantized_residual(q, s, wq, w_scale, bias, gate, x, branch, ready);
  }

  // The fused forms are, by definition, the two ops in sequence.
  void gated_residual_layer_norm_modulate(const Tensor& x, const Tensor& gate, const Tensor& y, const Tensor& shift,
                                          const Tensor& scale, const Tensor& normed) override {
    gated_residual(x, gate, y);
    layer_norm_modulate(x, shift, scale, normed);
  }
  void gated_residual_layer_norm_modulate_fp8(const Tensor& x, const Tensor& gate, const Tensor& y,
                                              const Tensor& shift, const Tensor& scale, const Tensor& q,
                                              const Tensor& q_scale) override {
    gated_residual(x, gate, y);
    layer_norm_modulate_fp8(x, shift, scale, q, q_scale);
  }

 private:
  // scale[b, o] = gate[b, o] * w_scale[o], bias_out[b, o] = gate[b, o] * bias[o].
  static void make_factors(const GatedFactors& f) {
    const Vecs G = vecs_of(f.gate, "gate");
    if (f.scale.numel() != G.B * G.C || f.w_scale.numel() != G.C)
      throw Error("cpu backend: gated factors: scale must be [B, n] and w_scale [n] for a [B, n] gate");
    for (int64_t b = 0; b < G.B; ++b)
      for (int64_t o = 0; o < G.C; ++o) {
        const float g = G.at(b)[o];
        f.scale.ptr<float>()[b * G.C + o] = g * f.w_scale.ptr<float>()[o];
        if (f.bias.defined()) f.bias_out.ptr<float>()[b * G.C + o] = g * f.bias.ptr<float>()[o];
      }
  }
  // The factors an op makes itself when none are given, for residual rows x.
  static GatedFactors factors(const Tensor& gate, const Tensor& w_scale, const Tensor& bias, const Tensor& x) {
    const Rows X = rows_of(x, "gated factors", "residual");
    GatedFactors f{gate, w_scale, bias, Tensor::empty(DType::F32, {X.B, X.C}),
                   bias.defined() ? Tensor::empty(DType::F32, {X.B, X.C}) : Tensor()};
    make_factors(f);
    return f;
  }
  // x[b, n, o] += product[b, n, o] * scale[b, o] + bias_out[b, o].
  static void add_gated_product(const Tensor& x, const Tensor& product, const GatedFactors& f, const char* op) {
    const Rows X = rows_of(x, op, "residual"), P = rows_of(product, op, "branch");
    check_same_rows(X, P, op);
    for (int64_t b = 0; b < X.B; ++b) {
      const float* s = f.scale.ptr<float>() + b * X.C;
      const float* gb = f.bias_out.defined() ? f.bias_out.ptr<float>() + b * X.C : nullptr;
      for (int64_t n = 0; n < X.N; ++n)
        for (int64_t c = 0; c < X.C; ++c) X.row(b, n)[c] += P.row(b, n)[c] * s[c] + (gb ? gb[c] : 0.0f);
    }
  }

  bool residual_in_gemm_;
};

}  // namespace

std::unique_ptr<Backend> make_cpu_backend(bool residual_in_gemm) {
  return std::make_unique<CpuBackend>(residual_in_gemm);
}

}  // namespace fluxswap
