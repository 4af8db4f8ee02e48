#pragma once
// Per-op device timing: an event pair around each op while enabled, read back lazily (totals() synchronises).
#include <cuda_runtime.h>

#include <map>
#include <string>
#include <vector>

namespace fluxswap::cuda {

class OpProfiler {
 public:
  OpProfiler() = default;
  ~OpProfiler();
  OpProfiler(const OpProfiler&) = delete;
  OpProfiler& operator=(const OpProfiler&) = delete;

  bool enabled() const { return enabled_; }
  // Turning it on clears the totals.
  void set_enabled(bool on);

  // Records the start and the end of one op on `stream`.
  void begin(std::string op, cudaStream_t stream);
  void end(cudaStream_t stream);
  // Drops the op begun last (it failed before its launches were issued).
  void cancel();

  // Milliseconds per op name since set_enabled(true).
  std::map<std::string, double> totals();

 private:
  struct Pending {
    std::string op;
    cudaEvent_t start, stop;
  };
  cudaEvent_t take_event();

  bool enabled_ = false;
  std::vector<Pending> pending_;
  std::vector<cudaEvent_t> free_events_;
  std::map<std::string, double> totals_;
};

}  // namespace fluxswap::cuda
