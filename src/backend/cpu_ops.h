#pragma once
// The CPU backend's float32 reference ops for the text encoders and the VAE, one file per model family
// (cpu_text_ops.cpp, cpu_image_ops.cpp), and the helpers every CPU backend file shares. Semantics are those of the
// Backend methods of the same names.
#include <cmath>
#include <cstdint>
#include <string>

#include "backend/backend.h"
#include "core/error.h"

namespace fluxswap::cpu_ops {

// cpu_text_ops.cpp
void layer_norm(const Tensor& x, const Tensor& weight, const Tensor& bias, float eps, const Tensor& y);
void rms_norm(const Tensor& x, const Tensor& weight, float eps, const Tensor& y);
void embedding(const Tensor& ids, const Tensor& table, const Tensor& positions, const Tensor& out);
void split_heads(const Tensor& x, const Tensor& out);
void attention_ex(const Tensor& q, const Tensor& k, const Tensor& v, float scale, const Tensor& bias, bool causal,
                  const Tensor& out);
void activation(const Tensor& x, Activation act, const Tensor& y);
void mul(const Tensor& y, const Tensor& x);

// cpu_image_ops.cpp
void conv2d(const Tensor& x, const Tensor& w, const Tensor& bias, int pad, const Tensor& y);
void group_norm(const Tensor& x, const Tensor& weight, const Tensor& bias, int groups, float eps, bool silu,
                const Tensor& y);
void upsample_nearest2x(const Tensor& x, const Tensor& y);
void transpose_last2(const Tensor& x, const Tensor& y);

// --- Shared helpers.

// Error "cpu backend: <op>: <why>".
[[noreturn]] inline void fail(const char* op, const std::string& why) {
  throw Error(std::string("cpu backend: ") + op + ": " + why);
}

// A rows view: [B, N, C] with the last dimension contiguous ([B, C] is read as B rows of one batch).
struct Rows {
  float* p;
  int64_t B, N, C, sb, sn;
  float* row(int64_t b, int64_t n) const { return p + b * sb + n * sn; }
};

// `t` as rows; Error naming `op` and `what` ("input", "output", ...) unless it is a float32 host tensor of 2 or 3
// dimensions with a contiguous last one.
inline Rows rows_of(const Tensor& t, const char* op, const char* what) {
  if (t.dtype() != DType::F32 || t.device() != Device::CPU)
    fail(op, std::string(what) + " must be a float32 host tensor");
  if (t.ndim() != 2 && t.ndim() != 3) fail(op, std::string(what) + " must be 2-D or 3-D, got " + shape_str(t.shape()));
  if (t.stride(-1) != 1) fail(op, std::string(what) + " needs a contiguous last dimension");
  if (t.ndim() == 3) return {t.ptr<float>(), t.size(0), t.size(1), t.size(2), t.stride(0), t.stride(1)};
  return {t.ptr<float>(), 1, t.size(0), t.size(1), 0, t.stride(0)};
}

inline void check_same_rows(const Rows& a, const Rows& b, const char* op) {
  if (a.B != b.B || a.N != b.N || a.C != b.C) fail(op, "input and output shapes differ");
}

inline float silu(float v) { return v / (1.0f + std::exp(-v)); }

// The activation epilogues of backend.h, elementwise.
inline float activate(float v, Activation act) {
  switch (act) {
    case Activation::None: return v;
    case Activation::GeluTanh: {
      const float k = 0.7978845608028654f;  // sqrt(2/pi)
      return 0.5f * v * (1.0f + std::tanh(k * (v + 0.044715f * v * v * v)));
    }
    case Activation::Silu: return silu(v);
    case Activation::QuickGelu: return v / (1.0f + std::exp(-1.702f * v));
  }
  return v;
}

// LayerNorm / GroupNorm statistics of n values, two passes in double: y = (x - mean) * inv (* weight + bias).
struct NormStats {
  float mean, inv;
};
inline NormStats norm_stats(const float* x, int64_t n, double eps) {
  double mean = 0, var = 0;
  for (int64_t i = 0; i < n; ++i) mean += x[i];
  mean /= double(n);
  for (int64_t i = 0; i < n; ++i) var += (x[i] - mean) * (x[i] - mean);
  var /= double(n);
  return {float(mean), float(1.0 / std::sqrt(var + eps))};
}

// RMSNorm's 1 / sqrt(mean(x^2) + eps) of n values, summed in double.
inline float inv_rms(const float* x, int64_t n, double eps) {
  double ss = 0;
  for (int64_t i = 0; i < n; ++i) ss += double(x[i]) * x[i];
  return float(1.0 / std::sqrt(ss / double(n) + eps));
}

}  // namespace fluxswap::cpu_ops
