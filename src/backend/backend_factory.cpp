#include "backend/backend.h"
#include "core/error.h"

namespace fluxswap {

void Backend::copy(const Tensor&, const Tensor&) { throw Error("copy is not implemented by the " + name() + " backend"); }
void Backend::add_matmul(const Tensor&, const Tensor&, const Tensor&, const Tensor&) {
  throw Error("add_matmul is not implemented by the " + name() + " backend");
}
void Backend::lora_linear(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                          const Tensor&, Activation) {
  throw Error("lora_linear is not implemented by the " + name() + " backend");
}

#ifndef FLUXSWAP_HAVE_CUDA
std::unique_ptr<Backend> make_cuda_backend(int) {
  throw Error("this build of fluxswap has no CUDA backend (configure with -DFLUXSWAP_CUDA=ON where nvcc exists)");
}
#endif

std::unique_ptr<Backend> make_backend(const std::string& name) {
  if (name == "cpu") return make_cpu_backend();
  if (name == "cuda") return make_cuda_backend(0);
  throw Error("unknown device '" + name + "', expected cpu or cuda");
}

}  // namespace fluxswap
