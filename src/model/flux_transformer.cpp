#include "model/flux_transformer.h"

#include <cmath>

#include "core/error.h"

namespace fluxswap {

namespace {
// Column chunk i of width d of a [B, k*d] modulation tensor.
Tensor chunk(const Tensor& mod, int64_t i, int64_t d) { return mod.narrow(1, i * d, d); }
Tensor rows(const Tensor& t, int64_t start, int64_t n) { return t.narrow(1, start, n); }
Tensor cols(const Tensor& t, int64_t start, int64_t n) { return t.narrow(2, start, n); }
Linear out_rows(const Linear& l, int64_t start, int64_t n) {
  return {l.weight.narrow(0, start, n), l.bias.narrow(0, start, n), l.lora_down,
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
}

void FluxTransformer::set_lora_slot_rank(int64_t rank) { lora_rank_ = rank; }

void FluxTransformer::set_fp8(bool on) {
  for (Linear* l : block_token_linears(weights_)) {
    if (on) {
      quantize_linear_fp8(*l, backend_);
    } else {
      l->weight_fp8 = Tensor();
      l->weight_scale = Tensor();
    }
  }
  fp8_ = on;
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
  if (batch == B_ && img_tokens == Ni_ && txt_tokens == Nt_ && lora_rank_ == prepared_lora_rank_) return;
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
  buf_.q = e({batch, H, S, hd});
  buf_.k = e({batch, H, S, hd});
  buf_.v = e({batch, H, S, hd});
  buf_.attn_mlp_room = e({batch, S, D + M + R});
  buf_.attn_mlp = cols(buf_.attn_mlp_room, 0, D + M);
  if (lora_rank_ > 0) buf_.lora_scratch = e({batch, S, lora_rank_});
  prepared_lora_rank_ = lora_rank_;
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

  for (const auto& block : weights_.double_blocks) double_block(block, in.rope);
  for (const auto& block : weights_.single_blocks) single_block(block, in.rope);

  // Final AdaLN on the image tokens, then the projection back to latent channels.
  Tensor mod = buf_.mod_img.narrow(1, 0, 2 * D);
  linear(buf_.temb_silu, weights_.final_mod, mod);
  Tensor img = rows(buf_.stream, Nt, Ni), normed = rows(buf_.normed, Nt, Ni);
  be.layer_norm_modulate(img, chunk(mod, 0, D), chunk(mod, 1, D), normed);
  linear(normed, weights_.final_linear, out);
}

void FluxTransformer::double_block(const DoubleBlockWeights& w, const Tensor& rope) {
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
  be.qk_norm_rope(txt.qkv, w.txt_q_norm, w.txt_k_norm, rope, 0, buf_.q, buf_.k, buf_.v);
  be.qk_norm_rope(img.qkv, w.img_q_norm, w.img_k_norm, rope, Nt, buf_.q, buf_.k, buf_.v);
  be.attention(buf_.q, buf_.k, buf_.v, cols(buf_.attn_mlp, 0, D));
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

void FluxTransformer::single_block(const SingleBlockWeights& w, const Tensor& rope) {
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
  be.qk_norm_rope(qkv, w.q_norm, w.k_norm, rope, 0, buf_.q, buf_.k, buf_.v);
  be.attention(buf_.q, buf_.k, buf_.v, cols(buf_.attn_mlp, 0, D));

  // linear2 reads [attention | MLP] side by side: the reference's concatenation is already in place.
  linear_roomy(buf_.attn_mlp_room, D + M, w.linear2, buf_.branch);
  be.gated_residual(buf_.stream, chunk(mod, 2, D), buf_.branch);
}

}  // namespace fluxswap
