#pragma once
// Counters for GET /metrics, in the Prometheus text format (version 0.0.4). Written from handler threads and the
// worker without locks where a single atomic suffices; rendering reads a consistent-enough snapshot (Prometheus
// tolerates counters read a few microseconds apart).
#include <array>
#include <atomic>
#include <cstdint>
#include <map>
#include <mutex>
#include <optional>
#include <string>

namespace fluxswap {

class Metrics {
 public:
  // Request latency buckets (seconds, upper bounds): from one tiny-model step to a long FLUX.1-dev batch.
  static constexpr std::array<double, 12> kBuckets = {0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 120};

  std::atomic<uint64_t> generations{0};  // requests answered with images
  std::atomic<uint64_t> images{0};
  std::atomic<uint64_t> lora_swaps{0};  // adapter-set changes applied to the model
  std::atomic<uint64_t> adapter_cache_hits{0}, adapter_cache_misses{0};
  std::atomic<uint64_t> cancelled_timeout{0}, cancelled_disconnect{0};
  std::atomic<int> in_progress{0};  // generations running on the worker (0 or 1)
  std::atomic<double> lora_swap_seconds{0};
  // Device memory, published by the worker after each request (the backend is the worker's alone).
  std::atomic<bool> have_gpu_memory{false};
  std::atomic<uint64_t> gpu_memory_bytes{0}, gpu_memory_peak_bytes{0};

  void observe_latency(double seconds);
  void count_error(int status);
  uint64_t errors(int status) const;
  uint64_t latency_count() const;

  // `queue_depth` and `ready` come from their owners at render time.
  std::string render(size_t queue_depth, bool ready) const;

 private:
  mutable std::mutex mutex_;
  std::array<uint64_t, kBuckets.size()> bucket_counts_{};  // non-cumulative; rendered cumulative
  uint64_t latency_count_ = 0;
  double latency_sum_ = 0;
  std::map<int, uint64_t> errors_;
};

}  // namespace fluxswap
