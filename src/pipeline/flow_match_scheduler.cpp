#include "pipeline/flow_match_scheduler.h"

#include <cmath>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "io/json_config.h"

namespace fluxswap {

FlowMatchSchedulerConfig FlowMatchSchedulerConfig::flux1_schnell() {
  FlowMatchSchedulerConfig c;
  c.shift = 1.0;
  c.use_dynamic_shifting = false;
  return c;
}

FlowMatchSchedulerConfig FlowMatchSchedulerConfig::from_json_file(const std::string& path) {
  const nlohmann::json j = read_json_object_file(path);
  FlowMatchSchedulerConfig c;
  read_field(j, "num_train_timesteps", c.num_train_timesteps, path);
  read_field(j, "shift", c.shift, path);
  read_field(j, "use_dynamic_shifting", c.use_dynamic_shifting, path);
  read_field(j, "base_shift", c.base_shift, path);
  read_field(j, "max_shift", c.max_shift, path);
  read_field(j, "base_image_seq_len", c.base_image_seq_len, path);
  read_field(j, "max_image_seq_len", c.max_image_seq_len, path);
  if (c.max_image_seq_len == c.base_image_seq_len) throw Error(path + ": max_image_seq_len equals base_image_seq_len");
  return c;
}

double FlowMatchEulerScheduler::mu_for(int image_seq_len) const {
  const auto& c = config_;
  const double m = (c.max_shift - c.base_shift) / double(c.max_image_seq_len - c.base_image_seq_len);
  const double b = c.base_shift - m * c.base_image_seq_len;
  return image_seq_len * m + b;
}

void FlowMatchEulerScheduler::set_timesteps(int steps, int image_seq_len) {
  if (steps < 1) throw Error("steps must be at least 1, got " + std::to_string(steps));
  sigmas_.assign(size_t(steps) + 1, 0.0f);
  timesteps_.assign(size_t(steps), 0.0f);
  const double mu = mu_for(image_seq_len);
  for (int i = 0; i < steps; ++i) {
    // The reference builds the linspace in float64 and shifts in float32.
    const double lin = steps == 1 ? 1.0 : 1.0 + (1.0 / steps - 1.0) * i / double(steps - 1);
    const float s = float(lin);
    float shifted;
    if (config_.use_dynamic_shifting) {
      const float e = float(std::exp(mu));  // exp in float64, as Python's math.exp, then float32 math
      shifted = e / (e + (1.0f / s - 1.0f));
    } else {
      const float k = float(config_.shift);
      shifted = k * s / (1.0f + (k - 1.0f) * s);
    }
    sigmas_[i] = shifted;
    timesteps_[i] = shifted * float(config_.num_train_timesteps);
  }
}

void FlowMatchEulerScheduler::step(int i, const float* velocity, float* x, size_t n) const {
  if (i < 0 || size_t(i) + 1 >= sigmas_.size()) throw Error("scheduler step " + std::to_string(i) + " out of range");
  const float dt = sigmas_[size_t(i) + 1] - sigmas_[size_t(i)];
  for (size_t j = 0; j < n; ++j) x[j] += dt * velocity[j];
}

}  // namespace fluxswap
