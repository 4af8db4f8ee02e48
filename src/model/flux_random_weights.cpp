#include "model/flux_random_weights.h"

#include <cmath>
#include <random>

#include "model/flux_weight_map.h"

namespace fluxswap {

FluxWeights random_flux_weights(const FluxConfig& config, Backend& backend, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::map<std::string, Tensor> m;
  for (const WeightSpec& spec : flux_weight_specs(config, FluxNaming::BFL)) {
    Tensor host = Tensor::empty(DType::F32, spec.shape);
    float* p = host.ptr<float>();
    const bool is_norm = spec.name.find("_norm.scale") != std::string::npos;
    const float scale = spec.shape.size() == 2 ? 1.0f / std::sqrt(float(spec.shape[1])) : 0.02f;
    for (int64_t i = 0; i < host.numel(); ++i) p[i] = is_norm ? 1.0f + 0.1f * normal(rng) : scale * normal(rng);
    m.emplace(spec.name, backend.upload_weight(host));
  }
  return flux_weights_from_map(config, std::move(m));
}

}  // namespace fluxswap
