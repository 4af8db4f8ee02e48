// make_cuda_backend: the entry point the backend factory reaches when the build has CUDA.
#include "backend/cuda/cuda_backend.h"

namespace fluxswap {

std::unique_ptr<Backend> make_cuda_backend(int device_index) {
  int count = 0;
  if (const cudaError_t e = cudaGetDeviceCount(&count); e != cudaSuccess) {
    cudaGetLastError();
    throw Error(std::string("no usable CUDA device: cudaGetDeviceCount failed: ") + cudaGetErrorName(e) + " (" +
                cudaGetErrorString(e) + ")");
  }
  if (device_index < 0 || device_index >= count)
    throw Error("no CUDA device " + std::to_string(device_index) + " (" + std::to_string(count) + " present)");
  return std::make_unique<cuda::CudaBackend>(device_index);
}

}  // namespace fluxswap
