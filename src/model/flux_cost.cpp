#include "model/flux_cost.h"

#include "model/flux_weight_map.h"

namespace fluxswap {

FluxStepCost flux_step_cost(const FluxConfig& c, int64_t batch, int64_t img_tokens, int64_t txt_tokens) {
  const double D = double(c.inner_dim()), M = double(c.mlp_dim());
  const double S = double(img_tokens + txt_tokens);
  FluxStepCost cost;
  // Per token: double block (its own stream's qkv, proj, MLP) and single block (linear1, linear2).
  const double per_token_double = 2.0 * (3 * D * D + D * D + 2 * D * M);
  const double per_token_single = 2.0 * ((3 * D + M) * D + (D + M) * D);
  cost.linear_flops = batch * S * (c.num_layers * per_token_double + c.num_single_layers * per_token_single);
  cost.linear_flops += 2.0 * batch * (img_tokens * double(c.in_channels) * D + txt_tokens * double(c.joint_attention_dim) * D +
                                      img_tokens * D * double(c.out_channels()));
  cost.attention_flops = double(c.num_layers + c.num_single_layers) * batch * 4.0 * S * S * D;
  for (const auto& spec : flux_weight_specs(c, FluxNaming::BFL)) {
    double n = 1;
    for (int64_t d : spec.shape) n *= double(d);
    cost.weight_params += n;
  }
  return cost;
}

}  // namespace fluxswap
