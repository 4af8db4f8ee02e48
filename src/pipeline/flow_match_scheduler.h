#pragma once
// FlowMatch Euler sampling as the FLUX pipelines configure it: sigmas linspace(1, 1/n, n), shifted either by the
// resolution-dependent exponential time shift (FLUX.1-dev: mu from the image sequence length) or by a constant
// shift (FLUX.1-schnell: shift 1, i.e. unchanged), then a terminal 0.
#include <string>
#include <vector>

namespace fluxswap {

struct FlowMatchSchedulerConfig {
  int num_train_timesteps = 1000;
  double shift = 3.0;
  bool use_dynamic_shifting = true;
  double base_shift = 0.5;
  double max_shift = 1.15;
  int base_image_seq_len = 256;
  int max_image_seq_len = 4096;

  static FlowMatchSchedulerConfig flux1_dev() { return {}; }
  static FlowMatchSchedulerConfig flux1_schnell();
  // diffusers scheduler_config.json; missing fields keep the FLUX.1-dev defaults.
  static FlowMatchSchedulerConfig from_json_file(const std::string& path);
};

class FlowMatchEulerScheduler {
 public:
  explicit FlowMatchEulerScheduler(FlowMatchSchedulerConfig config = {}) : config_(config) {}

  // mu of the exponential shift for an image of `image_seq_len` packed tokens (linear in the length).
  double mu_for(int image_seq_len) const;
  // Prepares `steps` steps for an image of `image_seq_len` packed tokens.
  void set_timesteps(int steps, int image_seq_len);

  const std::vector<float>& sigmas() const { return sigmas_; }        // steps + 1 values, last is 0
  const std::vector<float>& timesteps() const { return timesteps_; }  // steps values, sigma * 1000

  // x <- x + (sigma[i + 1] - sigma[i]) * velocity, elementwise over n floats.
  void step(int i, const float* velocity, float* x, size_t n) const;

 private:
  FlowMatchSchedulerConfig config_;
  std::vector<float> sigmas_, timesteps_;
};

}  // namespace fluxswap
