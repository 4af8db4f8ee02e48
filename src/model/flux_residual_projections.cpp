// FluxTransformer's block output projections and their gated residual: where the backend can, an FP8 projection is
// added onto the residual inside its GEMM (Backend::linear_fp8_residual and its quantised form), the gate folded
// into the product's per-output factors (a step's are made up front: gated_factors_up_front, beside the blocks).
// Elsewhere the projection goes into the branch buffer and its residual stays pending for the next fused LayerNorm.
#include "model/flux_transformer.h"

namespace fluxswap {

const Backend::GatedFactors& FluxTransformer::ready_factors(const Linear& l) const {
  static const Backend::GatedFactors none;
  const auto it = ready_factors_.find(&l);
  return it == ready_factors_.end() ? none : it->second;
}

bool FluxTransformer::fp8_projection_in_gemm(const Linear& l) const {
  return quantized_input(l) && backend_.fp8_residual_in_gemm();
}

FluxTransformer::Residual FluxTransformer::project(const Tensor& in_room, int64_t in, const Linear& l,
                                                   const Tensor& gate, const Tensor& x, const Tensor& branch) {
  if (fp8_projection_in_gemm(l)) {
    backend_.linear_fp8_residual(in_room.narrow(-1, 0, in), l.weight_fp8, l.weight_scale, l.bias, gate, x, branch,
                                 ready_factors(l));
    return {};
  }
  linear_roomy(in_room, in, l, branch);
  return {gate, branch};
}

FluxTransformer::Residual FluxTransformer::project_quantized(const Tensor& q8, const Tensor& q8_scale, const Linear& l,
                                                             const Tensor& gate, const Tensor& x, const Tensor& branch) {
  if (backend_.fp8_residual_in_gemm()) {
    backend_.linear_fp8_quantized_residual(q8, q8_scale, l.weight_fp8, l.weight_scale, l.bias, gate, x, branch,
                                           ready_factors(l));
    return {};
  }
  backend_.linear_fp8_quantized(q8, q8_scale, l.weight_fp8, l.weight_scale, l.bias, branch, Activation::None);
  return {gate, branch};
}

}  // namespace fluxswap
