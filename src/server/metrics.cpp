#include "server/metrics.h"

#include <cstdio>
#include <cstdlib>
#include <sstream>

namespace fluxswap {

void Metrics::observe_latency(double seconds) {
  std::lock_guard lock(mutex_);
  for (size_t i = 0; i < kBuckets.size(); ++i)
    if (seconds <= kBuckets[i]) {
      ++bucket_counts_[i];
      break;
    }
  ++latency_count_;
  latency_sum_ += seconds;
}

void Metrics::count_error(int status) {
  std::lock_guard lock(mutex_);
  ++errors_[status];
}

uint64_t Metrics::errors(int status) const {
  std::lock_guard lock(mutex_);
  auto it = errors_.find(status);
  return it == errors_.end() ? 0 : it->second;
}

uint64_t Metrics::latency_count() const {
  std::lock_guard lock(mutex_);
  return latency_count_;
}

namespace {

void family(std::ostringstream& o, const char* name, const char* type, const char* help) {
  o << "# HELP " << name << ' ' << help << "\n# TYPE " << name << ' ' << type << '\n';
}

// The shortest text that reads back as the same double: "0.025", not "0.025000000000000001".
std::string number(double v) {
  char buf[32];
  for (int digits = 1; digits <= 17; ++digits) {
    std::snprintf(buf, sizeof buf, "%.*g", digits, v);
    if (std::strtod(buf, nullptr) == v) break;
  }
  return buf;
}

}  // namespace

std::string Metrics::render(size_t queue_depth, bool ready) const {
  std::ostringstream o;
  family(o, "fluxswap_ready", "gauge", "1 once the model is loaded and requests are served.");
  o << "fluxswap_ready " << (ready ? 1 : 0) << '\n';
  family(o, "fluxswap_queue_depth", "gauge", "Generation requests waiting for the worker.");
  o << "fluxswap_queue_depth " << queue_depth << '\n';
  family(o, "fluxswap_requests_in_progress", "gauge", "Generation requests running on the worker.");
  o << "fluxswap_requests_in_progress " << in_progress.load() << '\n';
  family(o, "fluxswap_generations_total", "counter", "Generation requests answered with images.");
  o << "fluxswap_generations_total " << generations.load() << '\n';
  family(o, "fluxswap_images_total", "counter", "Images generated.");
  o << "fluxswap_images_total " << images.load() << '\n';
  family(o, "fluxswap_lora_swaps_total", "counter", "Adapter-set changes applied to the model.");
  o << "fluxswap_lora_swaps_total " << lora_swaps.load() << '\n';
  family(o, "fluxswap_lora_swap_seconds_total", "counter", "Time spent applying adapter-set changes.");
  o << "fluxswap_lora_swap_seconds_total " << number(lora_swap_seconds.load()) << '\n';
  family(o, "fluxswap_adapter_cache_hits_total", "counter", "LoRA lookups served by the parsed-adapter cache.");
  o << "fluxswap_adapter_cache_hits_total " << adapter_cache_hits.load() << '\n';
  family(o, "fluxswap_adapter_cache_misses_total", "counter", "LoRA lookups that parsed the file.");
  o << "fluxswap_adapter_cache_misses_total " << adapter_cache_misses.load() << '\n';
  family(o, "fluxswap_requests_cancelled_total", "counter", "Generations stopped before they finished, by reason.");
  o << "fluxswap_requests_cancelled_total{reason=\"timeout\"} " << cancelled_timeout.load() << '\n';
  o << "fluxswap_requests_cancelled_total{reason=\"disconnect\"} " << cancelled_disconnect.load() << '\n';
  {
    std::lock_guard lock(mutex_);
    family(o, "fluxswap_request_duration_seconds", "histogram",
           "Generation requests that were queued, from arrival to answer, whatever the outcome.");
    uint64_t cumulative = 0;
    for (size_t i = 0; i < kBuckets.size(); ++i) {
      cumulative += bucket_counts_[i];
      o << "fluxswap_request_duration_seconds_bucket{le=\"" << number(kBuckets[i]) << "\"} " << cumulative << '\n';
    }
    o << "fluxswap_request_duration_seconds_bucket{le=\"+Inf\"} " << latency_count_ << '\n';
    o << "fluxswap_request_duration_seconds_sum " << number(latency_sum_) << '\n';
    o << "fluxswap_request_duration_seconds_count " << latency_count_ << '\n';
    family(o, "fluxswap_http_errors_total", "counter", "Responses with a 4xx/5xx status, by status.");
    for (const auto& [status, n] : errors_) o << "fluxswap_http_errors_total{status=\"" << status << "\"} " << n << '\n';
  }
  if (have_gpu_memory.load()) {
    family(o, "fluxswap_gpu_memory_bytes", "gauge", "Device memory the backend holds.");
    o << "fluxswap_gpu_memory_bytes " << gpu_memory_bytes.load() << '\n';
    family(o, "fluxswap_gpu_memory_peak_bytes", "gauge", "Most device memory the backend has held.");
    o << "fluxswap_gpu_memory_peak_bytes " << gpu_memory_peak_bytes.load() << '\n';
  }
  return o.str();
}

}  // namespace fluxswap
