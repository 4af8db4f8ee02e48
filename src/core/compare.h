#pragma once
// The project's closeness measure for tensors: max|a - b| / max|b|, infinite when shapes differ or either
// side holds a NaN or an infinity (so a NaN never passes a tolerance).
#include "core/tensor.h"

namespace fluxswap {

double max_rel_error(const Tensor& a, const Tensor& b);

// For lossy formats (FP8) where elementwise bounds say little: cosine similarity of the flattened tensors, and
// PSNR in dB with the reference's peak |b| as the signal (NaN for different shapes or non-finite values).
double cosine_similarity(const Tensor& a, const Tensor& b);
double psnr_db(const Tensor& a, const Tensor& b);

}  // namespace fluxswap
