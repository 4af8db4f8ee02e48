#include "model/flux_step_order.h"

#include <regex>

namespace fluxswap {

int64_t flux_step_rank(const std::string& name, const FluxConfig& config) {
  // Modulations run before the first block, whichever block they belong to.
  static const std::regex modulation(R"((^|[._])(img_mod|txt_mod|modulation|adaLN_modulation|norm1|norm1_context|norm|norm_out)[._](lin|linear))");
  static const std::regex single(R"((^|[._])single_(transformer_)?blocks[._](\d+)([._]|$))");
  static const std::regex dual(R"((^|[._])(double_blocks|transformer_blocks)[._](\d+)([._]|$))");
  static const std::regex final_projection(R"((^|[._])(proj_out|final_layer[._]linear)([._]|$))");
  std::smatch m;
  if (std::regex_search(name, modulation)) return 0;
  if (std::regex_search(name, m, single)) {
    const int64_t i = std::stoll(m[3].str());
    return i < config.num_single_layers ? 1 + config.num_layers + i : 0;
  }
  if (std::regex_search(name, m, dual)) {
    const int64_t i = std::stoll(m[3].str());
    return i < config.num_layers ? 1 + i : 0;
  }
  if (std::regex_search(name, final_projection)) return flux_step_ranks(config) - 1;
  return 0;
}

}  // namespace fluxswap
