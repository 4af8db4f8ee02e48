#include "core/compare.h"

#include <algorithm>
#include <cmath>
#include <limits>

namespace fluxswap {

double max_rel_error(const Tensor& a, const Tensor& b) {
  const double inf = std::numeric_limits<double>::infinity();
  if (a.shape() != b.shape()) return inf;
  Tensor fa = a.to_f32(), fb = b.to_f32();
  double max_diff = 0, max_ref = 0;
  for (int64_t i = 0; i < fa.numel(); ++i) {
    const double x = fa.ptr<float>()[i], y = fb.ptr<float>()[i];
    if (!std::isfinite(x) || !std::isfinite(y)) return inf;
    max_diff = std::max(max_diff, std::fabs(x - y));
    max_ref = std::max(max_ref, std::fabs(y));
  }
  return max_ref > 0 ? max_diff / max_ref : max_diff;
}

double cosine_similarity(const Tensor& a, const Tensor& b) {
  if (a.shape() != b.shape()) return std::nan("");
  Tensor fa = a.to_f32(), fb = b.to_f32();
  double ab = 0, aa = 0, bb = 0;
  for (int64_t i = 0; i < fa.numel(); ++i) {
    const double x = fa.ptr<float>()[i], y = fb.ptr<float>()[i];
    if (!std::isfinite(x) || !std::isfinite(y)) return std::nan("");
    ab += x * y, aa += x * x, bb += y * y;
  }
  return aa > 0 && bb > 0 ? ab / std::sqrt(aa * bb) : (aa == bb ? 1.0 : 0.0);
}

double psnr_db(const Tensor& a, const Tensor& b) {
  if (a.shape() != b.shape() || a.numel() == 0) return std::nan("");
  Tensor fa = a.to_f32(), fb = b.to_f32();
  double se = 0, peak = 0;
  for (int64_t i = 0; i < fa.numel(); ++i) {
    const double x = fa.ptr<float>()[i], y = fb.ptr<float>()[i];
    if (!std::isfinite(x) || !std::isfinite(y)) return std::nan("");
    se += (x - y) * (x - y);
    peak = std::max(peak, std::fabs(y));
  }
  const double mse = se / double(fa.numel());
  return mse > 0 ? 10.0 * std::log10(peak * peak / mse) : std::numeric_limits<double>::infinity();
}

}  // namespace fluxswap
