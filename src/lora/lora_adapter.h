#pragma once
// A LoRA file, whatever its format, parsed into the engine's internal (fused, BFL-named) layout: a list of
// low-rank updates, each on a row range of one internal linear module. Merging and runtime slots work from this
// alone; nothing downstream knows which format a file was in.
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "core/tensor.h"
#include "io/safetensors.h"
#include "model/flux_config.h"

namespace fluxswap {

// Rows [row, row + rows) of internal module `module` ("double_blocks.0.img_attn.qkv", "single_blocks.3.linear1",
// "final_layer.adaLN_modulation.1", ...) get  dW = scale * up @ down  (and  db = scale * up_bias  when present).
struct LoraPair {
  std::string module;
  int64_t row = 0;
  int64_t rows = 0;
  // Host tensors in the file's float dtype, views of the mapped file unless rows had to be reordered: nothing is
  // converted on the host (uploads convert, and a bf16 file goes to a bf16 device as it is).
  Tensor down;     // [r, in_features]
  Tensor up;       // [rows, r]
  Tensor up_bias;  // [rows]; undefined unless the file has one (PEFT lora_B.bias)
  float scale = 1.0f;  // alpha / r as the format defines it (the user's weight multiplies it later)
  std::string source;  // the file's key stem, for messages
};

struct LoraAdapter {
  std::string path;
  std::string format;  // "peft", "kohya", "comfyui", "xlabs", "onetrainer", "bfl-lora", "fal-kontext"
  std::vector<LoraPair> pairs;
  size_t tensors_used = 0;  // file tensors that went into pairs
  // LoRAs on the CLIP-L text encoder's linears. `module` is the transformers name
  // ("text_model.encoder.layers.0.self_attn.q_proj"), rows [0, up rows): the CLIP model's fused layout and sizes
  // are checked when they are applied (clip_lora.h), as the file alone does not give them.
  std::vector<LoraPair> clip_pairs;
  size_t clip_tensors_used = 0;
  std::vector<std::string> ignored_keys;  // recognised but not applied (T5 text-encoder LoRA, dora_scale): reported
  std::map<std::string, std::string> metadata;
  // Set by start_loading_lora_adapter(): the file, which may still be arriving, and the keys whose values (NaN/Inf)
  // are checked once it is in. Null for an adapter parsed from a complete file (checked already).
  std::shared_ptr<const SafetensorsFile> arriving;
  std::vector<std::string> unchecked;  // sorted
};

// Detects the format, maps every key onto the internal layout and validates shapes against `config` and values
// (NaN/Inf). Throws Error naming the file and key(s): unmatched keys are listed, never silently dropped.
LoraAdapter parse_lora_adapter(const SafetensorsFile& file, const FluxConfig& config);
// With `host` (Backend::host_buffer_allocator()), the file is read into that memory (pinned, for the CUDA backend:
// uploads then go straight from it by DMA) instead of being mapped.
LoraAdapter load_lora_adapter(const std::string& path, const FluxConfig& config, const HostBufferAllocator& host = {});
// The same, returning as soon as the file's header is parsed and mapped onto the model: the data goes on arriving
// in `host` memory in the background (SafetensorsFile::read_in_background), so LoraController::set_adapters can
// upload each tensor as it lands. Structural errors (names, shapes, dtypes) are thrown here; a NaN/Inf or a read
// error surfaces from wait_until_loaded() (which set_adapters calls before it changes the model). The chunks are read
// in the order a step reads the weights (flux_step_rank) unless `read` sets an order; with `read.paused` they start
// only once the keys are mapped (the mapping then runs at full speed, the read a little later). Without `host`, the
// file is mapped and everything is checked here, as by load_lora_adapter.
LoraAdapter start_loading_lora_adapter(const std::string& path, const FluxConfig& config,
                                       const HostBufferAllocator& host, const SafetensorsReadOptions& read = {});
// Blocks until the adapter's file is in memory and checks its values; throws Error naming the file and the key of
// the first non-finite value (again on every call). Returns at once for an adapter that is complete.
void wait_until_loaded(const LoraAdapter& adapter);

}  // namespace fluxswap
