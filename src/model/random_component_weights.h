#pragma once
// Random weights for FLUX's other components (CLIP-L text model, T5 encoder, VAE decoder), generated on the
// backend's device in the layouts the loaders build (fused q | k | v, fused wi_0 | wi_1): for benchmarks at
// FLUX.1 size without a checkpoint, and tests. As for the transformer (flux_random_weights.h), never zeros:
// linear and conv weights normal(0, 1/sqrt(fan-in)), biases normal(0, 0.02), norm scales normal(1, 0.1),
// embeddings (and T5's relative attention bias table) normal(0, 1). The same config and seed give the same values.
#include <cstdint>

#include "backend/backend.h"
#include "model/clip_text_model.h"
#include "model/t5_encoder.h"
#include "model/vae_decoder.h"

namespace fluxswap {

ClipTextWeights random_clip_text_weights(const ClipTextConfig& config, Backend& backend, uint64_t seed);
// The relative attention bias table is the one host tensor (the encoder builds its per-length bias on the host):
// it is drawn on the device too and copied back, so it follows the same generator as the rest.
T5EncoderWeights random_t5_encoder_weights(const T5EncoderConfig& config, Backend& backend, uint64_t seed);
VaeDecoderWeights random_vae_decoder_weights(const VaeConfig& config, Backend& backend, uint64_t seed);

}  // namespace fluxswap
