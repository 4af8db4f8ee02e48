#pragma once
// Reading the weights of a model component (transformer, text encoders, VAE): finding the weights file in a
// diffusers component folder, looking tensors up with their dtype and shape checked, and fusing several tensors
// into one uploaded weight. Every failure is an Error naming the folder or the file and key, and what was expected.
#include <string>
#include <vector>

#include "backend/backend.h"
#include "io/safetensors.h"

namespace fluxswap {

// The weights file of a component folder: the first of `names` (tried in order) that exists in `dir`; with
// `or_only_safetensors`, else the folder's .safetensors file when it holds exactly one. Error naming the folder and
// every name looked for.
std::string weights_in_folder(const std::string& dir, const std::vector<std::string>& names,
                              bool or_only_safetensors = false);
// The names of a transformers model folder (the text encoders), sharded index first (FLUX.1's T5-XXL is sharded).
inline const std::vector<std::string> kTransformersWeightFiles = {"model.safetensors.index.json", "model.safetensors"};

// The tensor under `key`, checked to be of a float dtype. Error "<file>: tensor '<key>' is missing" or
// "... is I32 [3, 4], expected a float tensor", followed by " (<context>)" when a context is given.
Tensor float_tensor(const SafetensorsCollection& file, const std::string& key, const std::string& context = {});
// The same, also checked to have `shape`: "... is F32 [48, 40], expected a float tensor of shape [49, 40]".
Tensor checked_tensor(const SafetensorsCollection& file, const std::string& key, const Shape& shape,
                      const std::string& context = {});

// The tensors under `keys` (each checked to be a float tensor of shape `part`) stacked along the first dimension,
// converted to the backend's compute dtype and uploaded: e.g. q | k | v projections fused into one GEMM weight.
Tensor load_stacked(const SafetensorsCollection& file, const std::vector<std::string>& keys, const Shape& part,
                    Backend& backend);
// The same stack on the host, in `dtype`.
Tensor stack_on_host(const SafetensorsCollection& file, const std::vector<std::string>& keys, const Shape& part,
                     DType dtype);

// A weight kept on the device in NF4 (quant/nf4.h: bitsandbytes' layout, blocks of kNf4WeightBlocksize values with a
// float32 absmax each, no double quantisation); a linear dequantises it (Backend::dequantize_nf4) before its product.
inline constexpr int64_t kNf4WeightBlocksize = 64;
struct Nf4Weight {
  Tensor packed;  // U8 [(rows * cols + 1) / 2]
  Tensor absmax;  // F32 [blocks]
};
// Quantises a host tensor of any float dtype (on every core) and uploads its codes and absmax as they are.
Nf4Weight upload_nf4(const Tensor& host, Backend& backend);

}  // namespace fluxswap
