#include "model/flux_random_fp8_weights.h"

#include <algorithm>
#include <cmath>

#include "model/flux_weight_map.h"

namespace fluxswap {

namespace {

// What an FP8-only transformer holds in e4m3: every matrix inside a block (the token linears and the modulation)
// and the final layer's modulation; FluxTransformer drops the bf16 copies of exactly these.
bool stored_fp8(const WeightSpec& spec) {
  if (spec.shape.size() != 2) return false;
  return spec.name.rfind("double_blocks.", 0) == 0 || spec.name.rfind("single_blocks.", 0) == 0 ||
         spec.name == "final_layer.adaLN_modulation.1.weight";
}

}  // namespace

FluxWeights random_flux_weights_fp8(const FluxConfig& config, Backend& backend, uint64_t seed) {
  const std::vector<WeightSpec> specs = flux_weight_specs(config, FluxNaming::BFL);
  // One bf16 scratch as large as the largest quantised matrix, reused for each: no bf16 matrix outlives its
  // quantisation, and nothing is freed while queued work may still read it.
  int64_t largest = 0;
  for (const WeightSpec& spec : specs)
    if (stored_fp8(spec)) largest = std::max(largest, shape_numel(spec.shape));
  const Tensor scratch = backend.empty(backend.compute_dtype(), {std::max<int64_t>(largest, 1)});

  std::map<std::string, Tensor> m;
  uint64_t stream = seed * 1000003ull;  // the same draws as random_flux_weights
  for (const WeightSpec& spec : specs) {
    const bool is_norm = spec.name.find("_norm.scale") != std::string::npos;
    const float mean = is_norm ? 1.0f : 0.0f;
    const float std = is_norm ? 0.1f : spec.shape.size() == 2 ? 1.0f / std::sqrt(float(spec.shape[1])) : 0.02f;
    if (!stored_fp8(spec)) {
      Tensor t = backend.empty(backend.compute_dtype(), spec.shape);
      backend.fill_normal(t, ++stream, mean, std);
      m.emplace(spec.name, std::move(t));
      continue;
    }
    const Tensor w = scratch.narrow(0, 0, shape_numel(spec.shape)).view(spec.shape);
    backend.fill_normal(w, ++stream, mean, std);
    Tensor q = backend.empty(DType::F8_E4M3, spec.shape), scale = backend.empty(DType::F32, {spec.shape[0]});
    backend.quantize_fp8_rows(w, q, scale);
    const std::string module = spec.name.substr(0, spec.name.size() - 7);  // without ".weight"
    m.emplace(module + ".weight_fp8", std::move(q));
    m.emplace(module + ".weight_scale", std::move(scale));
  }
  backend.synchronize();  // the scratch goes with this scope
  return flux_weights_from_map(config, std::move(m));
}

}  // namespace fluxswap
