#pragma once
// Every CUDA, cuBLASLt and cuDNN status goes through these: a failure becomes a fluxswap::Error that names the
// backend op that was running and the library call that failed.
#include <cublasLt.h>
#include <cuda_runtime.h>

#include <string>

#include "core/error.h"

namespace fluxswap::cuda {

[[noreturn]] inline void fail(const char* op, const char* call, const std::string& why) {
  throw Error(std::string("cuda backend: ") + op + ": " + call + " failed: " + why);
}

inline void check(cudaError_t status, const char* op, const char* call) {
  if (status != cudaSuccess)
    fail(op, call, std::string(cudaGetErrorName(status)) + " (" + cudaGetErrorString(status) + ")");
}

inline void check(cublasStatus_t status, const char* op, const char* call) {
  if (status != CUBLAS_STATUS_SUCCESS) fail(op, call, "cublas status " + std::to_string(int(status)));
}

// After a kernel launch: launch-configuration errors surface here, asynchronous faults at the next sync.
inline void check_launch(const char* op, const char* kernel) { check(cudaGetLastError(), op, kernel); }

}  // namespace fluxswap::cuda
