#pragma once
// Text to image with FLUX.1, as diffusers' FluxPipeline computes it: CLIP-L pooled + T5 token embeddings, seeded
// noise packed into 2x2 latent patches, FlowMatch Euler steps through the transformer (the step recorded once and
// replayed), unpack, VAE decode, 8-bit RGB.
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "model/clip_text_model.h"
#include "model/flux_transformer.h"
#include "model/t5_encoder.h"
#include "model/vae_decoder.h"
#include "pipeline/flow_match_scheduler.h"
#include "pipeline/pipeline_memory.h"
#include "pipeline/png_image.h"
#include "text/text_tokenizer.h"

namespace fluxswap {

struct GenerateParams {
  std::vector<std::string> prompts;  // one image per prompt
  int width = 0, height = 0;        // 0: 1024, or 128 for the tiny test pipeline (its VAE upsamples 2x)
  int steps = 0;                     // 0: 28 for models with a guidance embedder (dev), 4 otherwise (schnell)
  int max_sequence_length = 0;       // 0: 512 with a guidance embedder, 256 otherwise
  float guidance = 3.5f;             // the distilled guidance of FLUX.1-dev; ignored by schnell models
  uint64_t seed = 0;
  // Packed initial noise [B, tokens, 4 * latent channels] (any float dtype); undefined: drawn from `seed`.
  Tensor latents;
  // Called after every step with (step index, steps, seconds the step took).
  std::function<void(int, int, double)> on_step;
  // Polled after every step (once the step's device work is done); returning true stops the generation with
  // Error("generation cancelled ..."). The pipeline is ready for the next generate() after that.
  std::function<bool()> should_cancel;
};

struct EncodedPrompts {
  Tensor prompt_embeds;  // [B, S, joint_attention_dim] on the device
  Tensor pooled;         // [B, pooled_projection_dim] on the device
};

// Device memory at the end of a phase, its weights and buffers still held (near the phase's peak): the backend's
// own allocations (memory_in_use) and the whole device as the driver reports it (device_memory_used: plus the CUDA
// context, library workspaces and other processes). 0 on the CPU.
struct PhaseMemory {
  uint64_t pool = 0, device = 0;
};

struct GenerateResult {
  std::vector<Rgb8Image> images;
  Tensor latents;  // final packed latents, host float32
  int width = 0, height = 0, steps = 0, max_sequence_length = 0;  // as resolved from the params' defaults
  double encode_s = 0, denoise_s = 0, decode_s = 0;  // encode and decode include on-demand uploads
  PhaseMemory encode_memory, denoise_memory, decode_memory;
};

// The initial noise as the engine draws it: value i of the unpacked [B, C, h, w] latents (row-major) is
// normal_from_counter(seed, i) (core/counter_rng.h), then packed. Host float32 [B, (h/2)(w/2), 4C].
Tensor flux_initial_noise(uint64_t seed, int64_t batch, int64_t channels, int64_t latent_h, int64_t latent_w);

struct PipelineLoadOptions {
  MemoryBudget budget;  // budget.bytes 0: none
  bool t5_nf4 = false;  // T5's linears stored NF4 (quantised on the host while loading; T5-XXL 9.5 GB -> 2.9 GB)
};

class FluxPipeline {
 public:
  // A diffusers FLUX pipeline folder (model_index.json, tokenizer*/, text_encoder*/, transformer/, vae/,
  // scheduler/) or a Hugging Face cache entry of one.
  // With a budget (options.budget.bytes > 0) the backend's memory is capped at it before anything is allocated, the
  // plan is made from the component configs first (so an impossible budget fails before loading), components planned
  // on demand leave the device right after they are loaded, and the final plan is made from the loaded sizes (see
  // set_memory_budget).
  static std::unique_ptr<FluxPipeline> from_pretrained(const std::string& path, Backend& backend,
                                                       const PipelineLoadOptions& options = {});
  // From parts already built (benchmarks on random weights at full size); checked to fit like from_pretrained.
  static std::unique_ptr<FluxPipeline> from_components(Backend& backend, std::unique_ptr<TextTokenizer> clip_tokenizer,
                                                       std::unique_ptr<TextTokenizer> t5_tokenizer,
                                                       std::unique_ptr<ClipTextModel> clip,
                                                       std::unique_ptr<T5Encoder> t5,
                                                       std::unique_ptr<FluxTransformer> transformer,
                                                       std::unique_ptr<VaeDecoder> vae,
                                                       FlowMatchSchedulerConfig scheduler, const std::string& label);

