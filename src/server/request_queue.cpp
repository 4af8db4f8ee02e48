#include "server/request_queue.h"

#include <algorithm>

namespace fluxswap {

bool RequestQueue::push(std::shared_ptr<GenerationJob> job) {
  {
    std::lock_guard lock(mutex_);
    if (closed_ || jobs_.size() >= capacity_) return false;
    jobs_.push_back(std::move(job));
  }
  cv_.notify_one();
  return true;
}

std::shared_ptr<GenerationJob> RequestQueue::pop(const std::string& current_adapter_key) {
  std::unique_lock lock(mutex_);
  for (;;) {
    // Cancelled jobs have been answered already; dropping them here frees their slots.
    std::erase_if(jobs_, [](const auto& j) { return j->cancel.load() != 0; });
    if (closed_) return nullptr;
    if (!jobs_.empty()) break;
    cv_.wait(lock);
  }
  auto pick = jobs_.begin();
  // Arrival order means every bypass also passed over the oldest job, so it carries the largest count and
  // checking it alone bounds the wait of all of them.
  if ((*pick)->adapter_key != current_adapter_key && (*pick)->bypassed < max_bypass_) {
    auto same = std::find_if(jobs_.begin(), jobs_.end(),
                             [&](const auto& j) { return j->adapter_key == current_adapter_key; });
    if (same != jobs_.end()) {
      for (auto it = jobs_.begin(); it != same; ++it) ++(*it)->bypassed;
      pick = same;
    }
  }
  std::shared_ptr<GenerationJob> job = std::move(*pick);
  jobs_.erase(pick);
  return job;
}

bool RequestQueue::remove(const GenerationJob* job) {
  std::lock_guard lock(mutex_);
  auto it = std::find_if(jobs_.begin(), jobs_.end(), [&](const auto& j) { return j.get() == job; });
  if (it == jobs_.end()) return false;
  jobs_.erase(it);
  return true;
}

size_t RequestQueue::depth() const {
  std::lock_guard lock(mutex_);
  return jobs_.size();
}

std::vector<std::shared_ptr<GenerationJob>> RequestQueue::close() {
  std::vector<std::shared_ptr<GenerationJob>> left;
  {
    std::lock_guard lock(mutex_);
    closed_ = true;
    left.assign(jobs_.begin(), jobs_.end());
    jobs_.clear();
  }
  cv_.notify_all();
  return left;
}

}  // namespace fluxswap
