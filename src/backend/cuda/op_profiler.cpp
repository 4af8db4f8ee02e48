#include "backend/cuda/op_profiler.h"

#include "backend/cuda/cuda_check.h"

namespace fluxswap::cuda {

OpProfiler::~OpProfiler() {
  for (const Pending& p : pending_) {
    cudaEventDestroy(p.start);
    cudaEventDestroy(p.stop);
  }
  for (cudaEvent_t e : free_events_) cudaEventDestroy(e);
}

void OpProfiler::set_enabled(bool on) {
  if (on && !enabled_) {
    totals();  // settles and recycles events left from an earlier session
    totals_.clear();
  }
  enabled_ = on;
}

cudaEvent_t OpProfiler::take_event() {
  if (!free_events_.empty()) {
    cudaEvent_t e = free_events_.back();
    free_events_.pop_back();
    return e;
  }
  cudaEvent_t e = nullptr;
  check(cudaEventCreate(&e), "profiling", "cudaEventCreate");
  return e;
}

void OpProfiler::begin(std::string op, cudaStream_t stream) {
  Pending p{std::move(op), take_event(), take_event()};
  pending_.push_back(p);
  check(cudaEventRecord(p.start, stream), p.op.c_str(), "cudaEventRecord");
}

void OpProfiler::end(cudaStream_t stream) {
  check(cudaEventRecord(pending_.back().stop, stream), pending_.back().op.c_str(), "cudaEventRecord");
}

void OpProfiler::cancel() {
  free_events_.push_back(pending_.back().start);
  free_events_.push_back(pending_.back().stop);
  pending_.pop_back();
}

std::map<std::string, double> OpProfiler::totals() {
  for (const Pending& p : pending_) {
    check(cudaEventSynchronize(p.stop), "profile_ms", "cudaEventSynchronize");
    float ms = 0.0f;
    check(cudaEventElapsedTime(&ms, p.start, p.stop), "profile_ms", "cudaEventElapsedTime");
    totals_[p.op] += ms;
    free_events_.push_back(p.start);
    free_events_.push_back(p.stop);
  }
  pending_.clear();
  return totals_;
}

}  // namespace fluxswap::cuda