  // Under a memory plan, CLIP and then T5 come onto the device for their encode and leave right after (on-demand
  // ones offloaded, resident ones' buffers freed), before the caller allocates anything for the steps.
  EncodedPrompts encode_prompts(const std::vector<std::string>& prompts, int max_sequence_length);
  GenerateResult generate(const GenerateParams& params);

  // Plans where each component lives under budget.bytes from the loaded components' real sizes
  // (measured_plan_request), caps the backend's device memory at budget.bytes (going past it is then an Error, never
  // a silent over-use) and applies the plan: components planned on demand leave the device now (their weights wait
  // in pinned host memory) and come back only for their phase of generate(); a streamed transformer keeps the planned
  // blocks in pinned host memory and uploads them every step (FluxTransformer::stream_blocks). Throws Error when
  // nothing fits. Call it after LoRAs are set up (their device memory counts) and again when the workload grows.
  // budget.bytes 0: no budget, everything back on the device (a streamed transformer's blocks too), no cap; returns
  // null.
  const MemoryPlan* set_memory_budget(const MemoryBudget& budget);
  const MemoryPlan* memory_plan() const { return plan_ ? &*plan_ : nullptr; }
  // What generate(params) will run, for a plan: its size, batch and T5 tokens with the defaults resolved, and the
  // runtime LoRA slot rank given.
  FluxWorkload workload_for(const GenerateParams& params, int64_t lora_slot_rank = 0) const;

  FluxTransformer& transformer() { return *transformer_; }
  T5Encoder& t5() { return *t5_; }
  ClipTextModel& clip() { return *clip_; }
  VaeDecoder& vae() { return *vae_; }
  const std::string& path() const { return path_; }
  bool is_guidance_distilled() const { return transformer_->config().guidance_embeds; }
  int vae_scale_factor() const;

 private:
  FluxPipeline(Backend& backend) : backend_(backend) {}
  void check_components_fit(const std::string& label) const;
  int default_size() const;                  // pixels per side when the params give 0
  int default_max_sequence_length() const;   // T5 tokens when the params give 0
  bool on_demand(const char* component) const;
  // Around a component's phase under a plan: an on-demand one comes onto the device before, and after it leaves
  // (on demand) or frees its buffers (resident).
  template <class Component>
  void enter_phase(Component& c, const char* name);
  template <class Component>
  void leave_phase(Component& c, const char* name);
  // After a failed phase: on-demand components leave again, so the next generation starts from the plan.
  void restore_placements() noexcept;
  PhaseMemory measure_memory() const;

  Backend& backend_;
  std::string path_;
  std::unique_ptr<TextTokenizer> clip_tokenizer_, t5_tokenizer_;
  std::unique_ptr<ClipTextModel> clip_;
  std::unique_ptr<T5Encoder> t5_;
  std::unique_ptr<FluxTransformer> transformer_;
  std::unique_ptr<VaeDecoder> vae_;
  FlowMatchSchedulerConfig scheduler_config_;
  std::optional<MemoryPlan> plan_;
  PhaseMemory encode_memory_;  // measured inside encode_prompts, before T5 leaves
};

// How the PNG parameters name a model: "FLUX.1-dev" for a Hugging Face cache entry, the folder name otherwise
// ("tiny/pipeline" for a nested one).
std::string model_display_name(const std::string& path);

// A1111-style `parameters` text for the PNG: the prompt, then "Steps: 28, Sampler: Euler, ...".
std::string generation_parameters_text(const std::string& prompt, const GenerateParams& params,
                                       const GenerateResult& result, const std::string& model_name,
                                       const std::string& loras);

}  // namespace fluxswap
