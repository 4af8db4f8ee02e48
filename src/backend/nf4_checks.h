#pragma once
// The operand checks of Backend::dequantize_nf4, shared by the host reference and the GPU backend.
#include <cstdint>
#include <string>

#include "core/tensor.h"

namespace fluxswap {

// Throws Error starting with `op` unless out is a contiguous 2-D matrix, packed contiguous U8 holding its codes and
// absmax contiguous float32 with one value per `blocksize` elements (a power of two from 32 to 4096).
void check_nf4_operands(const Tensor& packed, const Tensor& absmax, int64_t blocksize, const Tensor& out,
                        const std::string& op);

}  // namespace fluxswap
