#include "pipeline/pipeline_memory.h"

#include "core/error.h"

namespace fluxswap {

namespace {

// Sizes computed for bf16 activations, for a backend computing in another dtype (the CPU's float32).
uint64_t scaled_to(uint64_t bf16_bytes, const Backend& backend) {
  return bf16_bytes / 2 * dtype_size(backend.compute_dtype());
}

TransformerSpec measured_transformer_spec(FluxTransformer& t, const FluxWorkload& work) {
  const FluxConfig& c = t.config();
  TransformerSpec s;
  s.format = t.fp8() ? WeightFormat::FP8 : WeightFormat::BF16;
  // Every tensor the transformer holds: per block (a streamed one: what it uploads) and the rest, runtime LoRA
  // slots included (they never leave the device).
  s.block_bytes = t.block_weight_bytes();
  s.shared_bytes = t.shared_weight_bytes();
  bool has_slots = false;
  for (size_t b = 0; b < s.block_bytes.size(); ++b)
    for (Linear* l : t.weights().block_linears(b)) has_slots = has_slots || l->lora_down.defined();
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

  // What the device holds of the transformer now: a streamed one its shared part, resident blocks and buffers.
  uint64_t resident = r.transformer.shared_bytes + transformer.streaming().buffer_bytes();
  for (size_t b = 0; b < r.transformer.block_bytes.size(); ++b)
    if (!transformer.streaming().streamed(b)) resident += r.transformer.block_bytes[b];
  if (t5.resident()) resident += r.t5.weight_bytes;
  if (clip.resident()) resident += r.clip.weight_bytes;
  if (vae.resident()) resident += r.vae.weight_bytes;
  r.reserve_bytes = budget.reserve_bytes + (memory_in_use > resident ? memory_in_use - resident : 0);
  r.steps = 28;
  return r;
}




}  // namespace fluxswap
