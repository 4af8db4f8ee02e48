#pragma once
// Fused flash attention through the cuDNN frontend's SDPA graph: bf16 q, k [B, H, S, D] and v (its own heads or
// read in place from the qkv rows) in, the output written straight into the strided rows [B, S, H*D] (as a
// [B, H, S, D] tensor with strides (sb, D, sn, 1)); or all of them e4m3 with per-tensor scales (on Hopper cuDNN's
// FP8 attention writes e4m3 only).
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
  int64_t v_sb, v_sh, v_ss;  // v's strides: its own heads (S*H*D, S*D, D), or the v columns of qkv rows (sb, D, sn)
  bool fp8 = false;          // e4m3 q, k, v and output (see run_fp8)
  auto operator<=>(const AttentionShape&) const = default;
  bool v_in_heads() const { return v_sb == H * S * D && v_sh == S * D && v_ss == D; }
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
  // The FP8 form (shape.fp8): e4m3 q, k, v [B, H, S, D] and output (at the shape's strides), the descales and
  // scales read from, and the probabilities' and output's amax written to, `slots` (fp8_attention_kernels.h).
  void run_fp8(const AttentionShape& shape, const void* q8, const void* k8, const void* v8, void* o8, float* slots);

 private:
  struct Plan;
  struct Handle;
  DeviceMemory& memory_;
  std::unique_ptr<Handle> handle_;
  std::map<AttentionShape, std::unique_ptr<Plan>> plans_;
};

}  // namespace fluxswap::cuda
