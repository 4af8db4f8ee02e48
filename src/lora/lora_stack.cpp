#include "lora/lora_stack.h"

#include <cstring>

#include "core/error.h"
#include "model/flux_weight_map.h"

namespace fluxswap {

std::map<std::string, StackedLora> stack_loras(const std::vector<ActiveLora>& active, const FluxConfig& config) {
  std::map<std::string, Shape> weight_shape;
  for (const auto& spec : flux_weight_specs(config, FluxNaming::BFL))
    if (spec.shape.size() == 2) weight_shape[spec.name.substr(0, spec.name.size() - 7)] = spec.shape;  // ".weight"

  // First pass: the total rank per module and validation, so nothing is half-built on error.
  std::map<std::string, int64_t> rank;
  for (const auto& a : active)
    for (const LoraPair& p : a.adapter->pairs) {
      auto it = weight_shape.find(p.module);
      const std::string where = a.adapter->path + ": '" + p.source + "'";
      if (it == weight_shape.end()) throw Error(where + " targets '" + p.module + "', which this model does not have");
      const int64_t out = it->second[0], in = it->second[1];
      if (p.row < 0 || p.rows <= 0 || p.row + p.rows > out || p.up.size(0) != p.rows || p.down.size(1) != in ||
          p.up.size(1) != p.down.size(0))
        throw Error(where + ": up " + shape_str(p.up.shape()) + " / down " + shape_str(p.down.shape()) + " at rows " +
                    std::to_string(p.row) + ".." + std::to_string(p.row + p.rows) + " does not fit " + p.module +
                    " " + shape_str(it->second));
      rank[p.module] += p.down.size(0);
    }

  std::map<std::string, StackedLora> stacked;
  std::map<std::string, int64_t> filled;
  for (const auto& [module, r] : rank) {
    const Shape& ws = weight_shape[module];
    stacked[module] = {Tensor::zeros(DType::F32, {r, ws[1]}), Tensor::zeros(DType::F32, {ws[0], r}), Tensor()};
  }
  for (const auto& a : active)
    for (const LoraPair& p : a.adapter->pairs) {
      StackedLora& s = stacked[p.module];
      const int64_t r = p.down.size(0), in = p.down.size(1), R = s.down.size(0), at = filled[p.module];
      const float k = a.weight * p.scale;
      Tensor down = p.down.to_f32(), up = p.up.to_f32();
      std::memcpy(s.down.ptr<float>() + at * in, down.ptr<float>(), size_t(r * in) * 4);
      for (int64_t i = 0; i < p.rows; ++i)
        for (int64_t j = 0; j < r; ++j) s.up.ptr<float>()[(p.row + i) * R + at + j] = k * up.ptr<float>()[i * r + j];
      if (p.up_bias.defined()) {
        if (!s.bias_delta.defined()) s.bias_delta = Tensor::zeros(DType::F32, {s.up.size(0)});
        Tensor b = p.up_bias.to_f32();
        for (int64_t i = 0; i < p.rows; ++i) s.bias_delta.ptr<float>()[p.row + i] += k * b.ptr<float>()[i];
      }
      filled[p.module] = at + r;
    }
  return stacked;
}

}  // namespace fluxswap
