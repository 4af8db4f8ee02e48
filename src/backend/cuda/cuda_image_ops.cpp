// Placeholders until the CUDA VAE ops land: each throws.
#include "backend/cuda/cuda_backend.h"

namespace fluxswap::cuda {

void CudaBackend::conv2d(const Tensor&, const Tensor&, const Tensor&, int, const Tensor&) {
  bad("conv2d", "not implemented yet");
}
void CudaBackend::group_norm(const Tensor&, const Tensor&, const Tensor&, int, float, bool, const Tensor&) {
  bad("group_norm", "not implemented yet");
}
void CudaBackend::upsample_nearest2x(const Tensor&, const Tensor&) { bad("upsample_nearest2x", "not implemented yet"); }
void CudaBackend::transpose_last2(const Tensor&, const Tensor&) { bad("transpose_last2", "not implemented yet"); }

}  // namespace fluxswap::cuda
