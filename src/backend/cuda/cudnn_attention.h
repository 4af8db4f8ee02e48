#pragma once
// Fused flash attention through the cuDNN frontend's SDPA graph: bf16 q, k, v [B, H, S, D] in, the output written
// straight into the strided rows [B, S, H*D] (as a [B, H, S, D] tensor with strides (sb, D, sn, 1)).
// One built graph and its workspace per shape; building while a CUDA graph is captured is an error.
#include <cuda_runtime.h>

#include <compare>
#include <cstdint>
#include <map>
#include <memory>

#include "backend/cuda/device_memory.h"

namespace fluxswap::cuda {

struct AttentionShape {
  int64_t B, H, S, D, out_sb, out_sn;
  auto operator<=>(const AttentionShape&) const = default;
};

class CudnnAttention {
 public:
  // Throws Error when this build has no cuDNN or the cuDNN handle cannot be created.
  CudnnAttention(DeviceMemory& memory, cudaStream_t stream);
  ~CudnnAttention();
  CudnnAttention(const CudnnAttention&) = delete;
  CudnnAttention& operator=(const CudnnAttention&) = delete;

  bool has_plan(const AttentionShape& shape) const { return plans_.count(shape) != 0; }
  // Builds the graph for a shape; throws Error with cuDNN's reason when it is not supported.
  void build(const AttentionShape& shape);
  // Enqueues attention for a shape whose plan exists.
  void run(const AttentionShape& shape, const void* q, const void* k, const void* v, void* out);

 private:
  struct Plan;
  struct Handle;
  DeviceMemory& memory_;
  std::unique_ptr<Handle> handle_;
  std::map<AttentionShape, std::unique_ptr<Plan>> plans_;
};

}  // namespace fluxswap::cuda
