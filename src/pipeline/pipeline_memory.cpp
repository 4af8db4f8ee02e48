#include "pipeline/pipeline_memory.h"

#include <cstdio>
#include <map>

#include "core/error.h"
#include "model/flux_weight_map.h"

namespace fluxswap {

namespace {

// Sizes computed for bf16 activations, for a backend computing in another dtype (the CPU's float32).
uint64_t scaled_to(uint64_t bf16_bytes, const Backend& backend) {
  return bf16_bytes / 2 * dtype_size(backend.compute_dtype());
}

TransformerSpec measured_transformer_spec(FluxTransformer& t, const FluxWorkload& work) {
  const FluxConfig& c = t.config();
  FluxWeights& w = t.weights();
  TransformerSpec s;
  s.format = t.fp8() ? WeightFormat::FP8 : WeightFormat::BF16;
  // Every tensor the transformer holds, grouped by block: the map by name (what was loaded) and each linear's
  // working tensors (FP8 copies, LoRA slots), which the map does not list.
  const size_t blocks = size_t(c.num_layers + c.num_single_layers);
  std::vector<std::vector<const Tensor*>> groups(blocks + 1);  // the last one is the shared part
  auto group_of = [&](const std::string& name) -> std::vector<const Tensor*>& {
    size_t block = 0;
    return flux_block_index(name, c, &block) ? groups[block] : groups[blocks];
  };
  for (const auto& [name, tensor] : w.by_name) group_of(name).push_back(&tensor);
  bool has_slots = false;
  for (const WeightSpec& spec : flux_weight_specs(c, FluxNaming::BFL)) {
    const std::string suffix = ".weight";
    if (spec.shape.size() != 2 || spec.name.size() <= suffix.size() ||
        spec.name.compare(spec.name.size() - suffix.size(), suffix.size(), suffix) != 0)
      continue;
    const std::string module = spec.name.substr(0, spec.name.size() - suffix.size());
    Linear& l = w.linear(module);
    has_slots = has_slots || l.lora_down.defined();
    for (const Tensor* x : {&l.weight, &l.bias, &l.lora_down, &l.lora_up, &l.lora_weight, &l.weight_fp8,
                            &l.weight_scale})
      group_of(module).push_back(x);
  }
  s.block_bytes.resize(blocks);
  for (size_t b = 0; b < blocks; ++b) s.block_bytes[b] = tensor_storage_bytes(groups[b]);
  s.shared_bytes = tensor_storage_bytes(groups[blocks]);

  const TransformerSpec computed = flux_transformer_spec(c, s.format, work);
  if (work.lora_rank > 0 && !has_slots) {
    FluxWorkload without = work;
    without.lora_rank = 0;
    s.shared_bytes += scaled_to(computed.shared_bytes - flux_transformer_spec(c, s.format, without).shared_bytes,
                                t.backend());
  }
  s.activation_bytes = scaled_to(computed.activation_bytes, t.backend());
  return s;
}

}  // namespace

MemoryPlanRequest measured_plan_request(const MemoryBudget& budget, FluxTransformer& transformer, T5Encoder& t5,
                                        ClipTextModel& clip, VaeDecoder& vae, uint64_t memory_in_use) {
  const FluxWorkload& work = budget.workload;
  if (!transformer.resident())
    throw Error("memory plan: the transformer's weights are off the device; plan while they are on it");
  MemoryPlanRequest r;
  r.budget_bytes = budget.bytes;
  r.transformer = measured_transformer_spec(transformer, work);
  Backend& be = transformer.backend();
  const WeightFormat t5_format = t5.nf4() ? WeightFormat::NF4 : WeightFormat::BF16;
  r.t5 = {"t5", t5_format, t5.weight_bytes(),
          scaled_to(t5_encoder_spec(t5.config(), t5_format, work).activation_bytes, be)};
  r.clip = {"clip", WeightFormat::BF16, clip.weight_bytes(),
            scaled_to(clip_text_spec(clip.config(), work).activation_bytes, be)};
  r.vae = {"vae", WeightFormat::BF16, vae.weight_bytes(),
           scaled_to(vae_decoder_spec(vae.config(), work).activation_bytes, be)};

  uint64_t resident = r.transformer.weight_bytes();
  if (t5.resident()) resident += r.t5.weight_bytes;
  if (clip.resident()) resident += r.clip.weight_bytes;
  if (vae.resident()) resident += r.vae.weight_bytes;
  r.reserve_bytes = budget.reserve_bytes + (memory_in_use > resident ? memory_in_use - resident : 0);
  r.steps = 28;
  return r;
}

std::string vram_argument(uint64_t bytes) {
  const uint64_t tenths = (bytes + 99999999ull) / 100000000ull;
  char s[32];
  if (tenths % 10 == 0)
    std::snprintf(s, sizeof s, "%lluG", (unsigned long long)(tenths / 10));
  else
    std::snprintf(s, sizeof s, "%llu.%lluG", (unsigned long long)(tenths / 10), (unsigned long long)(tenths % 10));
  return s;
}

void require_supported_transformer_placement(const MemoryPlan& plan, const MemoryPlanRequest& request) {
  if (plan.component("transformer").placement != Placement::Streamed) return;
  const uint64_t smallest = smallest_budget_with_resident_transformer(request);
  throw Error("memory budget " + format_gb(request.budget_bytes) + ": the plan (" + plan.to_string() +
              ") needs the transformer streamed block by block from pinned host memory, which is not implemented "
              "yet; the smallest budget that keeps it resident is --vram " +
              vram_argument(smallest));
}

}  // namespace fluxswap
