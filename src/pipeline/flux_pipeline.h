#pragma once
// Text to image with FLUX.1, as diffusers' FluxPipeline computes it: CLIP-L pooled + T5 token embeddings, seeded
// noise packed into 2x2 latent patches, FlowMatch Euler steps through the transformer (the step recorded once and
// replayed), unpack, VAE decode, 8-bit RGB.
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "model/clip_text_model.h"
#include "model/flux_transformer.h"
#include "model/t5_encoder.h"
#include "model/vae_decoder.h"
#include "pipeline/flow_match_scheduler.h"
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

struct GenerateResult {
  std::vector<Rgb8Image> images;
  Tensor latents;  // final packed latents, host float32
  int width = 0, height = 0, steps = 0, max_sequence_length = 0;  // as resolved from the params' defaults
  double encode_s = 0, denoise_s = 0, decode_s = 0;
};

// The initial noise as the engine draws it: value i of the unpacked [B, C, h, w] latents (row-major) is
// normal_from_counter(seed, i) (core/counter_rng.h), then packed. Host float32 [B, (h/2)(w/2), 4C].
Tensor flux_initial_noise(uint64_t seed, int64_t batch, int64_t channels, int64_t latent_h, int64_t latent_w);

class FluxPipeline {
 public:
  // A diffusers FLUX pipeline folder (model_index.json, tokenizer*/, text_encoder*/, transformer/, vae/,
  // scheduler/) or a Hugging Face cache entry of one.
  static std::unique_ptr<FluxPipeline> from_pretrained(const std::string& path, Backend& backend);
  // From parts already built (benchmarks on random weights at full size); checked to fit like from_pretrained.
  static std::unique_ptr<FluxPipeline> from_components(Backend& backend, std::unique_ptr<TextTokenizer> clip_tokenizer,
                                                       std::unique_ptr<TextTokenizer> t5_tokenizer,
                                                       std::unique_ptr<ClipTextModel> clip,
                                                       std::unique_ptr<T5Encoder> t5,
                                                       std::unique_ptr<FluxTransformer> transformer,
                                                       std::unique_ptr<VaeDecoder> vae,
                                                       FlowMatchSchedulerConfig scheduler, const std::string& label);

  EncodedPrompts encode_prompts(const std::vector<std::string>& prompts, int max_sequence_length);
  GenerateResult generate(const GenerateParams& params);

  FluxTransformer& transformer() { return *transformer_; }
  const std::string& path() const { return path_; }
  bool is_guidance_distilled() const { return transformer_->config().guidance_embeds; }
  int vae_scale_factor() const;

 private:
  FluxPipeline(Backend& backend) : backend_(backend) {}
  void check_components_fit(const std::string& label) const;

  Backend& backend_;
  std::string path_;
  std::unique_ptr<TextTokenizer> clip_tokenizer_, t5_tokenizer_;
  std::unique_ptr<ClipTextModel> clip_;
  std::unique_ptr<T5Encoder> t5_;
  std::unique_ptr<FluxTransformer> transformer_;
  std::unique_ptr<VaeDecoder> vae_;
  FlowMatchSchedulerConfig scheduler_config_;
};

// How the PNG parameters name a model: "FLUX.1-dev" for a Hugging Face cache entry, the folder name otherwise
// ("tiny/pipeline" for a nested one).
std::string model_display_name(const std::string& path);

// A1111-style `parameters` text for the PNG: the prompt, then "Steps: 28, Sampler: Euler, ...".
std::string generation_parameters_text(const std::string& prompt, const GenerateParams& params,
                                       const GenerateResult& result, const std::string& model_name,
                                       const std::string& loras);

}  // namespace fluxswap
