#include "model/flux_transformer.h"

#include <algorithm>
#include <cmath>
#include <initializer_list>

#include "core/error.h"

namespace fluxswap {

namespace {
// Column chunk i of width d of a [B, k*d] modulation tensor.
Tensor chunk(const Tensor& mod, int64_t i, int64_t d) { return mod.narrow(1, i * d, d); }
Tensor rows(const Tensor& t, int64_t start, int64_t n) { return t.narrow(1, start, n); }
Tensor cols(const Tensor& t, int64_t start, int64_t n) { return t.narrow(2, start, n); }
Linear out_rows(const Linear& l, int64_t start, int64_t n) {
  return {l.weight.defined() ? l.weight.narrow(0, start, n) : Tensor(), l.bias.narrow(0, start, n), l.lora_down,
          l.lora_up.defined() ? l.lora_up.narrow(0, start, n) : Tensor(),
          l.lora_weight.defined() ? l.lora_weight.narrow(0, start, n) : Tensor(),
          l.weight_fp8.defined() ? l.weight_fp8.narrow(0, start, n) : Tensor(),
          l.weight_scale.defined() ? l.weight_scale.narrow(0, start, n) : Tensor()};
}
}  // namespace

Tensor flux_rope_table(const FluxConfig& c, const Tensor& txt_ids, const Tensor& img_ids) {
  Tensor t = txt_ids.to_f32(), im = img_ids.to_f32();
  if (t.ndim() != 2 || t.size(1) != 3 || im.ndim() != 2 || im.size(1) != 3)
    throw Error("rope: txt_ids and img_ids must be [N, 3], got " + shape_str(t.shape()) + " and " +
                shape_str(im.shape()));
  const int64_t nt = t.size(0), ni = im.size(0), half = c.attention_head_dim / 2;
  Tensor out = Tensor::empty(DType::F32, {nt + ni, half, 2});
  float* o = out.ptr<float>();
  for (int64_t s = 0; s < nt + ni; ++s) {
    const float* id = s < nt ? t.ptr<float>() + s * 3 : im.ptr<float>() + (s - nt) * 3;
    int64_t j = 0;
    for (int axis = 0; axis < 3; ++axis) {
      const int64_t dim = c.axes_dims_rope[axis];
      for (int64_t i = 0; i < dim / 2; ++i, ++j) {
        const double omega = 1.0 / std::pow(double(c.rope_theta), double(2 * i) / double(dim));
        const double angle = double(id[axis]) * omega;
        o[(s * half + j) * 2] = float(std::cos(angle));
        o[(s * half + j) * 2 + 1] = float(std::sin(angle));
      }
    }
  }
  return out;
}

FluxTransformer::FluxTransformer(const FluxConfig& config, FluxWeights weights, Backend& backend)
    : config_(config), weights_(std::move(weights)), backend_(backend) {
  config_.validate("transformer config");
  if (weights_.fp8_only) set_fp8(true);  // the checkpoint's FP8 block linears, and the modulation quantised here
}

void FluxTransformer::set_lora_slot_rank(int64_t rank) { lora_rank_ = rank; }


void FluxTransformer::offload() {
  if (!resident()) return;
  for (Linear* l : block_token_linears(weights_))
    if (l->lora_weight.defined())
      throw Error("the transformer cannot leave the device while runtime LoRA slots live inside its weights (bf16 "
                  "runtime mode): use FP8 (--fp8), merged LoRAs, or a budget that keeps it resident");
  // by_name holds its own references to the same memory; the struct fields are what the forward pass reads.
  weights_.by_name.clear();
  offload_.offload(backend_, weights_.device_tensors(), "transformer");
  weights_.offloaded = true;
}

void FluxTransformer::onload() {
  offload_.onload(backend_, weights_.device_tensors(), "transformer");
  weights_.offloaded = false;
}

void FluxTransformer::set_fp8(bool on) {
  if (!resident()) throw Error("set_fp8: the transformer's weights are off the device (memory plan)");
  if (weights_.fp8_only && !on)
    throw Error("this transformer was loaded from an FP8 checkpoint and has no bf16 block weights: FP8 mode "
                "cannot be turned off (load a bf16 checkpoint for bf16 inference)");
  std::vector<Linear*> targets = modulation_linears(weights_);
  if (!weights_.fp8_only)
    for (Linear* l : block_token_linears(weights_)) targets.push_back(l);
  for (Linear* l : targets) {
    if (!on) {
      l->weight_fp8 = Tensor();
      l->weight_scale = Tensor();
      continue;
    }
    if (!l->weight.defined()) continue;  // held in FP8 only already
    quantize_linear_fp8(*l, backend_);
    // An FP8 checkpoint's LoRAs run as slots, never merged: no bf16 copy is needed as a requantisation source, and
    // dropping it is what keeps such a model near 12 GB.
    if (weights_.fp8_only) {
      weights_.forget(l->weight);
      l->weight = Tensor();
    }
  }
  fp8_ = on;
}

namespace {
// 448 / (sqrt(D) * max |w|) over a block's q and k norm weights: after RMSNorm |x_i| <= sqrt(D), the weight scales
// it, and RoPE's rotation keeps each pair's norm, so no q or k element of the block can exceed 448 in e4m3.
float qk_scale_for(Backend& backend, std::initializer_list<const Tensor*> norms, int64_t head_dim) {
  float m = 0.0f;
  for (const Tensor* t : norms) {
    const Tensor w = backend.to_host_f32(*t);
    for (int64_t i = 0; i < w.numel(); ++i) m = std::max(m, std::fabs(w.ptr<float>()[i]));
  }
  if (!(m > 0.0f) || !std::isfinite(m)) throw Error("FP8 attention: a q/k norm weight is all zero or not finite");
  return 448.0f / (std::sqrt(float(head_dim)) * m * 1.001f);  // the margin covers bf16/rsqrt rounding
}
}  // namespace

void FluxTransformer::set_fp8_attention(bool on) {
  if (!resident()) throw Error("set_fp8_attention: the transformer's weights are off the device (memory plan)");
  qk_scale_double_.clear();
  qk_scale_single_.clear();
  if (on) {
    const int64_t hd = config_.attention_head_dim;
    for (const auto& b : weights_.double_blocks)
      qk_scale_double_.push_back(
          qk_scale_for(backend_, {&b.txt_q_norm, &b.txt_k_norm, &b.img_q_norm, &b.img_k_norm}, hd));
    for (const auto& b : weights_.single_blocks) qk_scale_single_.push_back(qk_scale_for(backend_, {&b.q_norm, &b.k_norm}, hd));
  }
  fp8_attention_ = on;
}

void FluxTransformer::set_precision(bool fp8_linears, bool fp8_attention) {
  if (fp8_linears) backend_.set_fp8_fast_accumulation(true);
  if (fp8_linears != fp8_) set_fp8(fp8_linears);
  if (fp8_attention != fp8_attention_) set_fp8_attention(fp8_attention);
}

void FluxTransformer::qk_rope(const Tensor& qkv, const Tensor& q_norm, const Tensor& k_norm, const Tensor& rope,
                              int64_t seq_offset, float qk_scale) {
  if (fp8_attention_)
    backend_.qk_norm_rope_fp8(qkv, q_norm, k_norm, rope, seq_offset, qk_scale, buf_.q8, buf_.k8, buf_.v, buf_.v_amax);
  else
    backend_.qk_norm_rope(qkv, q_norm, k_norm, rope, seq_offset, buf_.q, buf_.k, buf_.v);
}

void FluxTransformer::attend(const Tensor& out, float qk_scale) {
  if (fp8_attention_)
    backend_.attention_fp8(buf_.q8, buf_.k8, buf_.v, qk_scale, buf_.v_amax, out);
  else
    backend_.attention(buf_.q, buf_.k, buf_.v, out);
}

void FluxTransformer::linear(const Tensor& x, const Linear& l, const Tensor& y, Activation act) {
  const Tensor scratch = !l.lora_down.defined() ? Tensor()
                         : x.ndim() == 2        ? buf_.lora_scratch.select(1, 0)
                                                : buf_.lora_scratch.narrow(1, 0, x.size(1));
  if (l.weight_fp8.defined()) {
    // The LoRA branch stays bf16 and is added after the FP8 product (the activation sees the sum). Computing it into
    // y first and accumulating the FP8 product onto it measured the same (+17.7% vs +17.8% at rank 64).
    backend_.linear_fp8(x, l.weight_fp8, l.weight_scale, l.bias, y, l.lora_down.defined() ? Activation::None : act);
    if (l.lora_down.defined()) backend_.add_lora_branch(x, l.lora_down, l.lora_up, scratch, y, act);
    return;
  }
  if (!l.lora_down.defined()) {
    backend_.linear(x, l.weight, l.bias, y, act);
    return;
  }
  // (The scratch rows have x's layout: [B, N, R] for token rows, [B, R] for per-sample vectors.)
  backend_.lora_linear(x, l.weight, l.bias, l.lora_down, l.lora_up, scratch, y, act);
}

void FluxTransformer::linear_roomy(const Tensor& x_room, int64_t in, const Linear& l, const Tensor& y, Activation act,
                                   bool down_done) {
  const Tensor x = x_room.narrow(-1, 0, in);
  if (!l.lora_weight.defined() || l.weight_fp8.defined()) {
    linear(x, l, y, act);
    return;
  }
  const int64_t R = l.lora_down.size(0);
  if (x_room.size(-1) < in + R)
    throw Error("internal: a LoRA slot of rank " + std::to_string(R) + " needs room the buffers were not given");
  if (!down_done) backend_.linear(x, l.lora_down, Tensor(), x_room.narrow(-1, in, R), Activation::None);
  backend_.linear(x_room.narrow(-1, 0, in + R), l.lora_weight, l.bias, y, act);
}

void FluxTransformer::prepare(int64_t batch, int64_t img_tokens, int64_t txt_tokens) {
  if (batch == B_ && img_tokens == Ni_ && txt_tokens == Nt_ && lora_rank_ == prepared_lora_rank_ &&
      fp8_attention_ == prepared_fp8_attention_)
    return;
  const int64_t D = config_.inner_dim(), M = config_.mlp_dim(), S = img_tokens + txt_tokens;
  const int64_t H = config_.num_attention_heads, hd = config_.attention_head_dim;
  const DType dt = backend_.compute_dtype();
  auto e = [&](Shape s) { return backend_.empty(dt, s); };
  buf_ = Buffers{};
  buf_.t_freq = e({batch, 256});
  buf_.hidden = e({batch, D});
  buf_.emb_part = e({batch, D});
  buf_.temb = e({batch, D});
  buf_.temb_silu = e({batch, D});
  buf_.mod_img = e({batch, 6 * D});
  buf_.mod_txt = e({batch, 6 * D});
  buf_.stream = e({batch, S, D});
  const int64_t R = lora_rank_;
  buf_.normed_room = e({batch, S, D + R});
  buf_.normed = cols(buf_.normed_room, 0, D);
  buf_.branch = e({batch, S, D});
  buf_.proj_in_room = e({batch, S, 3 * D + M + R});
  buf_.proj_in = cols(buf_.proj_in_room, 0, 3 * D + M);
  if (fp8_attention_) {
    buf_.q8 = backend_.empty(DType::F8_E4M3, {batch, H, S, hd});
    buf_.k8 = backend_.empty(DType::F8_E4M3, {batch, H, S, hd});
    buf_.v_amax = backend_.empty(DType::F32, {1});
    backend_.zero(buf_.v_amax);  // qk_norm_rope_fp8 raises it, attention_fp8 leaves it at zero again
  } else {
    buf_.q = e({batch, H, S, hd});
    buf_.k = e({batch, H, S, hd});
  }
  buf_.v = e({batch, H, S, hd});
  buf_.attn_mlp_room = e({batch, S, D + M + R});
  buf_.attn_mlp = cols(buf_.attn_mlp_room, 0, D + M);
  if (lora_rank_ > 0) buf_.lora_scratch = e({batch, S, lora_rank_});
  prepared_lora_rank_ = lora_rank_;
  prepared_fp8_attention_ = fp8_attention_;
  B_ = batch;
  Ni_ = img_tokens;
  Nt_ = txt_tokens;
}

void FluxTransformer::embed_conditioning(const FluxInputs& in) {
  Backend& be = backend_;
  const FluxWeights& w = weights_;
  be.timestep_embedding(in.timestep, 1000.0f, buf_.t_freq);
  linear(buf_.t_freq, w.time_in, buf_.hidden, Activation::Silu);
  linear(buf_.hidden, w.time_out, buf_.temb);
  if (config_.guidance_embeds) {
    if (!in.guidance.data()) throw Error("this model has a guidance embedder (FLUX.1-dev style): guidance is required");
    be.timestep_embedding(in.guidance, 1000.0f, buf_.t_freq);
    linear(buf_.t_freq, w.guidance_in, buf_.hidden, Activation::Silu);
    linear(buf_.hidden, w.guidance_out, buf_.emb_part);
    be.add(buf_.temb, buf_.emb_part);
  }
  linear(in.pooled_projections, w.vector_in, buf_.hidden, Activation::Silu);
  linear(buf_.hidden, w.vector_out, buf_.emb_part);
  be.add(buf_.temb, buf_.emb_part);
  be.silu(buf_.temb, buf_.temb_silu);
}

void FluxTransformer::forward(const FluxInputs& in, const Tensor& out) {
  const int64_t B = in.hidden_states.size(0), Ni = in.hidden_states.size(1);
  const int64_t Nt = in.encoder_hidden_states.size(1), D = config_.inner_dim();
  if (in.hidden_states.size(2) != config_.in_channels)
    throw Error("hidden_states has " + std::to_string(in.hidden_states.size(2)) + " channels, expected in_channels " +
                std::to_string(config_.in_channels));
  if (in.encoder_hidden_states.size(2) != config_.joint_attention_dim)
    throw Error("encoder_hidden_states has width " + std::to_string(in.encoder_hidden_states.size(2)) +
                ", expected joint_attention_dim " + std::to_string(config_.joint_attention_dim));
  if (in.pooled_projections.size(1) != config_.pooled_projection_dim)
    throw Error("pooled_projections has width " + std::to_string(in.pooled_projections.size(1)) +
                ", expected pooled_projection_dim " + std::to_string(config_.pooled_projection_dim));
  if (in.rope.size(0) != Nt + Ni) throw Error("rope table covers " + std::to_string(in.rope.size(0)) +
                                              " positions, expected text + image tokens = " + std::to_string(Nt + Ni));
  prepare(B, Ni, Nt);
  Backend& be = backend_;

  embed_conditioning(in);
  linear(in.hidden_states, weights_.img_in, rows(buf_.stream, Nt, Ni));
  linear(in.encoder_hidden_states, weights_.txt_in, rows(buf_.stream, 0, Nt));

  for (size_t i = 0; i < weights_.double_blocks.size(); ++i)
    double_block(weights_.double_blocks[i], in.rope, fp8_attention_ ? qk_scale_double_[i] : 0.0f);
  for (size_t i = 0; i < weights_.single_blocks.size(); ++i)
    single_block(weights_.single_blocks[i], in.rope, fp8_attention_ ? qk_scale_single_[i] : 0.0f);

  // Final AdaLN on the image tokens, then the projection back to latent channels.
  Tensor mod = buf_.mod_img.narrow(1, 0, 2 * D);
  linear(buf_.temb_silu, weights_.final_mod, mod);
  Tensor img = rows(buf_.stream, Nt, Ni), normed = rows(buf_.normed, Nt, Ni);
  be.layer_norm_modulate(img, chunk(mod, 0, D), chunk(mod, 1, D), normed);
  linear(normed, weights_.final_linear, out);
}

void FluxTransformer::double_block(const DoubleBlockWeights& w, const Tensor& rope, float qk_scale) {
  Backend& be = backend_;
  const int64_t D = config_.inner_dim(), M = config_.mlp_dim(), Nt = Nt_, Ni = Ni_;
  linear(buf_.temb_silu, w.img_mod, buf_.mod_img);
  linear(buf_.temb_silu, w.txt_mod, buf_.mod_txt);

  // Each stream's views: residual, normed input, projection output, qkv, MLP activations.
  // The *_room views run on into the buffers' spare columns (in double blocks the attention output's neighbours,
  // attn_mlp's MLP columns, are unused and serve as its room).
  struct Stream {
    Tensor x, normed, normed_room, branch, qkv, mlp, mlp_room, attn, attn_room;
    const Tensor& mod;
  };
  auto stream_views = [&](int64_t start, int64_t n, const Tensor& mod) {
    const Tensor proj_in = rows(buf_.proj_in_room, start, n), attn_mlp = rows(buf_.attn_mlp_room, start, n);
    const Tensor normed = rows(buf_.normed_room, start, n);
    return Stream{rows(buf_.stream, start, n), cols(normed, 0, D), normed, rows(buf_.branch, start, n),
                  cols(proj_in, 0, 3 * D), cols(proj_in, 3 * D, M), cols(proj_in, 3 * D, proj_in.size(2) - 3 * D),
                  cols(attn_mlp, 0, D), attn_mlp, mod};
  };
  Stream txt = stream_views(0, Nt, buf_.mod_txt), img = stream_views(Nt, Ni, buf_.mod_img);

  // Joint attention over text and image tokens; each stream has its own projections and norms.
  be.layer_norm_modulate(txt.x, chunk(txt.mod, 0, D), chunk(txt.mod, 1, D), txt.normed);
  be.layer_norm_modulate(img.x, chunk(img.mod, 0, D), chunk(img.mod, 1, D), img.normed);
  linear_roomy(txt.normed_room, D, w.txt_qkv, txt.qkv);
  linear_roomy(img.normed_room, D, w.img_qkv, img.qkv);
  qk_rope(txt.qkv, w.txt_q_norm, w.txt_k_norm, rope, 0, qk_scale);
  qk_rope(img.qkv, w.img_q_norm, w.img_k_norm, rope, Nt, qk_scale);
  attend(cols(buf_.attn_mlp, 0, D), qk_scale);
  linear_roomy(txt.attn_room, D, w.txt_proj, txt.branch);
  be.gated_residual(txt.x, chunk(txt.mod, 2, D), txt.branch);
  linear_roomy(img.attn_room, D, w.img_proj, img.branch);
  be.gated_residual(img.x, chunk(img.mod, 2, D), img.branch);

  // Feed-forward, per stream.
  for (auto [s, mlp_in, mlp_out] : {std::tuple{&txt, &w.txt_mlp_in, &w.txt_mlp_out},
                                    std::tuple{&img, &w.img_mlp_in, &w.img_mlp_out}}) {
    be.layer_norm_modulate(s->x, chunk(s->mod, 3, D), chunk(s->mod, 4, D), s->normed);
    linear_roomy(s->normed_room, D, *mlp_in, s->mlp, Activation::GeluTanh);
    linear_roomy(s->mlp_room, M, *mlp_out, s->branch);
    be.gated_residual(s->x, chunk(s->mod, 5, D), s->branch);
  }
}

void FluxTransformer::single_block(const SingleBlockWeights& w, const Tensor& rope, float qk_scale) {
  Backend& be = backend_;
  const int64_t D = config_.inner_dim(), M = config_.mlp_dim();
  Tensor mod = buf_.mod_img.narrow(1, 0, 3 * D);
  linear(buf_.temb_silu, w.modulation, mod);
  be.layer_norm_modulate(buf_.stream, chunk(mod, 0, D), chunk(mod, 1, D), buf_.normed);

  // linear1 computes q, k, v and the MLP input in one matrix; the two halves get different epilogues.
  Tensor qkv = cols(buf_.proj_in, 0, 3 * D);
  Linear qkv_proj = out_rows(w.linear1, 0, 3 * D), mlp_in = out_rows(w.linear1, 3 * D, M);
  linear_roomy(buf_.normed_room, D, qkv_proj, qkv);
  linear_roomy(buf_.normed_room, D, mlp_in, cols(buf_.attn_mlp, D, M), Activation::GeluTanh, true);
  qk_rope(qkv, w.q_norm, w.k_norm, rope, 0, qk_scale);
  attend(cols(buf_.attn_mlp, 0, D), qk_scale);

  // linear2 reads [attention | MLP] side by side: the reference's concatenation is already in place.
  linear_roomy(buf_.attn_mlp_room, D + M, w.linear2, buf_.branch);
  be.gated_residual(buf_.stream, chunk(mod, 2, D), buf_.branch);
}

}  // namespace fluxswap
