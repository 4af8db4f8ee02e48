#include "core/compare.h"

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

}  // namespace fluxswap
