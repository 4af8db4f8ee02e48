// Placeholders until the CUDA LoRA and sampler ops land: each throws.
#include "backend/cuda/cuda_backend.h"

namespace fluxswap::cuda {

void CudaBackend::axpy(const Tensor&, float, const Tensor&) { bad("axpy", "not implemented yet"); }
void CudaBackend::copy(const Tensor&, const Tensor&) { bad("copy", "not implemented yet"); }
void CudaBackend::add_matmul(const Tensor&, const Tensor&, const Tensor&, const Tensor&) {
  bad("add_matmul", "not implemented yet");
}
void CudaBackend::lora_linear(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                              const Tensor&, Activation) {
  bad("lora_linear", "not implemented yet");
}

}  // namespace fluxswap::cuda
