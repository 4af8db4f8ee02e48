// The CPU backend's float32 reference ops for the VAE (NCHW contiguous tensors throughout) and the pipeline's
// decode tail around it.
#include <cblas.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "backend/cpu_ops.h"
#include "core/error.h"

namespace fluxswap::cpu_ops {

namespace {

// im2col columns are built for a band of output rows at a time, so a 1024x1024 decode needs tens of megabytes of
// scratch instead of Cin * k * k times the image.
constexpr int64_t kColumnBudget = int64_t(1) << 22;  // floats

void check_f32(const Tensor& t, const char* op, const char* what, int ndim) {
  if (t.dtype() != DType::F32 || t.device() != Device::CPU || !t.is_contiguous() || t.ndim() != ndim)
    throw Error(std::string("cpu backend: ") + op + ": " + what + " must be a contiguous float32 host tensor of " +
                std::to_string(ndim) + " dimensions, got " + shape_str(t.shape()));
}

void check_vector(const Tensor& t, int64_t n, const char* op, const char* what) {
  check_f32(t, op, what, 1);
  if (t.size(0) != n)
    throw Error(std::string("cpu backend: ") + op + ": " + what + " has shape " + shape_str(t.shape()) +
                ", expected [" + std::to_string(n) + "]");
}

[[noreturn]] void shape_error(const char* op, const Tensor& x, const Tensor& y) {
  throw Error(std::string("cpu backend: ") + op + ": input " + shape_str(x.shape()) + " and output " +
              shape_str(y.shape()) + " do not fit");
}

// The columns of output rows [r0, r0 + rows) of one sample: col[(ci * kh + ky) * kw + kx][r * Wo + ox] is the input
// pixel that kernel tap (ky, kx) sees for output (r0 + r, ox), zero outside the image.
void im2col(const float* x, int64_t Cin, int64_t H, int64_t W, int64_t kh, int64_t kw, int64_t pad, int64_t Wo,
            int64_t r0, int64_t rows, float* col) {
  for (int64_t ci = 0; ci < Cin; ++ci)
    for (int64_t ky = 0; ky < kh; ++ky)
      for (int64_t kx = 0; kx < kw; ++kx) {
        // Output columns whose input column ox + kx - pad lies inside the image.
        const int64_t lo = std::clamp(pad - kx, int64_t(0), Wo), hi = std::clamp(W + pad - kx, lo, Wo);
        for (int64_t r = 0; r < rows; ++r) {
          float* dst = col + ((ci * kh + ky) * kw + kx) * rows * Wo + r * Wo;
          const int64_t iy = r0 + r + ky - pad;
          if (iy < 0 || iy >= H) {
            std::fill(dst, dst + Wo, 0.0f);
            continue;
          }
          const float* src = x + (ci * H + iy) * W;
          std::fill(dst, dst + lo, 0.0f);
          std::memcpy(dst + lo, src + (lo + kx - pad), size_t(hi - lo) * 4);
          std::fill(dst + hi, dst + Wo, 0.0f);
        }
      }
}

}  // namespace

void conv2d(const Tensor& x, const Tensor& w, const Tensor& bias, int pad, const Tensor& y) {
  check_f32(x, "conv2d", "input", 4);
  check_f32(w, "conv2d", "weight", 4);
  check_f32(y, "conv2d", "output", 4);
  const int64_t B = x.size(0), Cin = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t Cout = w.size(0), kh = w.size(2), kw = w.size(3);
  const int64_t Ho = H + 2 * pad - kh + 1, Wo = W + 2 * pad - kw + 1;
  if (pad < 0 || w.size(1) != Cin || Ho < 1 || Wo < 1 || y.size(0) != B || y.size(1) != Cout || y.size(2) != Ho ||
      y.size(3) != Wo)
    throw Error("cpu backend: conv2d: input " + shape_str(x.shape()) + ", weight " + shape_str(w.shape()) +
                ", padding " + std::to_string(pad) + " cannot give output " + shape_str(y.shape()));
  if (bias.defined()) check_vector(bias, Cout, "conv2d", "bias");

  const int64_t K = Cin * kh * kw, plane = Ho * Wo;
  const bool pointwise = kh == 1 && kw == 1 && pad == 0;  // the input already is its own column matrix
  const int64_t band = std::clamp(kColumnBudget / (K * Wo), int64_t(1), Ho);
  std::vector<float> col(pointwise ? 0 : size_t(K * band * Wo));
  for (int64_t b = 0; b < B; ++b) {
    const float* xb = x.ptr<float>() + b * Cin * H * W;
    float* yb = y.ptr<float>() + b * Cout * plane;
    if (pointwise) {
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, int(Cout), int(plane), int(Cin), 1.0f, w.ptr<float>(),
                  int(Cin), xb, int(plane), 0.0f, yb, int(plane));
    } else {
      for (int64_t r0 = 0; r0 < Ho; r0 += band) {
        const int64_t rows = std::min(band, Ho - r0);
        im2col(xb, Cin, H, W, kh, kw, pad, Wo, r0, rows, col.data());
        // [Cout, K] @ [K, rows * Wo] lands on output rows r0.. of every channel plane (leading dimension: plane).
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, int(Cout), int(rows * Wo), int(K), 1.0f,
                    w.ptr<float>(), int(K), col.data(), int(rows * Wo), 0.0f, yb + r0 * Wo, int(plane));
      }
    }
    if (!bias.defined()) continue;
    for (int64_t co = 0; co < Cout; ++co) {
      float* p = yb + co * plane;
      const float bv = bias.ptr<float>()[co];
      for (int64_t i = 0; i < plane; ++i) p[i] += bv;
    }
  }
}

