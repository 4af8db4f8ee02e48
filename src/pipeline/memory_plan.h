#pragma once
// Where each FLUX component lives on a GPU with a memory budget. plan_memory is a pure function of the component
// sizes: it picks, among every placement that fits, the one that moves the fewest bytes from host to device per
// image: components stay resident, or are uploaded only while they run (the text encoders encode, then leave), and
// when even that does not fit, the transformer keeps some blocks resident and streams the others from pinned host
// memory every step, one or two blocks ahead of the one computing.
//
// A generation runs three phases in order, each with its own transient memory:
//   encode  - CLIP, then T5 (one after the other, so only the larger of the two counts),
//   denoise - the transformer, once per step (streamed blocks go through (prefetch depth + 1) block buffers),
//   decode  - the VAE.
// The peak is the largest phase: the resident weights, the phase's on-demand weights and its activations, plus a
// reserve for what the planner does not see (CUDA context, library handles and workspaces, allocator slack). The
// other components free their buffers after their phase when the pipeline runs under a budget; the transformer's
// step buffers count in every phase while MemoryPlanRequest::transformer_buffers_kept (FluxTransformer keeps them
// between images, so the next image's encode and this image's decode run beside them).
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "model/clip_text_model.h"
#include "model/flux_config.h"
#include "model/t5_encoder.h"
#include "model/vae_decoder.h"

namespace fluxswap {

enum class WeightFormat { BF16, FP8, NF4 };
std::string_view weight_format_name(WeightFormat f);  // "bf16", "fp8", "nf4"

// A component that runs in one phase: its device weights and the device buffers it needs while it runs.
struct ComponentSpec {
  std::string name;
  WeightFormat format = WeightFormat::BF16;
  uint64_t weight_bytes = 0;
  uint64_t activation_bytes = 0;
};

// The transformer, split into what can be streamed (its blocks, in execution order) and what cannot.
struct TransformerSpec {
  WeightFormat format = WeightFormat::BF16;
  uint64_t shared_bytes = 0;  // embedders, final layer and LoRA slots: always on the device while it runs
  std::vector<uint64_t> block_bytes;
  uint64_t activation_bytes = 0;  // one step's buffers (residual stream, projections, attention, inputs)
  uint64_t weight_bytes() const;  // shared + every block
};

struct MemoryPlanRequest {
  uint64_t budget_bytes = 0;
  uint64_t reserve_bytes = 0;
  TransformerSpec transformer;
  ComponentSpec t5, clip, vae;
  int steps = 28;  // denoising steps per image: weighs bytes streamed per step against uploads per image
  int max_prefetch_depth = 2;  // 1 or 2, for a streamed transformer
  // The transformer's step buffers stay allocated outside the denoise phase (as FluxTransformer does today); false
  // for a pipeline that frees them after the last step.
  bool transformer_buffers_kept = true;
};

enum class Placement { Resident, OnDemand, Streamed };
std::string_view placement_name(Placement p);  // "resident", "on demand", "streamed"

struct ComponentPlan {
  std::string name;
  WeightFormat format = WeightFormat::BF16;
  uint64_t weight_bytes = 0;
  Placement placement = Placement::Resident;
};

// How a Streamed transformer runs. Blocks are kept resident largest first (fewest bytes moved per step); the
// streamed ones pass through prefetch_depth + 1 buffers, each sized for the largest streamed block. The depth is the
// request's max_prefetch_depth (2 by default) unless only depth 1 fits: a FLUX block takes about as long to copy over
// PCIe 4.0 as to compute at 1024x1024, so the copy is on the critical path and a second block in flight keeps the
// copy engine busy through uneven steps, for the price of one block of memory.
struct StreamingPlan {
  std::vector<bool> block_resident;  // per block, execution order
  int resident_blocks = 0;
  int prefetch_depth = 0;  // 1 or 2: blocks in flight while one computes
  uint64_t buffer_bytes = 0;
  uint64_t bytes_per_step = 0;  // host -> device
};

struct MemoryPlan {
  uint64_t budget_bytes = 0, reserve_bytes = 0;
  std::vector<ComponentPlan> components;  // transformer, t5, clip, vae
  StreamingPlan streaming;                // when the transformer is Streamed
  uint64_t resident_bytes = 0;            // weights that never leave the device
  uint64_t encode_peak = 0, denoise_peak = 0, decode_peak = 0;  // reserve included
  uint64_t peak_bytes = 0;                                      // the largest of the three
  uint64_t upload_bytes_per_image = 0;  // on-demand uploads plus streamed blocks over all steps
  uint64_t pinned_host_bytes = 0;       // weights that must wait in pinned host memory

