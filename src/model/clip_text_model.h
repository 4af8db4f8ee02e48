#pragma once
// FLUX's first text encoder: the CLIP-L text model (transformers' CLIPTextModel), written once against the Backend
// ops. Token + position embeddings, pre-LayerNorm blocks with causal self-attention, a final LayerNorm; FLUX uses
// only the pooled output, the final hidden state at each prompt's first end-of-text token. As in the FLUX
// pipeline, no attention mask is applied beyond the causal one, so padding tokens are attended.
#include <array>
#include <cstdint>
#include <string>
#include <vector>

#include "backend/backend.h"
#include "io/safetensors.h"
#include "model/weight_offload.h"

namespace fluxswap {

struct ClipTextConfig {
  int64_t vocab_size = 49408;
  int64_t hidden_size = 768;
  int64_t intermediate_size = 3072;
  int64_t num_attention_heads = 12;
  int64_t num_hidden_layers = 12;
  int64_t max_position_embeddings = 77;
  float layer_norm_eps = 1e-5f;
  Activation hidden_act = Activation::QuickGelu;

  int64_t head_dim() const { return hidden_size / num_attention_heads; }

  // FLUX.1's CLIP-L text model (openai/clip-vit-large-patch14, the defaults above).
  static ClipTextConfig flux1() { return ClipTextConfig{}; }

  // Parses a transformers CLIPTextConfig config.json (a diffusers `text_encoder/config.json`); `path` is for
  // messages. Error for a hidden_act the backends cannot compute.
  static ClipTextConfig from_json_text(const std::string& text, const std::string& path);
  static ClipTextConfig from_json_file(const std::string& path);
  // Throws Error naming `what` if a value is out of range or inconsistent.
  void validate(const std::string& what) const;
};

struct ClipTextLayerWeights {
  Tensor ln1_weight, ln1_bias;  // [C]
  Tensor qkv_weight, qkv_bias;  // [3C, C], [3C]: q | k | v projections fused into one GEMM
  Tensor out_weight, out_bias;  // [C, C], [C]
  Tensor ln2_weight, ln2_bias;  // [C]
  Tensor fc1_weight, fc1_bias;  // [I, C], [I]
  Tensor fc2_weight, fc2_bias;  // [C, I], [C]
};

struct ClipTextWeights {
  Tensor token_embedding;     // [V, C]
  Tensor position_embedding;  // [P, C]
  std::vector<ClipTextLayerWeights> layers;
  Tensor final_ln_weight, final_ln_bias;  // [C]

  // Every tensor, in a fixed order: what leaves the device on offload.
  std::vector<Tensor*> device_tensors();
};

// The linears of a layer, q, k and v fused into one.
enum class ClipLinear { Qkv, Out, Fc1, Fc2 };

// A LoRA branch computed beside one linear at run time: y = act(W x + b + up (down x)). Several adapters (and
// separate q/k/v LoRAs on the fused qkv) are one stacked product: downs along the rank, each up in its own rows and
// rank columns with its weight x scale folded in, zero elsewhere.
struct ClipLoraLinear {
  int64_t layer = 0;
  ClipLinear linear = ClipLinear::Qkv;
  Tensor down;  // [R, in_features] on the device, compute dtype
  Tensor up;    // [out_features, R]
};

// Reads, fuses and uploads every weight, with or without the `text_model.` key prefix older transformers versions
// write. Throws Error naming the file and key on a missing tensor or a shape the config does not imply.
ClipTextWeights load_clip_text_weights(const SafetensorsCollection& file, const ClipTextConfig& config,
                                       Backend& backend);

class ClipTextModel {
 public:
  ClipTextModel(const ClipTextConfig& config, ClipTextWeights weights, Backend& backend);
  // A diffusers `text_encoder/` folder: config.json beside model.safetensors (or model.safetensors.index.json).
  static ClipTextModel from_folder(const std::string& dir, Backend& backend);

  // Allocates the activation buffers for a batch and sequence length; kept while the shape stays the same.
  void prepare(int64_t batch, int64_t seq_len);
  // ids: int32 [B, S] on the backend's device. eos_index[b]: the position of sample b's first end-of-text token
  // (TokenEncoding::eos_index), where its pooled output is read. Writes pooled [B, C] and, when defined,
  // last_hidden rows [B, S, C] (after the final LayerNorm), both in the compute dtype. Issues device work only.
  void encode(const Tensor& ids, const std::vector<int64_t>& eos_index, const Tensor& pooled,
              const Tensor& last_hidden = Tensor());

  // Replaces the LoRA branches (empty: none). The weights are never changed, so offloading and the base outputs
  // are unaffected and swapping adapters costs only their upload. Throws Error on a layer or shape that does not
  // fit, changing nothing.
  void set_lora(std::vector<ClipLoraLinear> linears);
  size_t lora_linears() const { return lora_count_; }

  const ClipTextConfig& config() const { return config_; }
  Backend& backend() { return backend_; }

  // Under a memory budget the model is on the device only while it encodes: offload() frees its device weights
  // (kept in host memory, pinned on the GPU) and buffers, onload() brings the weights back in one transfer. Results
  // are bit-identical either way. Both idempotent; encode() refuses to run while offloaded.
  void offload();
  void onload();
  bool resident() const { return offload_.resident(); }
  // Device bytes of the weights, resident or not.
  uint64_t weight_bytes();
  // Frees the activation buffers; the next encode makes them again.
  void release_buffers();

 private:
  void layer(int64_t i);
  // w x + b (+ the layer's LoRA branch on this linear, if any).
  void linear(const Tensor& x, int64_t layer, ClipLinear which, const Tensor& w, const Tensor& b, const Tensor& y,
              Activation act);

  ClipTextConfig config_;
  ClipTextWeights weights_;
  Backend& backend_;
  WeightOffload offload_;
  struct LoraFactors {
    Tensor down, up;
  };
  std::vector<std::array<LoraFactors, 4>> lora_;  // per layer, per ClipLinear
  size_t lora_count_ = 0;
  int64_t lora_rank_ = 0;  // the largest R: the scratch's width

  int64_t B_ = 0, S_ = 0;
  struct Buffers {
    Tensor hidden;   // [B, S, C] residual stream
    Tensor normed;   // [B, S, C] LayerNorm output, the input of each block's branch
    Tensor qkv;      // [B, S, 3C]
    Tensor q, k, v;  // [B, H, S, head_dim]
    Tensor attn;     // [B, S, C] attention output, heads concatenated
    Tensor branch;   // [B, S, C] output projection of a branch, before its residual add
    Tensor mlp;      // [B, S, I] MLP hidden activations
    Tensor lora_scratch;  // [B, S, >= lora_rank_]: down x of a LoRA branch
  } buf_;
};

}  // namespace fluxswap
