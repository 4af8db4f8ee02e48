#include "cli/bench_timing.h"

#include <algorithm>
#include <cstdio>
#include <string>
#include <utility>

namespace fluxswap {

double median_of(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

nlohmann::json profile_ops(Backend& be, const std::function<void()>& work, const char* what, size_t listed) {
  be.set_profiling(true);
  work();
  be.synchronize();
  const auto prof = be.profile_ms();
  be.set_profiling(false);
  double total = 0;
  std::vector<std::pair<double, std::string>> rows;
  for (const auto& [op, ms] : prof) {
    total += ms;
    rows.push_back({ms, op});
  }
  std::sort(rows.rbegin(), rows.rend());
  nlohmann::json r = nlohmann::json::object();
  std::printf("  per-op (%s, device-timed, %.2f ms):", what, total);
  for (size_t i = 0; i < rows.size(); ++i) {
    const auto& [ms, op] = rows[i];
    if (i < listed) std::printf("  %s %.2f ms (%.0f%%)", op.c_str(), ms, 100.0 * ms / total);
    r[op] = ms;
  }
  std::printf("\n");
  return r;
}

}  // namespace fluxswap