  const ComponentPlan& component(const std::string& name) const;
  // One line, as the CLI prints it: "resident: transformer (fp8, 12 GB), vae (bf16, 0.1 GB); on demand: t5 (nf4,
  // 2.9 GB), clip (bf16, 0.2 GB); peak 16 GB of 16 GB". Sizes in GB = 10^9 bytes.
  std::string to_string() const;
};

// The placement that fits the budget with the least host -> device traffic per image (ties: the lower peak).
// Throws Error naming the budget and the peak of the most frugal plan when nothing fits.
MemoryPlan plan_memory(const MemoryPlanRequest& request);

// The smallest budget under which plan_memory keeps the transformer resident (the request's budget is ignored):
// below it every image uploads transformer weights, per image or per step.
uint64_t smallest_budget_with_resident_transformer(const MemoryPlanRequest& request);

// "24G", "24GB", "16000M", "24GiB", "1.5T" (case-insensitive; spaces allowed before the unit): K/M/G/T and
// KB/MB/GB/TB are powers of 10 (a card sold as 24 GB holds at least 24e9 bytes), KiB/MiB/GiB/TiB powers of 2.
// Error for anything else, a missing unit included.
uint64_t parse_memory_budget(const std::string& text);
// "11.9 GB" (one decimal, none when whole: "24 GB").
std::string format_gb(uint64_t bytes);

// ---- FLUX.1 component sizes, computed from the model configs' shapes ----
struct FluxWorkload {
  int64_t width = 1024, height = 1024;  // image pixels
  int64_t batch = 1;
  int64_t text_tokens = 512;  // T5 sequence length (FLUX.1-dev: 512)
  int64_t lora_rank = 0;      // runtime LoRA slots on every block linear (0: none)
};

// Device bytes of n weights stored as `format`: bf16 2 bytes; fp8 1 byte plus a float32 scale per output row
// (`rows`); nf4 bitsandbytes' layout without nested statistics (half a byte plus a float32 absmax per 64, the
// larger variant, so the plan is safe for either).
uint64_t weight_storage_bytes(WeightFormat format, int64_t numel, int64_t rows);

TransformerSpec flux_transformer_spec(const FluxConfig& config, WeightFormat format, const FluxWorkload& work);
ComponentSpec t5_encoder_spec(const T5EncoderConfig& config, WeightFormat format, const FluxWorkload& work);
ComponentSpec clip_text_spec(const ClipTextConfig& config, const FluxWorkload& work);
ComponentSpec vae_decoder_spec(const VaeConfig& config, const FluxWorkload& work);

// What plan_memory is not told: the CUDA context with its lazily loaded kernels (about 0.5 GB on Hopper with
// CUDA 12/13), the libraries' workspaces and plans (cuBLASLt, cuDNN's attention), and buffers the backend makes on
// first use and keeps (FP8 activation copies, attention scratch). Measured on the H100 (session 4): the device's
// peak (cudaMemGetInfo) ran 0.4-0.6 GB over plans made with 1 GB, and still 0.2-0.5 GB over plans made with 1.6 GB
// (the context alone is ~0.75 GB beside the allocator's pool), so 2.1 GB.
inline constexpr uint64_t kDefaultReserveBytes = 2100000000ull;

// FLUX.1-dev (and schnell: same sizes but the guidance embedder) with the given formats.
MemoryPlanRequest flux1_plan_request(uint64_t budget_bytes, WeightFormat transformer, WeightFormat t5,
                                     const FluxWorkload& work = {}, const FluxConfig& config = FluxConfig::flux1_dev());
// Any pipeline, from its components' configs (sizes computed, not measured) and the default reserve.
MemoryPlanRequest pipeline_plan_request(uint64_t budget_bytes, const FluxConfig& transformer,
                                        WeightFormat transformer_format, const T5EncoderConfig& t5,
                                        WeightFormat t5_format, const ClipTextConfig& clip, const VaeConfig& vae,
                                        const FluxWorkload& work);

}  // namespace fluxswap
