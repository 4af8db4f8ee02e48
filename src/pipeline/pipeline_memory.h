#pragma once
// The memory planner (memory_plan.h) fed with a loaded pipeline: the request built from the components' real device
// bytes, and the error for plans this engine cannot run yet.
#include <cstdint>

#include "model/clip_text_model.h"
#include "model/flux_transformer.h"
#include "model/t5_encoder.h"
#include "model/vae_decoder.h"
#include "pipeline/memory_plan.h"

namespace fluxswap {

struct MemoryBudget {
  uint64_t bytes = 0;     // the card's memory (0: no budget)
  FluxWorkload workload;  // the generations the plan must fit: size, batch, T5 tokens, runtime LoRA slot rank
  uint64_t reserve_bytes = kDefaultReserveBytes;  // what the planner does not see (see kDefaultReserveBytes)
};

// The planner's request for loaded components, measured rather than computed: the transformer's device bytes per
// block and shared part (every tensor it holds, runtime LoRA slots included; slots of workload.lora_rank not made
// yet are added as computed), the other components' weights whole, resident or offloaded. Activations are computed
// from the configs for the workload. What else the backend holds (`memory_in_use` minus the resident weights: LoRA
// adapters kept on the device, library workspaces) joins the reserve, so plan after loading and setting up LoRAs:
// after a generation the transformer's step buffers would count twice.
MemoryPlanRequest measured_plan_request(const MemoryBudget& budget, FluxTransformer& transformer, T5Encoder& t5,
                                        ClipTextModel& clip, VaeDecoder& vae, uint64_t memory_in_use);

}  // namespace fluxswap