void group_norm(const Tensor& x, const Tensor& weight, const Tensor& bias, int groups, float eps, bool apply_silu,
                const Tensor& y) {
  check_f32(x, "group_norm", "input", 4);
  check_f32(y, "group_norm", "output", 4);
  if (x.shape() != y.shape()) shape_error("group_norm", x, y);
  const int64_t B = x.size(0), C = x.size(1), plane = x.size(2) * x.size(3);
  if (groups <= 0 || C % groups != 0)
    throw Error("cpu backend: group_norm: " + std::to_string(C) + " channels do not split into " +
                std::to_string(groups) + " groups");
  check_vector(weight, C, "group_norm", "weight");
  check_vector(bias, C, "group_norm", "bias");
  const int64_t cg = C / groups, n = cg * plane;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t offset = (b * C + g * cg) * plane;
      const float* xs = x.ptr<float>() + offset;
      // Two passes in double: the groups of a 1024x1024 decode hold millions of values.
      const auto [m, inv] = norm_stats(xs, n, double(eps));
      // Statistics are complete before any write, so y may alias x.
      float* ys = y.ptr<float>() + offset;
      for (int64_t c = 0; c < cg; ++c) {
        const float wc = weight.ptr<float>()[g * cg + c], bc = bias.ptr<float>()[g * cg + c];
        for (int64_t i = c * plane; i < (c + 1) * plane; ++i) {
          const float v = (xs[i] - m) * inv * wc + bc;
          ys[i] = apply_silu ? silu(v) : v;
        }
      }
    }
}

void upsample_nearest2x(const Tensor& x, const Tensor& y) {
  check_f32(x, "upsample_nearest2x", "input", 4);
  check_f32(y, "upsample_nearest2x", "output", 4);
  const int64_t H = x.size(2), W = x.size(3);
  if (y.size(0) != x.size(0) || y.size(1) != x.size(1) || y.size(2) != 2 * H || y.size(3) != 2 * W)
    shape_error("upsample_nearest2x", x, y);
  const int64_t planes = x.size(0) * x.size(1);
  for (int64_t p = 0; p < planes; ++p)
    for (int64_t i = 0; i < H; ++i) {
      const float* src = x.ptr<float>() + (p * H + i) * W;
      float* dst = y.ptr<float>() + (p * 2 * H + 2 * i) * 2 * W;
      for (int64_t j = 0; j < W; ++j) dst[2 * j] = dst[2 * j + 1] = src[j];
      std::memcpy(dst + 2 * W, dst, size_t(2 * W) * 4);  // the second output row repeats the first
    }
}

