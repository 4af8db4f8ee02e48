#pragma once
// The project's one closeness measure for tensors: max|a - b| / max|b|, infinite when shapes differ or either
// side holds a NaN or an infinity (so a NaN never passes a tolerance).
#include "core/tensor.h"

namespace fluxswap {

double max_rel_error(const Tensor& a, const Tensor& b);

}  // namespace fluxswap
