#include "lora/clip_lora.h"

#include <cstring>
#include <map>
#include <utility>

#include "core/dtype.h"
#include "core/error.h"
#include "model/clip_lora_target.h"

namespace fluxswap {

namespace {

// The pair's tensors in memory and finite. A file still being read is waited for up to these tensors only (a LoRA's
// text-encoder keys come first in a streamed read), so the transformer's upload can still overlap the rest of it;
// its full check comes with the transformer's set_adapters.
void wait_for_pair(const LoraAdapter& adapter, const LoraPair& p) {
  for (const auto& [t, half] : {std::pair{&p.down, "down"}, {&p.up, "up"}}) {
    if (adapter.arriving) adapter.arriving->wait_for(t->data(), t->nbytes());
    if (const int64_t i = first_non_finite(t->dtype(), t->data(), size_t(t->numel())); i >= 0)
      throw Error(adapter.path + ": the " + half + " tensor of '" + p.source +
                  "' holds a NaN or an infinity at element " + std::to_string(i) + ", expected finite values");
  }
}

struct Placed {
  const LoraPair* pair;
  float alpha;  // the user's weight x the format's scale
  ClipLinearRows rows;
};

Tensor stacked_down(const std::vector<Placed>& placed, int64_t rank) {
  Tensor down = Tensor::empty(DType::F32, {rank, placed.front().rows.in_features});
  int64_t offset = 0;
  for (const Placed& p : placed) {
    const Tensor d = p.pair->down.to_f32();
    std::memcpy(down.ptr<float>() + offset * down.size(1), d.ptr<float>(), d.nbytes());
    offset += d.size(0);
  }
  return down;
}

Tensor stacked_up(const std::vector<Placed>& placed, int64_t rank) {
  Tensor up = Tensor::zeros(DType::F32, {placed.front().rows.out_features, rank});
  int64_t offset = 0;
  for (const Placed& p : placed) {
    const Tensor u = p.pair->up.to_f32();
    const int64_t r = u.size(1);
    for (int64_t i = 0; i < u.size(0); ++i)
      for (int64_t j = 0; j < r; ++j)
        up.ptr<float>()[(p.rows.row + i) * rank + offset + j] = p.alpha * u.ptr<float>()[i * r + j];
    offset += r;
  }
  return up;
}

}  // namespace

ClipLoraSet prepare_clip_loras(const std::vector<ActiveLora>& active, ClipTextModel& clip) {
  const ClipTextConfig& config = clip.config();
  std::map<std::pair<int64_t, ClipLinear>, std::vector<Placed>> by_linear;
  ClipLoraSet set;
  for (const ActiveLora& a : active) {
    for (const LoraPair& p : a.adapter->clip_pairs) {
      wait_for_pair(*a.adapter, p);
      const std::string where = a.adapter->path + ": '" + p.source + "'";
      const std::optional<ClipLinearRef> ref = parse_clip_linear(p.module);
      if (!ref) throw Error(where + ": '" + p.module + "' is not a CLIP text-encoder linear");
      if (ref->layer >= config.num_hidden_layers)
        throw Error(where + " targets layer " + std::to_string(ref->layer) + ", but the CLIP text encoder has " +
                    std::to_string(config.num_hidden_layers) + " layers");
      const ClipLinearRows rows = clip_linear_rows(*ref, config);
      if (p.rows != rows.rows || p.down.size(1) != rows.in_features)
        throw Error(where + ": up " + shape_str(p.up.shape()) + " and down " + shape_str(p.down.shape()) +
                    ", expected [" + std::to_string(rows.rows) + ", rank] and [rank, " +
                    std::to_string(rows.in_features) + "] for '" + p.module + "' of this CLIP text encoder");
      by_linear[{ref->layer, ref->linear}].push_back({&p, a.weight * p.scale, rows});
      ++set.pairs;
    }
    set.tensors += a.adapter->clip_tensors_used;
  }
  Backend& backend = clip.backend();
  for (const auto& [linear, placed] : by_linear) {
    int64_t rank = 0;
    for (const Placed& p : placed) rank += p.pair->down.size(0);
    set.linears.push_back({linear.first, linear.second, backend.upload_weight(stacked_down(placed, rank)),
                           backend.upload_weight(stacked_up(placed, rank))});
  }
  return set;
}

ClipLoraReport set_loras_with_clip(ClipTextModel& clip, const std::vector<ActiveLora>& active,
                                   const std::function<void()>& set_transformer) {
  ClipLoraSet set = prepare_clip_loras(active, clip);
  set_transformer();
  const ClipLoraReport report{set.pairs, set.tensors, set.linears.size()};
  clip.set_lora(std::move(set.linears));
  return report;
}

}  // namespace fluxswap
