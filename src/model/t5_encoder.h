#pragma once
// FLUX's second text encoder: the T5 v1.1 encoder (transformers' T5EncoderModel, FLUX ships T5-XXL), written once
// against the Backend ops. Pre-RMSNorm blocks of unscaled self-attention with a learned relative position bias
// (computed by the first layer, shared by all) and a gated feed-forward, then a final RMSNorm. As in the FLUX
// pipeline, no attention mask is applied, so padding tokens are attended.
#include <cstdint>
#include <string>
#include <vector>

#include "backend/backend.h"
#include "io/safetensors.h"
#include "model/weight_offload.h"

namespace fluxswap {

struct T5EncoderConfig {
  int64_t vocab_size = 32128;
  int64_t d_model = 4096;
  int64_t d_kv = 64;
  int64_t num_heads = 64;
  int64_t d_ff = 10240;
  int64_t num_layers = 24;
  int64_t relative_attention_num_buckets = 32;
  int64_t relative_attention_max_distance = 128;
  float layer_norm_epsilon = 1e-6f;
  // Applied to the gate half of the gated feed-forward ("gated-gelu" means the tanh approximation, gelu_new).
  Activation dense_act = Activation::GeluTanh;

  int64_t inner_dim() const { return d_kv * num_heads; }

  // FLUX.1's T5-XXL encoder (google/t5-v1_1-xxl, the defaults above).
  static T5EncoderConfig flux1() { return T5EncoderConfig{}; }

  // Parses a transformers T5Config config.json (a diffusers `text_encoder_2/config.json`); `path` is for messages.
  // Error for a feed-forward the backends cannot compute (non-gated ones, exact erf GELU).
  static T5EncoderConfig from_json_text(const std::string& text, const std::string& path);
  static T5EncoderConfig from_json_file(const std::string& path);
  // Throws Error naming `what` if a value is out of range or inconsistent.
  void validate(const std::string& what) const;
};

// The bidirectional relative position bucket of T5's encoder for relative_position = key - query: exact buckets
// for short distances, logarithmic ones up to max_distance, half of them for keys after the query.
int64_t t5_relative_position_bucket(int64_t relative_position, int64_t num_buckets, int64_t max_distance);

// The attention bias of a sequence: host float32 [H, S, S] with bias[h, i, j] = table[bucket(j - i), h], from the
// float32 host table [num_buckets, H] (the first layer's relative_attention_bias.weight).
Tensor t5_position_bias(const Tensor& table, int64_t seq_len, int64_t max_distance);

struct T5LayerWeights {
  Tensor attn_norm;  // [D]
  Tensor qkv;        // [3 * inner, D]: q | k | v projections fused into one GEMM (T5 linears have no bias)
  Tensor o;          // [D, inner]
  Tensor ff_norm;    // [D]
  Tensor wi;         // [2 * d_ff, D]: wi_0 (the activated gate) | wi_1 (the linear half), one GEMM
  Tensor wo;         // [D, d_ff]
  // NF4 (T5EncoderWeights::nf4): qkv, o, wi and wo hold the packed codes of the matrices above (component_weights.h
  // Nf4Weight), and these their float32 absmax; undefined otherwise.
  Tensor qkv_absmax, o_absmax, wi_absmax, wo_absmax;
};

struct T5EncoderWeights {
  Tensor embedding;  // [V, D] (`shared.weight`)
  // Host float32 [num_buckets, H]: read on the host to build the per-length bias, never by a device op.
  Tensor relative_attention_bias;
  std::vector<T5LayerWeights> layers;
  Tensor final_norm;  // [D]
  // The four linears of every layer are stored NF4 and dequantised one at a time before their product (about 2.9 GB
  // for T5-XXL instead of 9.5 in bf16); the embedding and the norms stay in the compute dtype.
  bool nf4 = false;

  // Every device tensor (all but the host position table), in a fixed order: what leaves the device on offload.
  std::vector<Tensor*> device_tensors();
};

// Reads, fuses and uploads every weight; with `nf4`, the linears are quantised to NF4 on the host first, so their
// full-precision copies never reach the device. Throws Error naming the file and key on a missing tensor or a shape
// the config does not imply.
T5EncoderWeights load_t5_encoder_weights(const SafetensorsCollection& file, const T5EncoderConfig& config,
                                         Backend& backend, bool nf4 = false);

class T5Encoder {
 public:
  T5Encoder(const T5EncoderConfig& config, T5EncoderWeights weights, Backend& backend);
  // A diffusers `text_encoder_2/` folder: config.json beside model.safetensors (or model.safetensors.index.json,
  // as FLUX.1's sharded T5-XXL ships); `nf4` as for load_t5_encoder_weights.
  static T5Encoder from_folder(const std::string& dir, Backend& backend, bool nf4 = false);

  // Allocates the activation buffers for a batch and sequence length, and builds and uploads the position bias
  // when the length changes; kept while the shape stays the same.
  void prepare(int64_t batch, int64_t seq_len);
  // ids: int32 [B, S] on the backend's device. Writes out rows [B, S, d_model] (after the final RMSNorm) in the
  // compute dtype. Issues device work only.
  void encode(const Tensor& ids, const Tensor& out);

  const T5EncoderConfig& config() const { return config_; }
  Backend& backend() { return backend_; }

  // Under a memory budget the encoder is on the device only while it encodes: offload() frees its device weights
  // (kept in host memory, pinned on the GPU) and buffers, onload() brings the weights back in one transfer. Results
  // are bit-identical either way. Both idempotent; encode() refuses to run while offloaded.
  void offload();
  void onload();
  bool resident() const { return offload_.resident(); }
  // Device bytes of the weights, resident or not.
  uint64_t weight_bytes();
  // Frees the activation buffers and the device position bias; the next encode makes them again.
  void release_buffers();

  // Stores the linears NF4 from now on (T5EncoderWeights::nf4): each is brought to the host, quantised and uploaded
  // again, one at a time (for weights made on the device). Needs the weights resident.
  void quantize_nf4();
  bool nf4() const { return weights_.nf4; }

 private:
  void layer(const T5LayerWeights& w);
  // y = x W^T for one of a layer's linears ([rows, cols]); an NF4 one is dequantised into the scratch first.
  void linear(const Tensor& x, const Tensor& w, const Tensor& absmax, int64_t rows, int64_t cols, const Tensor& y);

  T5EncoderConfig config_;
  T5EncoderWeights weights_;
  Backend& backend_;
  WeightOffload offload_;

  int64_t B_ = 0, S_ = 0;
  Tensor position_bias_;  // float32 [H, S_, S_] on the device; depends on S only, so kept across batch sizes
  int64_t bias_len_ = 0;
  struct Buffers {
    Tensor hidden;   // [B, S, D] residual stream
    Tensor normed;   // [B, S, D] RMSNorm output, the input of each block's branch
    Tensor qkv;      // [B, S, 3 * inner]
    Tensor q, k, v;  // [B, H, S, d_kv]
    Tensor attn;     // [B, S, inner] attention output, heads concatenated
    Tensor branch;   // [B, S, D] output projection of a branch, before its residual add
    Tensor ff;       // [B, S, 2 * d_ff] gate | linear halves of the feed-forward
    Tensor nf4_scratch;  // NF4: the dequantised weight of the linear about to run, as large as the largest
  } buf_;
};

}  // namespace fluxswap