void transpose_last2(const Tensor& x, const Tensor& y) {
  check_f32(x, "transpose_last2", "input", 3);
  check_f32(y, "transpose_last2", "output", 3);
  const int64_t B = x.size(0), R = x.size(1), C = x.size(2);
  if (y.size(0) != B || y.size(1) != C || y.size(2) != R) shape_error("transpose_last2", x, y);
  // Tiles keep both the reads and the writes within a few cache lines.
  constexpr int64_t T = 32;
  for (int64_t b = 0; b < B; ++b) {
    const float* xs = x.ptr<float>() + b * R * C;
    float* ys = y.ptr<float>() + b * R * C;
    for (int64_t r0 = 0; r0 < R; r0 += T)
      for (int64_t c0 = 0; c0 < C; c0 += T)
        for (int64_t r = r0; r < std::min(r0 + T, R); ++r)
          for (int64_t c = c0; c < std::min(c0 + T, C); ++c) ys[c * R + r] = xs[r * C + c];
  }
}

void unpack_unscale_latents(const Tensor& packed, float scaling, float shift, const Tensor& out) {
  const char* op = "unpack_unscale_latents";
  check_f32(packed, op, "packed latents", 3);
  check_f32(out, op, "output", 4);
  const int64_t B = out.size(0), C = out.size(1), h = out.size(2), w = out.size(3);
  if (h % 2 || w % 2 || packed.size(0) != B || packed.size(1) != (h / 2) * (w / 2) || packed.size(2) != 4 * C)
    throw Error("cpu backend: " + std::string(op) + ": packed latents " + shape_str(packed.shape()) +
                " do not unpack to " + shape_str(out.shape()) + " (expected [B, (h/2)(w/2), 4C] with h, w even)");
  const float* src = packed.ptr<float>();
  float* o = out.ptr<float>();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t c = 0; c < C; ++c)
      for (int64_t y = 0; y < h; ++y)
        for (int64_t x = 0; x < w; ++x)
          *o++ = unscale_latent(src[flux_packed_index(b, c, y, x, C, h, w)], scaling, shift);
}

void image_to_u8(const Tensor& image, const Tensor& out) {
  const char* op = "image_to_u8";
  check_f32(image, op, "image", 4);
  const int64_t B = image.size(0), C = image.size(1), H = image.size(2), W = image.size(3);
  if (out.dtype() != DType::U8 || out.device() != Device::CPU || !out.is_contiguous() ||
      out.shape() != Shape{B, H, W, C})
    throw Error("cpu backend: " + std::string(op) + ": output must be a contiguous uint8 host tensor " +
                shape_str({B, H, W, C}) + " for image " + shape_str(image.shape()) + ", got " +
                std::string(dtype_name(out.dtype())) + " " + shape_str(out.shape()));
  const float* s = image.ptr<float>();
  uint8_t* o = out.ptr<uint8_t>();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t c = 0; c < C; ++c)
      for (int64_t p = 0; p < H * W; ++p) o[(b * H * W + p) * C + c] = u8_pixel(unit_pixel(*s++));
}

}  // namespace fluxswap::cpu_ops

namespace fluxswap {

// The CPU backend has no overrides of its own for these: its tensors live on the host, where the defaults run.

void Backend::unpack_unscale_latents(const Tensor& packed, float scaling, float shift, const Tensor& out) {
  if (packed.device() != Device::CPU || out.device() != Device::CPU)
    throw Error("unpack_unscale_latents is not implemented by the " + name() + " backend");
  cpu_ops::unpack_unscale_latents(packed, scaling, shift, out);
}

void Backend::image_to_u8(const Tensor& image, const Tensor& out) {
  if (image.device() != Device::CPU || out.device() != Device::CPU)
    throw Error("image_to_u8 is not implemented by the " + name() + " backend");
  cpu_ops::image_to_u8(image, out);
}

void Backend::copy_to_host(const Tensor& src, const Tensor& host_dst) {
  if (src.device() != Device::CPU) throw Error("copy_to_host is not implemented by the " + name() + " backend");
  if (host_dst.device() != Device::CPU || src.dtype() != host_dst.dtype() || src.shape() != host_dst.shape() ||
      !src.is_contiguous() || !host_dst.is_contiguous())
    throw Error("copy_to_host: " + std::string(dtype_name(src.dtype())) + " " + shape_str(src.shape()) +
                " must go into a contiguous host tensor of the same dtype and shape, got " +
                std::string(dtype_name(host_dst.dtype())) + " " + shape_str(host_dst.shape()));
  if (src.nbytes() && src.data() != host_dst.data()) std::memmove(host_dst.data(), src.data(), src.nbytes());
}

}  // namespace fluxswap
