#pragma once
// 2-D convolution (stride 1, zero padding) through the cuDNN frontend's conv_fprop graph: bf16 in and out, float32
// accumulation, the bias add fused as a pointwise node after the convolution when cuDNN can fuse it (else a
// separate per-channel add). The tensors are NCHW at the backend's interface. In the NHWC layout (the default, see
// cuda_image_ops.cpp) the plan transposes x and w to channels-last copies, runs cuDNN on those and transposes the
// result back; in the NCHW layout cuDNN runs on the tensors as they are.
// One built graph per shape; building while a CUDA graph is captured is the caller's error to prevent.
#include <cuda_runtime.h>

#include <compare>
#include <cstdint>
#include <map>
#include <memory>
#include <vector>

#include "backend/cuda/device_memory.h"

namespace fluxswap::cuda {

enum class ConvLayout { Nchw, Nhwc };

struct ConvShape {
  int64_t B, Cin, H, W, Cout, kh, kw, pad;
  bool bias;
  ConvLayout layout;
  int64_t Ho() const { return H + 2 * pad - kh + 1; }
  int64_t Wo() const { return W + 2 * pad - kw + 1; }
  auto operator<=>(const ConvShape&) const = default;
};

class CudnnConv {
 public:
  // Throws Error when this build has no cuDNN or the cuDNN handle cannot be created.
  explicit CudnnConv(cudaStream_t stream);
  ~CudnnConv();
  CudnnConv(const CudnnConv&) = delete;
  CudnnConv& operator=(const CudnnConv&) = delete;

  bool has_plan(const ConvShape& shape) const { return plans_.count(shape) != 0; }
  // Builds the plan for a shape and grows the scratch it runs with; throws Error with cuDNN's reason when no
  // engine supports it.
  void build(const ConvShape& shape, DeviceMemory& memory);
  // Enqueues the convolution of a shape whose plan exists; every pointer 16-byte aligned, bias null when the shape
  // has none. `capturing`: the stream is being recorded.
  void run(const ConvShape& shape, const void* x, const void* w, const void* bias, void* y, bool capturing);
  // The scratch for a shape whose plan exists, grown again after release_scratch (throws Error past a budget).
  void ensure_scratch(const ConvShape& shape, DeviceMemory& memory);
  // Frees the scratch arena between uses (a budget needs the room between decodes) unless a recording may use it.
  void release_scratch();

 private:
  struct Plan;
  struct Handle;
  void grow_scratch(size_t bytes, DeviceMemory& memory);

  cudaStream_t stream_;
  std::unique_ptr<Handle> handle_;
  std::map<ConvShape, std::unique_ptr<Plan>> plans_;
  // One arena for every plan, which run one at a time on the stream: cuDNN's workspace and the NHWC copies. Per
  // plan they would add up to gigabytes over the decoder's shapes at 1024x1024; shared, the largest layer sets the
  // size. A superseded arena is freed unless a recording may use it (it was used while capturing): then it is
  // kept as long as this object.
  std::shared_ptr<void> scratch_;
  size_t scratch_bytes_ = 0;
  bool scratch_recorded_ = false;
  std::vector<std::shared_ptr<void>> retired_;
};

}  // namespace fluxswap::cuda
