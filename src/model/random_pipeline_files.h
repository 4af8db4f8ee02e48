#pragma once
// What a diffusers FLUX.1 pipeline folder holds, component by component, for making one with random weights
// (`fluxswap make-random-model`): each component's config.json text and the tensors of its weights file under the
// names the reference libraries write (transformers for the text encoders, diffusers for the VAE and transformer, or
// BFL/ComfyUI names for a single-file FP8 transformer), with the initialisation of random_component_weights.h:
// linear and conv weights normal(0, 1/sqrt(fan-in)), biases normal(0, 0.02), norm scales normal(1, 0.1),
// embeddings normal(0, 1). Never zeros: the pipeline runs on them and its output stays finite.
#include <string>
#include <vector>

#include "model/clip_text_model.h"
#include "model/flux_config.h"
#include "model/random_checkpoint.h"
#include "model/t5_encoder.h"
#include "model/vae_decoder.h"

namespace fluxswap {

// transformers CLIPTextModel (`text_model.` prefix), BF16.
std::vector<RandomTensor> clip_text_random_tensors(const ClipTextConfig& config);
std::string clip_text_config_json(const ClipTextConfig& config);

// transformers T5EncoderModel (`shared.weight`, `encoder.block.N...`), BF16.
std::vector<RandomTensor> t5_encoder_random_tensors(const T5EncoderConfig& config);
std::string t5_encoder_config_json(const T5EncoderConfig& config);

// diffusers AutoencoderKL, decoder only (all the pipeline reads), BF16.
std::vector<RandomTensor> vae_decoder_random_tensors(const VaeConfig& config);
std::string vae_config_json(const VaeConfig& config);

// The transformer in BF16 under `naming`, or with `fp8` as a ComfyUI "scaled fp8" single file (BFL names, every
// linear weight F8_E4M3 with its `<module>.scale_weight`, the `scaled_fp8` marker; biases and norms BF16).
std::vector<RandomTensor> flux_transformer_random_tensors(const FluxConfig& config, FluxNaming naming, bool fp8);

}  // namespace fluxswap
