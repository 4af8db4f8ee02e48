#pragma once
// The conformance interface of the transformer: inputs under the fixture key names (`in.hidden_states`,
// `in.encoder_hidden_states`, `in.pooled_projections`, `in.timestep`, `in.img_ids`, `in.txt_ids`, optional
// `in.guidance`) in, one forward pass, float32 output back on the host.
#include <string>

#include "io/safetensors.h"
#include "model/flux_transformer.h"

namespace fluxswap {

struct FluxHostInputs {
  Tensor hidden_states, encoder_hidden_states, pooled_projections, timestep, guidance, img_ids, txt_ids;
};

// Reads and checks the `in.*` tensors (shapes must agree with each other; ids may carry a batch dimension, as
// older diffusers versions wrote them, in which case the first sample's ids are used).
FluxHostInputs read_flux_inputs(const SafetensorsFile& file);

// Uploads the inputs, runs one forward pass and returns [B, Ni, C] float32 on the host.
Tensor run_flux_transformer(FluxTransformer& transformer, const FluxHostInputs& inputs);

}  // namespace fluxswap
