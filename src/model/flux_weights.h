#pragma once
// The transformer's weights on a backend, in the internal (fused, BFL-named) layout of flux_weight_map.h.
#include <map>
#include <string>
#include <vector>

#include "backend/backend.h"
#include "model/flux_checkpoint.h"

namespace fluxswap {

struct Linear {
  Tensor weight;  // [out, in]
  Tensor bias;    // [out]
  // A runtime LoRA slot, undefined unless LoRA runtime mode gave this module one: down [R, in], up [out, R].
  Tensor lora_down, lora_up;
  // For modules fed by token rows: [W | up] as one [out, in + R] matrix, with weight and lora_up views of it, so
  // that [x | x down^T] [W | up]^T is the whole product in one GEMM (undefined otherwise).
  Tensor lora_weight;
  // FP8 mode: the working weight in e4m3 with one float32 scale per output feature (undefined in bf16 mode). The
  // bf16 `weight` stays as the pristine source it is requantised from (merged LoRA), except in an FP8-only model
  // (loaded from an FP8 checkpoint), whose block linears have no `weight` at all.
  Tensor weight_fp8, weight_scale;
};


struct DoubleBlockWeights {
  Linear img_mod, txt_mod;    // [6D, D]: shift, scale, gate (attention), shift, scale, gate (MLP)
  Linear img_qkv, txt_qkv;    // [3D, D]
  Tensor img_q_norm, img_k_norm, txt_q_norm, txt_k_norm;  // [head_dim]
  Linear img_proj, txt_proj;  // [D, D]
  Linear img_mlp_in, txt_mlp_in;    // [M, D]
  Linear img_mlp_out, txt_mlp_out;  // [D, M]
};

struct SingleBlockWeights {
  Linear modulation;  // [3D, D]: shift, scale, gate
  Linear linear1;     // [3D + M, D]: q, k, v, MLP in
  Tensor q_norm, k_norm;
  Linear linear2;     // [D, D + M]: attention out and MLP out fused
};

struct FluxWeights {
  Linear img_in, txt_in;
  Linear time_in, time_out, vector_in, vector_out;
  Linear guidance_in, guidance_out;  // undefined when the model has no guidance embedder (schnell)
  std::vector<DoubleBlockWeights> double_blocks;
  std::vector<SingleBlockWeights> single_blocks;
  Linear final_mod;    // [2D, D]: shift, scale
  Linear final_linear; // [C_out, D]

  // Every tensor by internal name (the same memory as the fields above). The FP8 pair of a linear loaded as FP8 is
  // `<module>.weight_fp8` and `<module>.weight_scale`, in place of `<module>.weight`.
  std::map<std::string, Tensor> by_name;
  // The block linears exist only in FP8 (no bf16 copy on the device): the transformer cannot leave FP8 mode.
  bool fp8_only = false;
  // The tensors are off the device (FluxTransformer::offload): undefined, but the modules still exist.
  bool offloaded = false;

  // Every device tensor of the model proper, in a fixed order: each linear's weight, bias and FP8 pair, and the
  // norms; not the LoRA slots (they stay on the device when the weights leave it).
  std::vector<Tensor*> device_tensors();
  // The same split by owner: each block's tensors (double blocks, then single blocks, as they run) and the rest
  // (embedders, final layer).
  std::vector<std::vector<Tensor*>> block_tensors();
  std::vector<Tensor*> shared_tensors();
  // The linears outside the blocks (embedders, final layer; undefined guidance ones included).
  std::vector<Linear*> shared_linears();
  // The linears of block b (execution order).
  std::vector<Linear*> block_linears(size_t b);

  // Drops by_name's references to t's memory, so that replacing a field (a weight moved into [W | up], a bf16
  // copy an FP8-only model does not keep) really frees it.
  void forget(const Tensor& t);

  // The linear module with this internal name ("double_blocks.3.img_attn.qkv", "final_layer.linear", ...).
  // Throws Error for a name that is not a linear module of this model.
  Linear& linear(const std::string& module);
};

struct WeightLoadReport {
  size_t tensors_loaded = 0;
  size_t bytes_on_device = 0;
  std::vector<std::string> unused_keys;  // checkpoint keys under the prefix that no internal tensor reads
};

// Reads, converts, fuses and uploads every weight. Throws Error naming the file and key on a missing tensor or a
// shape that does not match the config.
//
// A checkpoint whose block linears are stored in FP8 (checkpoint.fp8_linears) gives an FP8-only model: they
// (block_token_linears) get weight_fp8 and weight_scale and no bf16 weight. An F8_E4M3 weight keeps its bytes, its
// per-tensor scale (`<module>.scale_weight`, a scalar or [1]; 1 when absent) repeated for each row; block linears
// stored otherwise (F8_E5M2, bf16, ...) are quantised per row at load. Every other weight stored in FP8 is
// dequantised (value x scale) to the compute dtype. `<module>.scale_input` and the `scaled_fp8` marker are
// ComfyUI's and ignored.
//
// keep_on_host[b] (blocks in execution order; empty: none): block b's tensors stay in host memory, for a memory plan
// that streams it (FluxTransformer::stream_blocks moves them into pinned memory), so that loading stays within a
// budget that cannot hold the whole transformer.
FluxWeights load_flux_weights(const FluxCheckpoint& checkpoint, Backend& backend, WeightLoadReport* report = nullptr,
                              const std::vector<bool>& keep_on_host = {});

// Builds the struct view from a complete by_name map (used by loaders and by tests that make weights directly).
FluxWeights flux_weights_from_map(const FluxConfig& config, std::map<std::string, Tensor> by_name);

// The linears of the blocks that read token rows (qkv, proj, MLPs, linear1/2): 99% of the step's FLOPs. FP8 mode
// quantises these; runtime LoRA slots of these live inside [W | up] (the transformer gives their inputs room).
std::vector<Linear*> block_token_linears(FluxWeights& weights);
// The per-sample modulation linears (a sixth of the weights, read once per step by bandwidth-bound products): FP8
// mode stores them in e4m3 too.
std::vector<Linear*> modulation_linears(FluxWeights& weights);
// Their internal module names ("double_blocks.0.img_attn.qkv", ..., "single_blocks.0.linear2"), in the same order.
std::vector<std::string> block_token_linear_names(const FluxConfig& config);
// weight_fp8/weight_scale of `l` from its bf16 weight (allocated on first use). Error for an FP8-only linear. A weight
// in host memory (a block kept there for streaming) is quantised on the host, with the same rounding.
void quantize_linear_fp8(Linear& l, Backend& backend);

}  // namespace fluxswap
