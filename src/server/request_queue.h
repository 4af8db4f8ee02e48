#pragma once
// The bounded queue between HTTP handler threads and the GPU worker, and the job a request becomes.
//
// Order: FIFO, except that the worker prefers a job whose adapter set is the one already applied (no swap). A job
// passed over that way counts a bypass; once the oldest job has been bypassed max_bypass times it goes next
// whatever its adapters, so grouping can delay a request by at most max_bypass generations and never starve it.
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "lora/lora_stack.h"
#include "pipeline/flux_pipeline.h"
#include "server/image_request.h"

namespace fluxswap {

using ServerClock = std::chrono::steady_clock;

enum class CancelReason : int { None = 0, Timeout = 1, Disconnect = 2, Shutdown = 3 };

struct GenerationJob {
  // Set by the handler before the job is queued; read-only afterwards.
  ImageRequest request;
  uint64_t seed = 0;
  std::vector<ActiveLora> adapters;
  std::string adapter_key;  // equal keys: the same adapters with the same scales, so no swap is needed
  std::string lora_text;    // "name:scale, ..." for the PNG parameters
  ServerClock::time_point arrived, deadline;

  // The handler (timeout, disconnect) or the server (shutdown) asks the worker to stop; the worker polls it between
  // denoising steps. The first reason set wins.
  std::atomic<int> cancel{0};
  bool request_cancel(CancelReason why) {
    int none = 0;
    return cancel.compare_exchange_strong(none, int(why));
  }
  CancelReason cancel_reason() const { return CancelReason(cancel.load()); }

  // Written by the worker under `mutex`, then `done` and a notify.
  std::mutex mutex;
  std::condition_variable done_cv;
  bool done = false;
  int status = 0;  // 200, or the HTTP status of the failure
  std::string error;
  GenerateResult result;
  GenerateParams params;  // as run (prompts, size, steps, guidance, seed); no callbacks
  double started_s = 0;   // seconds from arrival to the worker picking it up
  double swap_s = 0;      // adapter swap before it (0: none needed)

  int bypassed = 0;  // guarded by the queue's mutex
};

class RequestQueue {
 public:
  RequestQueue(size_t capacity, int max_bypass) : capacity_(capacity), max_bypass_(max_bypass) {}

  // False when the queue is full or closed: the caller answers 429 / 503.
  bool push(std::shared_ptr<GenerationJob> job);
  // The next job to run given the adapter set applied now; blocks until there is one. Null once closed.
  // Jobs cancelled while waiting are dropped here, never returned.
  std::shared_ptr<GenerationJob> pop(const std::string& current_adapter_key);
  // Takes a waiting job out (true), or says it is no longer waiting (false: the worker has it or it is done).
  bool remove(const GenerationJob* job);
  size_t depth() const;
  // Wakes pop() for good and hands back the jobs that were still waiting.
  std::vector<std::shared_ptr<GenerationJob>> close();

 private:
  const size_t capacity_;
  const int max_bypass_;
  mutable std::mutex mutex_;
  std::condition_variable cv_;
  std::deque<std::shared_ptr<GenerationJob>> jobs_;  // arrival order
  bool closed_ = false;
};

}  // namespace fluxswap
