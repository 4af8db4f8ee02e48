#include "model/flux_random_weights.h"

#include <cmath>

#include "model/flux_weight_map.h"

namespace fluxswap {

FluxWeights random_flux_weights(const FluxConfig& config, Backend& backend, uint64_t seed) {
  std::map<std::string, Tensor> m;
  uint64_t stream = seed * 1000003ull;
  for (const WeightSpec& spec : flux_weight_specs(config, FluxNaming::BFL)) {
    // Generated where the weights live: FLUX.1-dev's 12B values take seconds on the GPU, minutes on the host.
    Tensor t = backend.empty(backend.compute_dtype(), spec.shape);
    const bool is_norm = spec.name.find("_norm.scale") != std::string::npos;
    if (is_norm)
      backend.fill_normal(t, ++stream, 1.0f, 0.1f);
    else
      backend.fill_normal(t, ++stream, 0.0f, spec.shape.size() == 2 ? 1.0f / std::sqrt(float(spec.shape[1])) : 0.02f);
    m.emplace(spec.name, std::move(t));
  }
  return flux_weights_from_map(config, std::move(m));
}

}  // namespace fluxswap
