#pragma once
// Dropping a reference on a short-lived thread of its own, for objects whose destruction is slow and on nobody's
// path: unmapping a 700 MB file whose page table is filled costs ~10 ms, which a LoRA swap that drops the previous
// adapter's mapping should not wait for.
#include <memory>
#include <thread>

namespace fluxswap {

template <typename T>
void release_in_background(std::shared_ptr<T> p) {
  if (!p) return;
  try {
    std::thread([p = std::move(p)]() mutable { p.reset(); }).detach();
  } catch (...) {
    // No thread to be had: the lambda that holds the reference is gone already, dropping it here.
  }
}

// A handle on `owned` whose last copy hands `owned` to release_in_background instead of dropping it in place.
template <typename T>
std::shared_ptr<void> releasing_in_background(std::shared_ptr<T> owned) {
  void* raw = const_cast<void*>(static_cast<const void*>(owned.get()));
  return std::shared_ptr<void>(raw, [keep = std::move(owned)](void*) mutable { release_in_background(std::move(keep)); });
}

}  // namespace fluxswap
