// The CPU backend's float32 reference ops for the text encoders (CLIP-L, T5): plain loops, sums in double, and
// OpenBLAS for attention's two matrix products. Semantics are those of the Backend methods in backend.h.
#include <cblas.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "backend/cpu_ops.h"
#include "core/error.h"

namespace fluxswap::cpu_ops {

namespace {

// A contiguous float32 host tensor of exactly `shape` (weights, attention inputs, the T5 bias).
float* contiguous_f32(const Tensor& t, const Shape& shape, const char* op, const char* what) {
  if (t.dtype() != DType::F32 || t.device() != Device::CPU || !t.is_contiguous() || t.shape() != shape)
    fail(op, std::string(what) + " must be a contiguous float32 host tensor of shape " + shape_str(shape) + ", got " +
                 shape_str(t.shape()));
  return t.ptr<float>();
}

}  // namespace

void layer_norm(const Tensor& x, const Tensor& weight, const Tensor& bias, float eps, const Tensor& y) {
  const char* op = "layer_norm";
  const Rows X = rows_of(x, op, "input"), Y = rows_of(y, op, "output");
  check_same_rows(X, Y, op);
  const float* w = contiguous_f32(weight, {X.C}, op, "weight");
  const float* bs = bias.defined() ? contiguous_f32(bias, {X.C}, op, "bias") : nullptr;
  for (int64_t b = 0; b < X.B; ++b)
    for (int64_t n = 0; n < X.N; ++n) {
      const float* r = X.row(b, n);
      const NormStats st = norm_stats(r, X.C, double(eps));
      float* o = Y.row(b, n);  // may alias r: each element is read before it is written
      for (int64_t c = 0; c < X.C; ++c) o[c] = (r[c] - st.mean) * st.inv * w[c] + (bs ? bs[c] : 0.0f);
    }
}

void rms_norm(const Tensor& x, const Tensor& weight, float eps, const Tensor& y) {
  const char* op = "rms_norm";
  const Rows X = rows_of(x, op, "input"), Y = rows_of(y, op, "output");
  check_same_rows(X, Y, op);
  const float* w = contiguous_f32(weight, {X.C}, op, "weight");
  for (int64_t b = 0; b < X.B; ++b)
    for (int64_t n = 0; n < X.N; ++n) {
      const float* r = X.row(b, n);
      const float inv = inv_rms(r, X.C, double(eps));
      float* o = Y.row(b, n);
      // T5LayerNorm's order: normalise first, then scale by the weight.
      for (int64_t c = 0; c < X.C; ++c) o[c] = (r[c] * inv) * w[c];
    }
}

void embedding(const Tensor& ids, const Tensor& table, const Tensor& positions, const Tensor& out) {
  const char* op = "embedding";
  const Rows O = rows_of(out, op, "output");
  if (ids.dtype() != DType::I32 || ids.device() != Device::CPU || ids.ndim() != 2 || !ids.is_contiguous() ||
      ids.size(0) != O.B || ids.size(1) != O.N)
    fail(op, "ids must be a contiguous int32 host tensor [" + std::to_string(O.B) + ", " + std::to_string(O.N) +
                 "], got " + std::string(dtype_name(ids.dtype())) + " " + shape_str(ids.shape()));
  if (table.ndim() != 2) fail(op, "table must be [V, C], got " + shape_str(table.shape()));
  const int64_t V = table.size(0);
  const float* tab = contiguous_f32(table, {V, O.C}, op, "table");
  const float* pos = nullptr;
  if (positions.defined()) {
    if (positions.ndim() != 2 || positions.size(0) < O.N)
      fail(op, "positions must cover " + std::to_string(O.N) + " rows, got " + shape_str(positions.shape()));
    pos = contiguous_f32(positions, {positions.size(0), O.C}, op, "positions");
  }
  const int32_t* id = ids.ptr<int32_t>();
  for (int64_t b = 0; b < O.B; ++b)
    for (int64_t s = 0; s < O.N; ++s) {
      const int32_t i = id[b * O.N + s];
      if (i < 0 || i >= V) fail(op, "token id " + std::to_string(i) + " is outside the table of " + std::to_string(V));
      float* o = O.row(b, s);
      const float* e = tab + int64_t(i) * O.C;
      for (int64_t c = 0; c < O.C; ++c) o[c] = e[c] + (pos ? pos[s * O.C + c] : 0.0f);
    }
}

void split_heads(const Tensor& x, const Tensor& out) {
  const char* op = "split_heads";
  const Rows X = rows_of(x, op, "input");
  if (out.ndim() != 4) fail(op, "output must be [B, H, S, D], got " + shape_str(out.shape()));
  const int64_t H = out.size(1), D = out.size(3);
  float* o = contiguous_f32(out, {X.B, H, X.N, D}, op, "output");
  if (X.C != H * D) fail(op, "input width " + std::to_string(X.C) + " is not H*D of " + shape_str(out.shape()));
  for (int64_t b = 0; b < X.B; ++b)
    for (int64_t s = 0; s < X.N; ++s)
      for (int64_t h = 0; h < H; ++h)
        std::memcpy(o + ((b * H + h) * X.N + s) * D, X.row(b, s) + h * D, size_t(D) * sizeof(float));
}

void attention_ex(const Tensor& q, const Tensor& k, const Tensor& v, float scale, const Tensor& bias, bool causal,
                  const Tensor& out) {
  const char* op = "attention_ex";
  if (q.ndim() != 4) fail(op, "q must be [B, H, S, D], got " + shape_str(q.shape()));
  const int64_t B = q.size(0), H = q.size(1), S = q.size(2), D = q.size(3);
  const float* qp = contiguous_f32(q, q.shape(), op, "q");
  const float* kp = contiguous_f32(k, q.shape(), op, "k");
  const float* vp = contiguous_f32(v, q.shape(), op, "v");
  const float* bp = bias.defined() ? contiguous_f32(bias, {H, S, S}, op, "bias") : nullptr;
  const Rows O = rows_of(out, op, "output");
  if (O.B != B || O.N != S || O.C != H * D)
    fail(op, "output " + shape_str(out.shape()) + " does not match q " + shape_str(q.shape()));
  std::vector<float> p(size_t(S * S));
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h) {
      const int64_t head = (b * H + h) * S * D;
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, int(S), int(S), int(D), scale, qp + head, int(D),
                  kp + head, int(D), 0.0f, p.data(), int(S));
      for (int64_t i = 0; i < S; ++i) {
        float* r = p.data() + i * S;
        // Under the causal mask query i sees keys 0..i; masked probabilities are exactly zero.
        const int64_t seen = causal ? i + 1 : S;
        if (bp)
          for (int64_t j = 0; j < seen; ++j) r[j] += bp[(h * S + i) * S + j];
        const float m = *std::max_element(r, r + seen);
        double sum = 0;
        for (int64_t j = 0; j < seen; ++j) sum += (r[j] = std::exp(r[j] - m));
        const float inv = float(1.0 / sum);
        for (int64_t j = 0; j < seen; ++j) r[j] *= inv;
        std::fill(r + seen, r + S, 0.0f);
      }
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, int(S), int(D), int(S), 1.0f, p.data(), int(S),
                  vp + head, int(D), 0.0f, O.row(b, 0) + h * D, int(O.sn));
    }
}

void activation(const Tensor& x, Activation act, const Tensor& y) {
  const char* op = "activation";
  const Rows X = rows_of(x, op, "input"), Y = rows_of(y, op, "output");
  check_same_rows(X, Y, op);
  for (int64_t b = 0; b < X.B; ++b)
    for (int64_t n = 0; n < X.N; ++n)
      for (int64_t c = 0; c < X.C; ++c) Y.row(b, n)[c] = activate(X.row(b, n)[c], act);
}

void mul(const Tensor& y, const Tensor& x) {
  const char* op = "mul";
  const Rows Y = rows_of(y, op, "output"), X = rows_of(x, op, "input");
  check_same_rows(X, Y, op);
  for (int64_t b = 0; b < X.B; ++b)
    for (int64_t n = 0; n < X.N; ++n)
      for (int64_t c = 0; c < X.C; ++c) Y.row(b, n)[c] *= X.row(b, n)[c];
}

}  // namespace fluxswap::cpu_ops
