#pragma once
// A component's weights leaving the device between uses and coming back (under a memory budget the text encoders
// encode, then leave). Weights already in host memory (loaded there for a streamed transformer block) are copied
// in by the first offload like device ones. The first offload copies the weights into one host buffer (pinned where the backend has
// pinned memory), which then stays: these components never change their weights, so later offloads only free the
// device copies, and every onload is one device allocation filled by one batched transfer.
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "backend/backend.h"

namespace fluxswap {

class WeightOffload {
 public:
  // `weights`: pointers to every device tensor of the component, in a fixed order (its weights struct's
  // device_tensors()); they are rewritten in place: undefined while offloaded, views of one device allocation after
  // onload. Undefined entries (optional layers) stay undefined. `what` names the component in errors. Both are
  // idempotent. offload synchronises the backend first: queued work may still read the weights.
  void offload(Backend& backend, const std::vector<Tensor*>& weights, const std::string& what);
  void onload(Backend& backend, const std::vector<Tensor*>& weights, const std::string& what);
  bool resident() const { return resident_; }
  // The weights changed on the device (a merged LoRA, a requantisation): the next offload copies them again.
  void invalidate();
  // While offloaded: points the weights at `device_bytes` (U8, at least arena_bytes()) with the host copy's layout,
  // without copying; whoever owns that memory fills it (weight streaming uploads host_arena() into it per step).
  void bind(const Tensor& device_bytes, const std::vector<Tensor*>& weights, const std::string& what);
  // The host copy of every weight, laid out as one onload places them (undefined before the first offload).
  const Tensor& host_arena() const { return host_arena_; }
  // Bytes one onload allocates on the device (the tensors, each aligned); 0 before the first offload.
  uint64_t arena_bytes() const { return arena_bytes_; }
  // The component's device weight bytes: what it holds while resident, what an onload would take while offloaded.
  uint64_t weight_bytes(const std::vector<Tensor*>& weights) const;

 private:
  std::vector<Tensor> host_;  // per weight, a view of the host copy (undefined for undefined weights)
  std::vector<size_t> offset_;
  Tensor host_arena_;         // U8 [arena_bytes_]
  uint64_t arena_bytes_ = 0;
  bool resident_ = true;
};

// Bytes of memory the tensors occupy: tensors sharing an allocation (views of one buffer, a LoRA slot inside
// [W | up], an onloaded arena) count once, by the span of that allocation they cover. Undefined tensors count 0.
uint64_t tensor_storage_bytes(const std::vector<const Tensor*>& tensors);

}  // namespace fluxswap
