#pragma once
// What the benchmark commands share: wall-clock timing, medians, and the per-op device-time breakdown.
#include <chrono>
#include <cstddef>
#include <functional>
#include <limits>
#include <nlohmann/json.hpp>
#include <vector>

#include "backend/backend.h"

namespace fluxswap {

using BenchClock = std::chrono::steady_clock;

inline double seconds_since(BenchClock::time_point t) {
  return std::chrono::duration<double>(BenchClock::now() - t).count();
}

// The upper median (the middle element of an odd count); `v` non-empty.
double median_of(std::vector<double> v);

// Runs `work` once with device events around every op and returns {op: ms}; prints the ops largest first (at most
// `listed` of them) after "per-op (<what>, device-timed, <total> ms):".
nlohmann::json profile_ops(Backend& backend, const std::function<void()>& work, const char* what,
                           size_t listed = std::numeric_limits<size_t>::max());

}  // namespace fluxswap
