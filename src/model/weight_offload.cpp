#include "model/weight_offload.h"

#include <algorithm>
#include <cstring>
#include <map>

#include "core/error.h"

namespace fluxswap {

namespace {

// Every weight starts on a 256-byte boundary in both copies (what cuBLASLt and the vector kernels like), so one
// transfer moves the whole arena and the offsets agree on both sides.
constexpr size_t kAlign = 256;

// Bytes from a tensor's first element to just past its last (its strides may leave gaps).
size_t span_bytes(const Tensor& t) {
  if (t.numel() == 0) return 0;
  int64_t last = 0;
  for (int d = 0; d < t.ndim(); ++d) last += (t.size(d) - 1) * t.stride(d);
  return size_t(last + 1) * dtype_size(t.dtype());
}

}  // namespace

void WeightOffload::offload(Backend& backend, const std::vector<Tensor*>& weights, const std::string& what) {
  if (!resident_) return;
  backend.synchronize();
  if (!host_arena_.defined()) {
    // First offload: lay the weights out and copy them to the host once.
    offset_.assign(weights.size(), 0);
    size_t total = 0;
    for (size_t i = 0; i < weights.size(); ++i) {
      const Tensor& w = *weights[i];
      if (!w.defined()) continue;
      if (!w.is_contiguous())
        throw Error(what + ": weight " + std::to_string(i) + " " + shape_str(w.shape()) +
                    " is a strided view; only contiguous weights can be offloaded");
      offset_[i] = total;
      total += (w.nbytes() + kAlign - 1) / kAlign * kAlign;
    }
    const HostBufferAllocator pinned = backend.host_buffer_allocator();
    if (pinned) {
      std::shared_ptr<void> owner = pinned(std::max<size_t>(total, 1));
      host_arena_ = Tensor::borrow(owner.get(), DType::U8, {int64_t(total)}, Device::CPU, owner);
    } else {
      host_arena_ = Tensor::empty(DType::U8, {int64_t(total)});
    }
    host_.assign(weights.size(), Tensor());
    auto* base = static_cast<unsigned char*>(host_arena_.data());
    for (size_t i = 0; i < weights.size(); ++i) {
      const Tensor& w = *weights[i];
      if (!w.defined()) continue;
      host_[i] = Tensor::borrow(base + offset_[i], w.dtype(), w.shape(), Device::CPU, host_arena_.owner());
      if (w.device() == Device::CPU)
        std::memcpy(host_[i].data(), w.data(), w.nbytes());
      else
        backend.copy_to_host(w, host_[i]);
    }
    arena_bytes_ = total;
    backend.synchronize();  // the copies land before the device memory they read is freed
  } else if (weights.size() != host_.size()) {
    throw Error(what + ": offloading " + std::to_string(weights.size()) + " weights, but " +
                std::to_string(host_.size()) + " were offloaded before");
  }
  for (Tensor* w : weights) *w = Tensor();
  resident_ = false;
}

void WeightOffload::onload(Backend& backend, const std::vector<Tensor*>& weights, const std::string& what) {
  if (resident_) return;
  if (weights.size() != host_.size())
    throw Error(what + ": onloading " + std::to_string(weights.size()) + " weights, but " +
                std::to_string(host_.size()) + " were offloaded");
  const Tensor arena = backend.empty(DType::U8, {int64_t(arena_bytes_)});
  backend.copy_from_host_batch({{host_arena_, arena}});
  auto* base = static_cast<unsigned char*>(arena.data());
  for (size_t i = 0; i < weights.size(); ++i)
    if (host_[i].defined())
      *weights[i] = Tensor::borrow(base + offset_[i], host_[i].dtype(), host_[i].shape(), backend.device(),
                                   arena.owner());
  resident_ = true;
}

void WeightOffload::invalidate() {
  if (!resident_) throw Error("internal: weights changed while offloaded");
  host_arena_ = Tensor();
  host_.clear();
  offset_.clear();
  arena_bytes_ = 0;
}

void WeightOffload::bind(const Tensor& device_bytes, const std::vector<Tensor*>& weights, const std::string& what) {
  if (resident_) throw Error(what + ": only offloaded weights can be bound to other device memory");
  if (weights.size() != host_.size())
    throw Error(what + ": binding " + std::to_string(weights.size()) + " weights, but " + std::to_string(host_.size()) +
                " were offloaded");
  if (device_bytes.nbytes() < arena_bytes_)
    throw Error(what + ": a " + std::to_string(device_bytes.nbytes()) + "-byte buffer cannot hold " +
                std::to_string(arena_bytes_) + " bytes of weights");
  auto* base = static_cast<unsigned char*>(device_bytes.data());
  for (size_t i = 0; i < weights.size(); ++i)
    if (host_[i].defined())
      *weights[i] = Tensor::borrow(base + offset_[i], host_[i].dtype(), host_[i].shape(), device_bytes.device(),
                                   device_bytes.owner());
}

uint64_t tensor_storage_bytes(const std::vector<const Tensor*>& tensors) {
  // Per allocation (its owner; the data pointer for tensors without one), the span its tensors cover.
  std::map<const void*, std::pair<const char*, const char*>> spans;
  for (const Tensor* t : tensors) {
    if (!t->defined() || t->numel() == 0) continue;
    const void* key = t->owner() ? t->owner().get() : t->data();
    const char* lo = static_cast<const char*>(t->data());
    const char* hi = lo + span_bytes(*t);
    auto [it, fresh] = spans.emplace(key, std::pair{lo, hi});
    if (!fresh) it->second = {std::min(it->second.first, lo), std::max(it->second.second, hi)};
  }
  uint64_t total = 0;
  for (const auto& [key, span] : spans) total += uint64_t(span.second - span.first);
  return total;
}

uint64_t WeightOffload::weight_bytes(const std::vector<Tensor*>& weights) const {
  if (!resident_) return arena_bytes_;
  return tensor_storage_bytes({weights.begin(), weights.end()});
}

}  // namespace fluxswap
