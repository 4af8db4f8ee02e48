#pragma once
// The FLUX.1 transformer (FluxTransformer2DModel / BFL's Flux), written once against the Backend ops.
//
// The residual stream is one [B, Nt + Ni, D] buffer, text tokens first: the double-stream blocks work on its
// text and image halves as views, and the single-stream blocks on the whole of it, so the concatenation the
// reference does between the two kinds of block costs nothing here.
#include <cstdint>
#include <unordered_map>
#include <vector>

#include "backend/backend.h"
#include "model/flux_config.h"
#include "model/block_streaming.h"
#include "model/flux_weights.h"
#include "model/weight_offload.h"

namespace fluxswap {

struct FluxInputs {
  Tensor hidden_states;          // [B, Ni, in_channels] packed latents, compute dtype
  Tensor encoder_hidden_states;  // [B, Nt, joint_attention_dim], compute dtype
  Tensor pooled_projections;     // [B, pooled_projection_dim], compute dtype
  Tensor timestep;               // [B] float32 in 0..1 (multiplied by 1000 inside, as the reference does)
  Tensor guidance;               // [B] float32, multiplied by 1000 inside; undefined for schnell models
  Tensor rope;                   // [Nt + Ni, head_dim / 2, 2] float32 (cos, sin), from flux_rope_table()
  // Optional [B, modulation_width()], compute dtype: this step's row of FluxTransformer::modulation_table(). Given,
  // the step skips the conditioning embedders and every modulation linear (timestep, guidance and
  // pooled_projections are then not read).
  Tensor modulations;
};

// RoPE angles for the text ids followed by the image ids ([N, 3] float: (index, row, col)); host float32
// [Nt + Ni, head_dim / 2, 2], computed in float64 as the reference does.
Tensor flux_rope_table(const FluxConfig& config, const Tensor& txt_ids, const Tensor& img_ids);

class FluxTransformer {
 public:
  FluxTransformer(const FluxConfig& config, FluxWeights weights, Backend& backend);

  // Allocates the activation buffers for a batch and token counts; kept while the shape stays the same.
  void prepare(int64_t batch, int64_t img_tokens, int64_t txt_tokens);
  // One forward pass; `out` is [B, Ni, in_channels] in the backend's compute dtype. Issues device work only.
  void forward(const FluxInputs& in, const Tensor& out);

  // Every step's AdaLN modulation vectors for a whole schedule at once, [T, B, modulation_width()]: the modulation
  // weights (6.5 GB in bf16 at FLUX.1-dev size, ~3 ms a step on an H100) are read once for all T steps instead of
  // once a step; a step then takes its row as FluxInputs::modulations. timesteps: [T, B] F32 on the device (t / 1000,
  // as FluxInputs::timestep); guidance [B] F32 (undefined for schnell); pooled [B, pooled_projection_dim]. Uses the
  // adapters active now (a merged or runtime LoRA on a modulation linear is in the table): compute it after setting
  // them. Needs every modulation weight on the device (can_tabulate_modulations()).
  Tensor modulation_table(const Tensor& timesteps, const Tensor& guidance, const Tensor& pooled);
  bool can_tabulate_modulations() const { return resident() && !streamer_.active(); }
  int64_t modulation_width() const;

  // Rank of the runtime LoRA slots (0: none); the scratch buffer for x @ down^T is sized by it.
  void set_lora_slot_rank(int64_t rank);
  // Step gates (Backend::wait_gate): forward waits at gate flux_step_rank(...) before the weights of that rank are
  // first read (0 before the embedders and modulations, one per block, one before the final projection), so a
  // runtime LoRA swap can fill the slots block by block under the step. Takes effect in the next recording; a no-op
  // on backends without gates.
  void set_step_gates(bool on);

  // FP8 mode: the block linears (block_token_linears()) run in e4m3 with per-row scales, activations quantised per token;
  // their bf16 weights stay as the source of requantisation. Off again frees the FP8 copies. A model loaded from an
  // FP8 checkpoint (FluxWeights::fp8_only) starts in FP8 mode and cannot leave it: set_fp8(false) throws Error.
  void set_fp8(bool on);
  bool fp8() const { return fp8_; }

  // FP8 attention: q and k written in e4m3 by qk_norm_rope_fp8 at a per-layer scale bounded by the layer's q/k norm
  // weights, v quantised with its measured max, cuDNN's FP8 flash attention. Independent of set_fp8.
  void set_fp8_attention(bool on);
  bool fp8_attention() const { return fp8_attention_; }
  // What `generate --fp8 --fp8-attention`, `serve` and the Python module ask for: FP8 linears with Hopper's fast
  // accumulation (the same 28-step quality as promoted accumulation, docs/PERF.md) and/or FP8 attention.
  void set_precision(bool fp8_linears, bool fp8_attention);

  // Under a memory plan that uploads the transformer per image: its weights go to pinned host memory (the first time
  // copied, later only freed: they do not change while off the device) and come back as one allocation. The step
  // buffers and runtime LoRA slots stay. Refused while a runtime LoRA slot lives inside a weight ([W | up], bf16
  // runtime mode): that weight is a view of the slot. set_fp8 / set_fp8_attention need the weights resident.
  void offload();
  void onload();
  bool resident() const { return offload_.resident(); }

