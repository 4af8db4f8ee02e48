#pragma once
// The CPU backend's float32 reference ops for the text encoders and the VAE, one file per model family
// (cpu_text_ops.cpp, cpu_image_ops.cpp), and the helpers every CPU backend file shares. Semantics are those of the
// Backend methods of the same names.
#include <algorithm>
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
// The decode tail (float32 in, as Backend states; out float32 and uint8), and its per-value arithmetic, which the
// pipeline's host helpers (model/vae_decoder.h) use too, so that both give the same bits.
void unpack_unscale_latents(const Tensor& packed, float scaling, float shift, const Tensor& out);
void image_to_u8(const Tensor& image, const Tensor& out);
// Index of latent pixel (c, y, x) of sample b in the packed layout [B, (h/2)(w/2), 4C].
inline int64_t flux_packed_index(int64_t b, int64_t c, int64_t y, int64_t x, int64_t C, int64_t h, int64_t w) {
  const int64_t token = (b * (h / 2) + y / 2) * (w / 2) + x / 2, channel = c * 4 + (y % 2) * 2 + x % 2;
  return token * 4 * C + channel;
}
inline float unscale_latent(float x, float scaling, float shift) { return x / scaling + shift; }
// x / 2 + 0.5 clamped to 0..1 in float32, in torch's order; a NaN stays NaN, as torch's clamp leaves it.
inline float unit_pixel(float x) {
  const float v = x / 2.0f + 0.5f;
  return std::isnan(v) ? v : std::clamp(v, 0.0f, 1.0f);
}
// (unit * 255).round() as numpy rounds (std::nearbyint: half to even in the default rounding mode); NaN is black.
inline uint8_t u8_pixel(float unit) {
  const float v = unit * 255.0f;
  return std::isnan(v) ? 0 : uint8_t(std::nearbyint(v));
}

// cpu_fp8_attention.cpp (float32 q, k, v [B, H, S, D]; the e4m3 ones F8_E4M3 of the same shape)
// q8 = e4m3(q * qk_scale), k8 likewise, for sequence positions seq_offset .. seq_offset + n.
void quantize_qk_heads_e4m3(const Tensor& q, const Tensor& k, int64_t seq_offset, int64_t n, float qk_scale,
                            const Tensor& q8, const Tensor& k8);
// max |v| over the same positions.
float max_abs_rows(const Tensor& v, int64_t seq_offset, int64_t n);
// The output as rows [B, S, H*D] of float32 values (out), or, with out8 defined, as their e4m3 codes (F8_E4M3
// [B, S, H*D] contiguous) and every row's scale in out_scale (F32 [B * S]).
void attention_fp8(const Tensor& q8, const Tensor& k8, const Tensor& v, float qk_scale, float v_amax,
                   const Tensor& out, const Tensor& out8 = Tensor(), const Tensor& out_scale = Tensor());

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
