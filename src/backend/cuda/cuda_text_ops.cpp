// Placeholders until the CUDA text-encoder ops land: each throws.
#include "backend/cuda/cuda_backend.h"

namespace fluxswap::cuda {

void CudaBackend::layer_norm(const Tensor&, const Tensor&, const Tensor&, float, const Tensor&) {
  bad("layer_norm", "not implemented yet");
}
void CudaBackend::rms_norm(const Tensor&, const Tensor&, float, const Tensor&) { bad("rms_norm", "not implemented yet"); }
void CudaBackend::embedding(const Tensor&, const Tensor&, const Tensor&, const Tensor&) {
  bad("embedding", "not implemented yet");
}
void CudaBackend::split_heads(const Tensor&, const Tensor&) { bad("split_heads", "not implemented yet"); }
void CudaBackend::attention_ex(const Tensor&, const Tensor&, const Tensor&, float, const Tensor&, bool, const Tensor&) {
  bad("attention_ex", "not implemented yet");
}
void CudaBackend::activation(const Tensor&, Activation, const Tensor&) { bad("activation", "not implemented yet"); }
void CudaBackend::mul(const Tensor&, const Tensor&) { bad("mul", "not implemented yet"); }

}  // namespace fluxswap::cuda