  // Under a memory plan that streams blocks (memory_plan.h): the blocks with block_resident[b] false (execution
  // order: double blocks, then single blocks) move to pinned host memory and are uploaded into prefetch_depth + 1
  // device buffers on the backend's copy queue, prefetch_depth blocks ahead of the one computing; the others stay
  // (or come back). Empty, or all true: no streaming. A bf16 runtime LoRA slot inside a streamed [W | up] moves to a
  // separate up matrix (slots always stay on the device). Merged LoRAs and set_fp8 are refused while streaming.
  void stream_blocks(const std::vector<bool>& block_resident, int prefetch_depth);
  const BlockStreamer& streaming() const { return streamer_; }
  // Whether the module (internal name) belongs to a streamed block: its weights live in pinned host memory and pass
  // through a device buffer shared with other blocks every step, so nothing may write them on the device (no merged
  // LoRA, no [W | up] slot).
  bool streamed(const std::string& module) const;
  // Device bytes of each block (execution order; a streamed one: what it uploads per step) and of the rest
  // (embedders, final layer, every runtime LoRA slot): what a memory plan moves or keeps.
  std::vector<uint64_t> block_weight_bytes();
  uint64_t shared_weight_bytes();
  // The weights changed on the device (merged LoRA, requantisation): host copies kept for offloading are stale.
  void weights_changed();

  const FluxConfig& config() const { return config_; }
  FluxWeights& weights() { return weights_; }
  Backend& backend() { return backend_; }

 private:
  // The conditioning vector's stages, [N, D] (N = B for a step, T * B for a table).
  struct Conditioning {
    Tensor t_freq;     // [N, 256] sinusoidal timestep / guidance features
    Tensor hidden;     // [N, D] embedder hidden layer
    Tensor emb_part;   // [N, D]
    Tensor temb;       // [N, D] conditioning vector
    Tensor temb_silu;  // [N, D] SiLU(temb), the input of every modulation
    Tensor lora_scratch;  // [N, R] x @ down^T of a runtime LoRA slot on a modulation or embedder; undefined: none
  };
  Conditioning conditioning_buffers(int64_t n) const;
  void embed_conditioning(const Tensor& timestep, const Tensor& guidance, const Tensor& pooled, const Conditioning& c);
  // Views of a [N, modulation_width()] tensor: per double block img then txt (6D each), per single block 3D, the
  // final layer 2D.
  struct Modulations {
    std::vector<Tensor> img, txt, single;
    Tensor final;
  };
  Modulations split_modulations(const Tensor& all) const;
  // y = act(x W^T + b), plus the module's runtime LoRA branch when it has a slot (its x down^T in `scratch`, by
  // default the step's scratch rows).
  void linear(const Tensor& x, const Linear& l, const Tensor& y, Activation act = Activation::None,
              const Tensor& scratch = Tensor());
  // The same for x = the first `in` columns of `x_room`, whose next columns are free: a slot inside [W | up] puts
  // x down^T there and runs one GEMM over both ([x | x down^T] [W | up]^T). `down_done`: already there (linear1's
  // two halves share it).
  void linear_roomy(const Tensor& x_room, int64_t in, const Linear& l, const Tensor& y,
                    Activation act = Activation::None, bool down_done = false);
  // A gated residual add x += gate * branch not applied yet: the LayerNorm that reads x next applies it in the same
  // pass over x (undefined gate: none pending).
  struct Residual {
    Tensor gate, branch;
  };
  // LayerNorm + modulate of x (after `pending`), then the linear `l` of it into y. An FP8 linear without a runtime
  // slot gets its input quantised by the LayerNorm kernel itself (rows of q8 / q8_scale: the e4m3 codes and per-token
  // scales) and skips its own quantiser; otherwise the bf16 rows go to normed_room as for linear_roomy.
  void norm_linear(const Tensor& x, const Residual& pending, const Tensor& shift, const Tensor& scale,
                   const Tensor& normed_room, const Tensor& q8, const Tensor& q8_scale, const Linear& l, const Tensor& y,
                   Activation act);
  // The LayerNorm alone, into bf16 normed rows or e4m3 q8 rows (q8 defined), after `pending`.
  void norm(const Tensor& x, const Residual& pending, const Tensor& shift, const Tensor& scale, const Tensor& normed,
            const Tensor& q8, const Tensor& q8_scale);
  // The v columns of every block's qkv output, [B, S, D] rows in buf_.proj_in: where attention reads v.
  Tensor v_rows() const { return buf_.proj_in.narrow(2, 2 * config_.inner_dim(), config_.inner_dim()); }
  void apply(const Tensor& x, const Residual& pending);
  // A block's output projection l of the first `in` columns of in_room, gated into the residual x: added inside the
  // GEMM where l is FP8 without a runtime slot and the backend does that (Backend::fp8_residual_in_gemm; returns
  // nothing pending), else written to branch and returned as the residual still to add.
  Residual project(const Tensor& in_room, int64_t in, const Linear& l, const Tensor& gate, const Tensor& x,
                   const Tensor& branch);
  // The step's gated factors of every projection project() adds in its GEMM, in one backend launch after the
  // modulations (ready_factors_); ready_factors(l) gives l's, or none (the op then makes its own).
  void gated_factors_up_front();
  bool fp8_projection_in_gemm(const Linear& l) const;
  const Backend::GatedFactors& ready_factors(const Linear& l) const;
  // The same for an FP8 projection whose input is quantised already (q8, q8_scale).
  Residual project_quantized(const Tensor& q8, const Tensor& q8_scale, const Linear& l, const Tensor& gate,
                             const Tensor& x, const Tensor& branch);
  // Every block's AdaLN modulation vectors of SiLU(temb) c.temb_silu into m: up front (a step's FP8 ones in one
  // batched launch), or block by block as streamed blocks arrive.
  void modulations_up_front(const Conditioning& c, const Modulations& m);
  void modulation_of(size_t block, const Conditioning& c, const Modulations& m);
  static bool quantized_input(const Linear& l) { return l.weight_fp8.defined() && !l.lora_down.defined(); }
  // qk_scale: the block's FP8 attention scale (unused in bf16 attention).
  // Each applies the residual the previous block left pending (per stream, or over all rows) in its first
  // LayerNorm and leaves its own last one there for the next.
  void double_block(size_t i, const Tensor& rope, float qk_scale, Residual& txt_pending, Residual& img_pending);
  void single_block(size_t i, const Tensor& rope, float qk_scale, Residual& pending);

