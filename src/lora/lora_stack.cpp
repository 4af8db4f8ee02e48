#include "lora/lora_stack.h"

#include "core/error.h"
#include "model/flux_weight_map.h"

namespace fluxswap {

std::map<std::string, ModuleStack> stack_loras(const std::vector<ActiveLora>& active, const FluxConfig& config) {
  std::map<std::string, Shape> weight_shape;
  for (const auto& spec : flux_weight_specs(config, FluxNaming::BFL))
    if (spec.shape.size() == 2) weight_shape[spec.name.substr(0, spec.name.size() - 7)] = spec.shape;  // ".weight"

  std::map<std::string, ModuleStack> stacks;
  for (size_t a = 0; a < active.size(); ++a) {
    const LoraAdapter& adapter = *active[a].adapter;
    for (size_t i = 0; i < adapter.pairs.size(); ++i) {
      const LoraPair& p = adapter.pairs[i];
      auto it = weight_shape.find(p.module);
      const std::string where = adapter.path + ": '" + p.source + "'";
      if (it == weight_shape.end()) throw Error(where + " targets '" + p.module + "', which this model does not have");
      const int64_t out = it->second[0], in = it->second[1];
      if (p.row < 0 || p.rows <= 0 || p.row + p.rows > out || p.up.size(0) != p.rows || p.down.size(1) != in ||
          p.up.size(1) != p.down.size(0))
        throw Error(where + ": up " + shape_str(p.up.shape()) + " / down " + shape_str(p.down.shape()) + " at rows " +
                    std::to_string(p.row) + ".." + std::to_string(p.row + p.rows) + " does not fit " + p.module +
                    " " + shape_str(it->second));
      ModuleStack& s = stacks[p.module];
      s.weight_shape = it->second;
      s.pairs.push_back({a, i, active[a].weight * p.scale, s.rank});
      s.rank += p.down.size(0);
      s.has_bias = s.has_bias || p.up_bias.defined();
    }
  }
  return stacks;
}

}  // namespace fluxswap