  FluxConfig config_;
  FluxWeights weights_;
  Backend& backend_;

  int64_t B_ = 0, Ni_ = 0, Nt_ = 0, lora_rank_ = 0, prepared_lora_rank_ = 0;
  bool fp8_ = false;
  bool step_gates_ = false;
  void gate(int64_t rank) {
    if (step_gates_) backend_.wait_gate(int(rank));
  }
  bool fp8_attention_ = false, prepared_fp8_attention_ = false, prepared_fp8_ = false;
  WeightOffload offload_;
  BlockStreamer streamer_;
  std::vector<float> qk_scale_double_, qk_scale_single_;  // per block, for FP8 attention
  // Per block, max |w| over its q/k norm weights (FP8 attention's scales), read while the block was on the device.
  std::vector<float> qk_norm_max_;
  const std::vector<float>& qk_norm_maxima();
  // qk_norm_rope into the attention inputs, then attention over them into `out`: bf16, or FP8 at qk_scale.
  void qk_rope(const Tensor& qkv, const Tensor& q_norm, const Tensor& k_norm, const Tensor& rope, int64_t seq_offset,
               float qk_scale);
  void attend(const Tensor& out, float qk_scale);
  struct Buffers {
    Conditioning cond;   // N = B
    Tensor mod_all;      // [B, modulation_width()]: the step's modulations when FluxInputs has none
    Tensor stream;       // [B, S, D] residual stream, text first
    // The buffers that feed block linears have R = lora_rank_ spare columns for linear_roomy (none without slots):
    // *_room is the whole buffer, the plain name its first columns.
    Tensor normed, normed_room;      // [B, S, D] (+ R)
    Tensor branch;       // [B, S, D] output of a projection before its gated residual add
    Tensor proj_in, proj_in_room;    // [B, S, 3D + M] (+ R) qkv (and, in single blocks, the MLP input)
    Tensor q, k;         // [B, H, S, head_dim] (bf16 attention; v is read from proj_in)
    Tensor q8, k8, v_amax;  // FP8 attention: e4m3 q, k [B, H, S, head_dim] and max |v| (F32 [1])
    // [B, S, D + M] (+ R) attention output, then the MLP activations (linear2's input)
    Tensor attn_mlp, attn_mlp_room;
    Tensor lora_scratch; // [B, S, R] x @ down^T of runtime LoRA slots; undefined without slots
    // FP8 mode: LayerNorm outputs quantised for the linear they feed (norm_linear), e4m3 [B * S, D] and per-row
    // scales [B * S]: a double block's text stream takes the first B * Nt rows as [B, Nt, D], its image stream the
    // rest; a single block all of them as [B, S, D].
    Tensor normed_q8, normed_q8_scale;
    // FP8 attention with FP8 linears: its e4m3 output [B, S, D] with every row's scale [B * S] (attention_fp8_rows),
    // and a single block's linear2 input quantised from it and the MLP rows, [B * S, D + M] with row scales.
    Tensor attn_q8, attn_q8_scale, attn_mlp_q8, attn_mlp_q8_scale;
    // FP8 projections added onto the residual in their GEMMs: their gated factors for the step, [P * B * D] F32 and
    // compute dtype, P = 4 per double block + 1 per single block (gated_factors_up_front).
    Tensor gated_scale, gated_bias;
  } buf_;
  // Each such projection's factors this step (views of buf_.gated_*), by its weights.
  std::unordered_map<const Linear*, Backend::GatedFactors> ready_factors_;
  Modulations mod_;  // what this step's blocks read: views of buf_.mod_all or of FluxInputs::modulations
};

}  // namespace fluxswap
