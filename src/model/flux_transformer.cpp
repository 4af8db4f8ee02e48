#include "model/flux_transformer.h"

#include <algorithm>
#include <cmath>
#include <initializer_list>

#include "core/error.h"
#include "model/flux_step_order.h"
#include "model/flux_weight_map.h"

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

void FluxTransformer::set_step_gates(bool on) {
  on = on && backend_.has_gates();
  if (on) backend_.prepare_gates(int(flux_step_ranks(config_)));
  step_gates_ = on;
}


void FluxTransformer::offload() {
  if (!resident()) return;
  if (streamer_.active()) throw Error("internal: a transformer streaming its blocks is not also uploaded per image");
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
  if (streamer_.active())
    throw Error("set_fp8: the transformer streams its blocks from host memory under this memory plan; choose the "
                "precision before the plan (load an FP8 checkpoint for FP8 under a small budget)");
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
  weights_changed();
}

void FluxTransformer::weights_changed() {
  if (resident()) offload_.invalidate();
  for (size_t b = 0; b < weights_.double_blocks.size() + weights_.single_blocks.size(); ++b)
    if (!streamer_.streamed(b)) streamer_.invalidate(b);
}

const std::vector<float>& FluxTransformer::qk_norm_maxima() {
  const size_t blocks = weights_.double_blocks.size() + weights_.single_blocks.size();
  if (qk_norm_max_.size() == blocks) return qk_norm_max_;
  if (!resident()) throw Error("FP8 attention: the transformer's weights are off the device (memory plan)");
  // (Blocks loaded into host memory for streaming have host norms.)
  auto max_abs = [&](const Tensor& t) {
    const Tensor w = t.device() == Device::CPU ? t.to_f32() : backend_.to_host_f32(t);
    float m = 0.0f;
    for (int64_t i = 0; i < w.numel(); ++i) m = std::max(m, std::fabs(w.ptr<float>()[i]));
    return m;
  };
  std::vector<float> out;
  for (const auto& b : weights_.double_blocks)
    out.push_back(std::max({max_abs(b.txt_q_norm), max_abs(b.txt_k_norm), max_abs(b.img_q_norm), max_abs(b.img_k_norm)}));
  for (const auto& b : weights_.single_blocks) out.push_back(std::max(max_abs(b.q_norm), max_abs(b.k_norm)));
  qk_norm_max_ = std::move(out);
  return qk_norm_max_;
}

void FluxTransformer::set_fp8_attention(bool on) {
  qk_scale_double_.clear();
  qk_scale_single_.clear();
  if (on) {
    // 448 / (sqrt(D) * max |w|) over a block's q and k norm weights: after RMSNorm |x_i| <= sqrt(D), the weight
    // scales it, and RoPE's rotation keeps each pair's norm, so no q or k element of the block can exceed 448 in e4m3.
    const std::vector<float>& m = qk_norm_maxima();
    const float root = std::sqrt(float(config_.attention_head_dim));
    for (size_t b = 0; b < m.size(); ++b) {
      if (!(m[b] > 0.0f) || !std::isfinite(m[b]))
        throw Error("FP8 attention: a q/k norm weight of block " + std::to_string(b) + " is all zero or not finite");
      const float scale = 448.0f / (root * m[b] * 1.001f);  // the margin covers bf16/rsqrt rounding
      (b < weights_.double_blocks.size() ? qk_scale_double_ : qk_scale_single_).push_back(scale);
    }
  }
  fp8_attention_ = on;
}

void FluxTransformer::stream_blocks(const std::vector<bool>& block_resident, int prefetch_depth) {
  if (!resident()) throw Error("stream_blocks: the transformer's weights are off the device (memory plan)");
  const size_t blocks = weights_.double_blocks.size() + weights_.single_blocks.size();
  const bool any = std::find(block_resident.begin(), block_resident.end(), false) != block_resident.end();
  if (!any && !streamer_.active()) return;  // (every plan asks; most stream nothing)
  if (any) qk_norm_maxima();  // FP8 attention's scales come from norms that are about to leave
  std::vector<std::vector<Tensor*>> tensors = weights_.block_tensors();
  for (size_t b = 0; b < blocks && any; ++b) {
    if (b < block_resident.size() && block_resident[b]) continue;
    for (Linear* l : weights_.block_linears(b)) {
      if (!l->lora_weight.defined()) continue;
      // [W | up] cannot pass through a shared buffer with the slot in it: W and up become separate matrices.
      const Tensor w = backend_.empty(l->weight.dtype(), l->weight.shape());
      const Tensor up = backend_.empty(l->lora_up.dtype(), l->lora_up.shape());
      backend_.copy(l->weight, w);
      backend_.copy(l->lora_up, up);
      l->lora_weight = Tensor();
      l->weight = w;
      l->lora_up = up;
    }
    // by_name's references would keep the device copies alive.
    for (Tensor* t : tensors[b]) weights_.forget(*t);
  }
  streamer_.configure(backend_, tensors, any ? block_resident : std::vector<bool>{}, prefetch_depth);
}

bool FluxTransformer::streamed(const std::string& module) const {
  size_t block = 0;
  return flux_block_index(module, config_, &block) && streamer_.streamed(block);
}

std::vector<uint64_t> FluxTransformer::block_weight_bytes() {
  std::vector<uint64_t> out;
  std::vector<std::vector<Tensor*>> tensors = weights_.block_tensors();
  for (size_t b = 0; b < tensors.size(); ++b) {
    if (streamer_.streamed(b)) {
      out.push_back(streamer_.block_upload_bytes(b));
      continue;
    }
    // A weight inside [W | up] counts its own columns; the slot counts with the shared part.
    std::vector<const Tensor*> plain;
    uint64_t in_slots = 0;
    for (Tensor* t : tensors[b]) plain.push_back(t);
    for (Linear* l : weights_.block_linears(b))
      if (l->lora_weight.defined()) {
        std::erase(plain, &l->weight);
        in_slots += l->weight.numel() * dtype_size(l->weight.dtype());
      }
    out.push_back(tensor_storage_bytes(plain) + in_slots);
  }
  return out;
}

uint64_t FluxTransformer::shared_weight_bytes() {
  std::vector<const Tensor*> shared;
  for (Tensor* t : weights_.shared_tensors()) shared.push_back(t);
  uint64_t slots = 0;
  auto add_slots = [&](Linear& l) {
    if (l.lora_down.defined()) slots += l.lora_down.numel() * dtype_size(l.lora_down.dtype());
    if (l.lora_up.defined()) slots += l.lora_up.numel() * dtype_size(l.lora_up.dtype());
  };
  for (Linear* l : weights_.shared_linears()) add_slots(*l);
  for (size_t b = 0; b < weights_.double_blocks.size() + weights_.single_blocks.size(); ++b)
    for (Linear* l : weights_.block_linears(b)) add_slots(*l);
  return tensor_storage_bytes(shared) + slots;
}

void FluxTransformer::set_precision(bool fp8_linears, bool fp8_attention) {
  if (fp8_linears) backend_.set_fp8_fast_accumulation(true);
  if (fp8_linears != fp8_) set_fp8(fp8_linears);
  if (fp8_attention != fp8_attention_) set_fp8_attention(fp8_attention);
}

void FluxTransformer::qk_rope(const Tensor& qkv, const Tensor& q_norm, const Tensor& k_norm, const Tensor& rope,
                              int64_t seq_offset, float qk_scale) {
  // Attention reads v from the qkv rows (v_rows()): FP8 attention gathers only max |v| here.
  if (fp8_attention_)
    backend_.qk_norm_rope_fp8(qkv, q_norm, k_norm, rope, seq_offset, qk_scale, buf_.q8, buf_.k8, Tensor(), buf_.v_amax);
  else
    backend_.qk_norm_rope(qkv, q_norm, k_norm, rope, seq_offset, buf_.q, buf_.k, Tensor());
}

void FluxTransformer::attend(const Tensor& out, float qk_scale) {
  if (fp8_attention_)
    backend_.attention_fp8(buf_.q8, buf_.k8, v_rows(), qk_scale, buf_.v_amax, out);
  else
    backend_.attention(buf_.q, buf_.k, v_rows(), out);
}

void FluxTransformer::linear(const Tensor& x, const Linear& l, const Tensor& y, Activation act,
                             const Tensor& scratch_rows) {
  const Tensor scratch = !l.lora_down.defined() ? Tensor()
                         : scratch_rows.defined() ? scratch_rows
                         : x.ndim() == 2          ? buf_.lora_scratch.select(1, 0)
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

void FluxTransformer::norm(const Tensor& x, const Residual& pending, const Tensor& shift, const Tensor& scale,
                           const Tensor& normed, const Tensor& q8, const Tensor& q8_scale) {
  Backend& be = backend_;
  if (q8.defined()) {
    if (pending.gate.defined())
      be.gated_residual_layer_norm_modulate_fp8(x, pending.gate, pending.branch, shift, scale, q8, q8_scale);
    else
      be.layer_norm_modulate_fp8(x, shift, scale, q8, q8_scale);
  } else if (pending.gate.defined()) {
    be.gated_residual_layer_norm_modulate(x, pending.gate, pending.branch, shift, scale, normed);
  } else {
    be.layer_norm_modulate(x, shift, scale, normed);
  }
}

void FluxTransformer::apply(const Tensor& x, const Residual& pending) {
  if (pending.gate.defined()) backend_.gated_residual(x, pending.gate, pending.branch);
}

void FluxTransformer::norm_linear(const Tensor& x, const Residual& pending, const Tensor& shift, const Tensor& scale,
                                  const Tensor& normed_room, const Tensor& q8, const Tensor& q8_scale, const Linear& l,
                                  const Tensor& y, Activation act) {
  if (quantized_input(l)) {
    norm(x, pending, shift, scale, Tensor(), q8, q8_scale);
    backend_.linear_fp8_quantized(q8, q8_scale, l.weight_fp8, l.weight_scale, l.bias, y, act);
    return;
  }
  const int64_t D = x.size(-1);
  norm(x, pending, shift, scale, normed_room.narrow(-1, 0, D), Tensor(), Tensor());
  linear_roomy(normed_room, D, l, y, act);
}

void FluxTransformer::modulation_of(size_t b, const Conditioning& c, const Modulations& m) {
  const size_t nd = weights_.double_blocks.size();
  if (b < nd) {
    linear(c.temb_silu, weights_.double_blocks[b].img_mod, m.img[b], Activation::None, c.lora_scratch);
    linear(c.temb_silu, weights_.double_blocks[b].txt_mod, m.txt[b], Activation::None, c.lora_scratch);
  } else if (b < nd + weights_.single_blocks.size()) {
    linear(c.temb_silu, weights_.single_blocks[b - nd].modulation, m.single[b - nd], Activation::None,
           c.lora_scratch);
  } else {
    linear(c.temb_silu, weights_.final_mod, m.final, Activation::None, c.lora_scratch);
  }
}

void FluxTransformer::modulations_up_front(const Conditioning& c, const Modulations& m) {
  // A step's FP8 ones without a runtime slot go together (one launch of a few-row GEMV streams all their weights);
  // a table's rows (a whole schedule) go through the GEMMs one by one, as does everything else.
  std::vector<Backend::Fp8LinearItem> batch;
  const bool one_launch = &c == &buf_.cond;
  auto add = [&](const Linear& l, const Tensor& y) {
    if (one_launch && l.weight_fp8.defined() && !l.lora_down.defined())
      batch.push_back({l.weight_fp8, l.weight_scale, l.bias, y});
    else
      linear(c.temb_silu, l, y, Activation::None, c.lora_scratch);
  };
  for (size_t i = 0; i < weights_.double_blocks.size(); ++i) {
    add(weights_.double_blocks[i].img_mod, m.img[i]);
    add(weights_.double_blocks[i].txt_mod, m.txt[i]);
  }
  for (size_t i = 0; i < weights_.single_blocks.size(); ++i) add(weights_.single_blocks[i].modulation, m.single[i]);
  add(weights_.final_mod, m.final);
  if (!batch.empty()) backend_.linear_fp8_batch(c.temb_silu, batch);
}

int64_t FluxTransformer::modulation_width() const {
  const int64_t D = config_.inner_dim();
  return int64_t(weights_.double_blocks.size()) * 12 * D + int64_t(weights_.single_blocks.size()) * 3 * D + 2 * D;
}

FluxTransformer::Modulations FluxTransformer::split_modulations(const Tensor& all) const {
  const int64_t D = config_.inner_dim();
  Modulations m;
  int64_t at = 0;
  auto take = [&](int64_t width) {
    at += width;
    return all.narrow(1, at - width, width);
  };
  for (size_t i = 0; i < weights_.double_blocks.size(); ++i) {
    m.img.push_back(take(6 * D));
    m.txt.push_back(take(6 * D));
  }
  for (size_t i = 0; i < weights_.single_blocks.size(); ++i) m.single.push_back(take(3 * D));
  m.final = take(2 * D);
  return m;
}

FluxTransformer::Conditioning FluxTransformer::conditioning_buffers(int64_t n) const {
  const int64_t D = config_.inner_dim();
  auto e = [&](Shape s) { return backend_.empty(backend_.compute_dtype(), s); };
  Conditioning c{e({n, 256}), e({n, D}), e({n, D}), e({n, D}), e({n, D}), Tensor()};
  if (lora_rank_ > 0) c.lora_scratch = e({n, lora_rank_});
  return c;
}

Tensor FluxTransformer::modulation_table(const Tensor& timesteps, const Tensor& guidance, const Tensor& pooled) {
  if (!can_tabulate_modulations())
    throw Error("modulation_table: the modulation weights are not all on the device (weights offloaded or blocks "
                "streamed by the memory plan)");
  if (timesteps.ndim() != 2 || timesteps.dtype() != DType::F32)
    throw Error("modulation_table: timesteps must be F32 [steps, batch], got " + shape_str(timesteps.shape()));
  const int64_t T = timesteps.size(0), B = timesteps.size(1), N = T * B;
  if (pooled.ndim() != 2 || pooled.size(0) != B || pooled.size(1) != config_.pooled_projection_dim)
    throw Error("modulation_table: pooled_projections must be [" + std::to_string(B) + ", " +
                std::to_string(config_.pooled_projection_dim) + "], got " + shape_str(pooled.shape()));
  if (config_.guidance_embeds && (!guidance.data() || guidance.numel() != B))
    throw Error("modulation_table: this model has a guidance embedder (FLUX.1-dev style): guidance [" +
                std::to_string(B) + "] is required");
  Backend& be = backend_;
  // Every step's rows: its timesteps with the per-sample guidance and pooled vectors repeated.
  const Tensor t = be.empty(DType::F32, {N});
  be.copy(timesteps.view({N}), t);
  Tensor g, p = be.empty(pooled.dtype(), {N, pooled.size(1)});
  if (config_.guidance_embeds) g = be.empty(DType::F32, {N});
  for (int64_t i = 0; i < T; ++i) {
    be.copy(pooled, p.narrow(0, i * B, B));
    if (g.defined()) be.copy(guidance.view({B}), g.narrow(0, i * B, B));
  }
  const Conditioning c = conditioning_buffers(N);
  embed_conditioning(t, g, p, c);
  const Tensor table = be.empty(be.compute_dtype(), {N, modulation_width()});
  modulations_up_front(c, split_modulations(table));
  return table.view({T, B, modulation_width()});
}

void FluxTransformer::prepare(int64_t batch, int64_t img_tokens, int64_t txt_tokens) {
  if (batch == B_ && img_tokens == Ni_ && txt_tokens == Nt_ && lora_rank_ == prepared_lora_rank_ &&
      fp8_attention_ == prepared_fp8_attention_ && fp8_ == prepared_fp8_)
    return;
  const int64_t D = config_.inner_dim(), M = config_.mlp_dim(), S = img_tokens + txt_tokens;
  const int64_t H = config_.num_attention_heads, hd = config_.attention_head_dim;
  const DType dt = backend_.compute_dtype();
  auto e = [&](Shape s) { return backend_.empty(dt, s); };
  buf_ = Buffers{};
  buf_.mod_all = e({batch, modulation_width()});
  buf_.stream = e({batch, S, D});
  const int64_t R = lora_rank_;
  buf_.normed_room = e({batch, S, D + R});
  buf_.normed = cols(buf_.normed_room, 0, D);
  buf_.branch = e({batch, S, D});
  // Attention reads v in place from these rows: a row length of whole 16-byte units keeps them aligned for it.
  buf_.proj_in_room = e({batch, S, 3 * D + M + (R + 7) / 8 * 8});
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
  buf_.attn_mlp_room = e({batch, S, D + M + R});
  buf_.attn_mlp = cols(buf_.attn_mlp_room, 0, D + M);
  if (lora_rank_ > 0) buf_.lora_scratch = e({batch, S, lora_rank_});
  buf_.cond = conditioning_buffers(batch);
  if (fp8_) {
    buf_.normed_q8 = backend_.empty(DType::F8_E4M3, {batch * S, D});
    buf_.normed_q8_scale = backend_.empty(DType::F32, {batch * S});
  }
  if (fp8_ && backend_.fp8_residual_in_gemm()) {
    const int64_t projections = 4 * int64_t(weights_.double_blocks.size()) + int64_t(weights_.single_blocks.size());
    buf_.gated_scale = backend_.empty(DType::F32, {projections * batch * D});
    buf_.gated_bias = e({projections * batch * D});
  }
  if (fp8_ && fp8_attention_) {
    buf_.attn_q8 = backend_.empty(DType::F8_E4M3, {batch, S, D});
    buf_.attn_q8_scale = backend_.empty(DType::F32, {batch * S});
    buf_.attn_mlp_q8 = backend_.empty(DType::F8_E4M3, {batch * S, D + M});
    buf_.attn_mlp_q8_scale = backend_.empty(DType::F32, {batch * S});
  }
  prepared_lora_rank_ = lora_rank_;
  prepared_fp8_ = fp8_;
  prepared_fp8_attention_ = fp8_attention_;
  B_ = batch;
  Ni_ = img_tokens;
  Nt_ = txt_tokens;
}

void FluxTransformer::embed_conditioning(const Tensor& timestep, const Tensor& guidance, const Tensor& pooled,
                                         const Conditioning& c) {
  Backend& be = backend_;
  const FluxWeights& w = weights_;
  const Tensor& r = c.lora_scratch;
  be.timestep_embedding(timestep, 1000.0f, c.t_freq);
  linear(c.t_freq, w.time_in, c.hidden, Activation::Silu, r);
  linear(c.hidden, w.time_out, c.temb, Activation::None, r);
  if (config_.guidance_embeds) {
    if (!guidance.data()) throw Error("this model has a guidance embedder (FLUX.1-dev style): guidance is required");
    be.timestep_embedding(guidance, 1000.0f, c.t_freq);
    linear(c.t_freq, w.guidance_in, c.hidden, Activation::Silu, r);
    linear(c.hidden, w.guidance_out, c.emb_part, Activation::None, r);
    be.add(c.temb, c.emb_part);
  }
  linear(pooled, w.vector_in, c.hidden, Activation::Silu, r);
  linear(c.hidden, w.vector_out, c.emb_part, Activation::None, r);
  be.add(c.temb, c.emb_part);
  be.silu(c.temb, c.temb_silu);
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
  const bool tabled = in.modulations.defined();
  if (tabled && in.modulations.shape() != Shape{B, modulation_width()})
    throw Error("modulations has shape " + shape_str(in.modulations.shape()) + ", expected [" + std::to_string(B) +
                ", " + std::to_string(modulation_width()) + "] (one step's row of modulation_table())");
  prepare(B, Ni, Nt);
  Backend& be = backend_;

  gate(0);
  mod_ = split_modulations(tabled ? in.modulations : buf_.mod_all);
  if (!tabled) embed_conditioning(in.timestep, in.guidance, in.pooled_projections, buf_.cond);
  linear(in.hidden_states, weights_.img_in, rows(buf_.stream, Nt, Ni));
  linear(in.encoder_hidden_states, weights_.txt_in, rows(buf_.stream, 0, Nt));

  // Streamed blocks (memory plan) arrive on the copy queue while earlier blocks compute; their modulation weights
  // with them, so only a transformer without streamed blocks computes every modulation up front.
  const size_t nd = weights_.double_blocks.size(), ns = weights_.single_blocks.size();
  const bool per_block = streamer_.active() && !tabled;
  if (!streamer_.active() && !tabled) modulations_up_front(buf_.cond, mod_);
  // Streamed blocks' biases arrive with their blocks: their ops make their own factors then.
  if (!streamer_.active())
    gated_factors_up_front();
  else
    ready_factors_.clear();
  streamer_.begin(be);
  Residual txt_pending, img_pending, pending;
  for (size_t i = 0; i < nd; ++i) {
    streamer_.before_block(be, i);
    if (per_block) modulation_of(i, buf_.cond, mod_);
    gate(1 + int64_t(i));
    double_block(i, in.rope, fp8_attention_ ? qk_scale_double_[i] : 0.0f, txt_pending, img_pending);
  }
  // A single block normalises text and image rows together under one modulation: the streams' own gates go first.
  apply(rows(buf_.stream, 0, Nt), txt_pending);
  apply(rows(buf_.stream, Nt, Ni), img_pending);
  for (size_t i = 0; i < ns; ++i) {
    streamer_.before_block(be, nd + i);
    if (per_block) modulation_of(nd + i, buf_.cond, mod_);
    gate(1 + int64_t(nd + i));
    single_block(i, in.rope, fp8_attention_ ? qk_scale_single_[i] : 0.0f, pending);
  }
  apply(buf_.stream, pending);

  // Final AdaLN on the image tokens, then the projection back to latent channels.
  if (per_block) modulation_of(nd + ns, buf_.cond, mod_);
  const Tensor& mod = mod_.final;
  Tensor img = rows(buf_.stream, Nt, Ni), normed = rows(buf_.normed, Nt, Ni);
  be.layer_norm_modulate(img, chunk(mod, 0, D), chunk(mod, 1, D), normed);
  gate(flux_step_ranks(config_) - 1);
  linear(normed, weights_.final_linear, out);
}

void FluxTransformer::double_block(size_t i, const Tensor& rope, float qk_scale, Residual& txt_pending,
                                   Residual& img_pending) {
  const DoubleBlockWeights& w = weights_.double_blocks[i];
  const int64_t D = config_.inner_dim(), M = config_.mlp_dim(), Nt = Nt_, Ni = Ni_;

  // Each stream's views: residual, normed input, projection output, qkv, MLP activations.
  // The *_room views run on into the buffers' spare columns (in double blocks the attention output's neighbours,
  // attn_mlp's MLP columns, are unused and serve as its room).
  struct Stream {
    Tensor x, normed_room, branch, qkv, mlp, mlp_room, attn, attn_room, q8, q8_scale;
    const Tensor& mod;
    Residual& pending;        // the previous block's last residual, then this block's
    Residual attn_residual{};  // the attention's, unless its projection added it already
  };
  const int64_t B = B_;
  auto stream_views = [&](int64_t start, int64_t n, const Tensor& mod, Residual& pending) {
    const Tensor proj_in = rows(buf_.proj_in_room, start, n), attn_mlp = rows(buf_.attn_mlp_room, start, n);
    Tensor q8, q8_scale;
    if (buf_.normed_q8.defined()) {
      q8 = buf_.normed_q8.narrow(0, B * start, B * n).view({B, n, D});
      q8_scale = buf_.normed_q8_scale.narrow(0, B * start, B * n);
    }
    return Stream{rows(buf_.stream, start, n), rows(buf_.normed_room, start, n), rows(buf_.branch, start, n),
                  cols(proj_in, 0, 3 * D), cols(proj_in, 3 * D, M), cols(proj_in, 3 * D, proj_in.size(2) - 3 * D),
                  cols(attn_mlp, 0, D), attn_mlp, q8, q8_scale, mod, pending};
  };
  Stream txt = stream_views(0, Nt, mod_.txt[i], txt_pending);
  Stream img = stream_views(Nt, Ni, mod_.img[i], img_pending);
  // FP8 attention's e4m3 output goes straight into FP8 projections (one scale for all rows, so any B * n of them
  // serve as a stream's row scales).
  const bool e4m3_out = fp8_attention_ && quantized_input(w.txt_proj) && quantized_input(w.img_proj);

  // Joint attention over text and image tokens; each stream has its own projections and norms. (Each stream's
  // branch rows are read by its fused LayerNorm before its projection writes them again.)
  for (auto [s, qkv] : {std::pair{&txt, &w.txt_qkv}, std::pair{&img, &w.img_qkv}})
    norm_linear(s->x, s->pending, chunk(s->mod, 0, D), chunk(s->mod, 1, D), s->normed_room, s->q8, s->q8_scale, *qkv,
                s->qkv, Activation::None);
  qk_rope(txt.qkv, w.txt_q_norm, w.txt_k_norm, rope, 0, qk_scale);
  qk_rope(img.qkv, w.img_q_norm, w.img_k_norm, rope, Nt, qk_scale);
  if (e4m3_out) {
    backend_.attention_fp8_rows(buf_.q8, buf_.k8, v_rows(), qk_scale, buf_.v_amax, buf_.attn_q8, buf_.attn_q8_scale);
    for (auto [s, start, n, proj] : {std::tuple{&txt, int64_t(0), Nt, &w.txt_proj}, std::tuple{&img, Nt, Ni, &w.img_proj}})
      s->attn_residual = project_quantized(rows(buf_.attn_q8, start, n), buf_.attn_q8_scale.narrow(0, 0, B * n),
                                           *proj, chunk(s->mod, 2, D), s->x, s->branch);
  } else {
    attend(cols(buf_.attn_mlp, 0, D), qk_scale);
    txt.attn_residual = project(txt.attn_room, D, w.txt_proj, chunk(txt.mod, 2, D), txt.x, txt.branch);
    img.attn_residual = project(img.attn_room, D, w.img_proj, chunk(img.mod, 2, D), img.x, img.branch);
  }

  // Feed-forward, per stream: the attention's residual (if still pending) goes in with the LayerNorm, the MLP's
  // stays pending (if its projection did not add it).
  for (auto [s, mlp_in, mlp_out] : {std::tuple{&txt, &w.txt_mlp_in, &w.txt_mlp_out},
                                    std::tuple{&img, &w.img_mlp_in, &w.img_mlp_out}}) {
    norm_linear(s->x, s->attn_residual, chunk(s->mod, 3, D), chunk(s->mod, 4, D), s->normed_room, s->q8, s->q8_scale,
                *mlp_in, s->mlp, Activation::GeluTanh);
    s->pending = project(s->mlp_room, M, *mlp_out, chunk(s->mod, 5, D), s->x, s->branch);
  }
}

// The gates here are the ones double_block and single_block pass to project(): chunks 2 and 5 of a stream's
// modulation, chunk 2 of a single block's.
void FluxTransformer::gated_factors_up_front() {
  ready_factors_.clear();
  if (!buf_.gated_scale.defined()) return;
  const int64_t B = B_, D = config_.inner_dim();
  std::vector<Backend::GatedFactors> items;
  auto add = [&](const Linear& l, const Tensor& gate) {
    if (!fp8_projection_in_gemm(l)) return;
    const int64_t at = int64_t(items.size()) * B * D;
    items.push_back({gate, l.weight_scale, l.bias,
                     buf_.gated_scale.narrow(0, at, B * D).view({B, D}),
                     l.bias.defined() ? buf_.gated_bias.narrow(0, at, B * D).view({B, D}) : Tensor()});
    ready_factors_.emplace(&l, items.back());
  };
  for (size_t i = 0; i < weights_.double_blocks.size(); ++i) {
    const DoubleBlockWeights& w = weights_.double_blocks[i];
    add(w.txt_proj, chunk(mod_.txt[i], 2, D));
    add(w.txt_mlp_out, chunk(mod_.txt[i], 5, D));
    add(w.img_proj, chunk(mod_.img[i], 2, D));
    add(w.img_mlp_out, chunk(mod_.img[i], 5, D));
  }
  for (size_t i = 0; i < weights_.single_blocks.size(); ++i)
    add(weights_.single_blocks[i].linear2, chunk(mod_.single[i], 2, D));
  backend_.gated_output_factors(items);
}

void FluxTransformer::single_block(size_t i, const Tensor& rope, float qk_scale, Residual& pending) {
  const SingleBlockWeights& w = weights_.single_blocks[i];
  Backend& be = backend_;
  const int64_t D = config_.inner_dim(), M = config_.mlp_dim();
  const Tensor& mod = mod_.single[i];

  // linear1 computes q, k, v and the MLP input in one matrix; the two halves get different epilogues (and, in FP8,
  // read one quantisation of the normed rows).
  Tensor qkv = cols(buf_.proj_in, 0, 3 * D);
  Linear qkv_proj = out_rows(w.linear1, 0, 3 * D), mlp_in = out_rows(w.linear1, 3 * D, M);
  if (quantized_input(w.linear1)) {
    const Tensor q8 = buf_.normed_q8.view({B_, Nt_ + Ni_, D});
    norm(buf_.stream, pending, chunk(mod, 0, D), chunk(mod, 1, D), Tensor(), q8, buf_.normed_q8_scale);
    be.linear_fp8_quantized(q8, buf_.normed_q8_scale, qkv_proj.weight_fp8, qkv_proj.weight_scale, qkv_proj.bias, qkv,
                            Activation::None);
    be.linear_fp8_quantized(q8, buf_.normed_q8_scale, mlp_in.weight_fp8, mlp_in.weight_scale, mlp_in.bias,
                            cols(buf_.attn_mlp, D, M), Activation::GeluTanh);
  } else {
    norm(buf_.stream, pending, chunk(mod, 0, D), chunk(mod, 1, D), buf_.normed, Tensor(), Tensor());
    linear_roomy(buf_.normed_room, D, qkv_proj, qkv);
    linear_roomy(buf_.normed_room, D, mlp_in, cols(buf_.attn_mlp, D, M), Activation::GeluTanh, true);
  }
  qk_rope(qkv, w.q_norm, w.k_norm, rope, 0, qk_scale);
  // linear2 reads [attention | MLP] side by side: the reference's concatenation is already in place. With FP8
  // attention and an FP8 linear2, the attention's e4m3 output is quantised with the MLP's rows from its codes.
  if (fp8_attention_ && quantized_input(w.linear2)) {
    const int64_t rows_all = B_ * (Nt_ + Ni_);
    be.attention_fp8_rows(buf_.q8, buf_.k8, v_rows(), qk_scale, buf_.v_amax, buf_.attn_q8, buf_.attn_q8_scale);
    be.quantize_fp8_rows_joined(buf_.attn_q8.view({rows_all, D}), buf_.attn_q8_scale, cols(buf_.attn_mlp, D, M),
                                buf_.attn_mlp_q8, buf_.attn_mlp_q8_scale);
    pending = project_quantized(buf_.attn_mlp_q8.view({B_, Nt_ + Ni_, D + M}), buf_.attn_mlp_q8_scale, w.linear2,
                                chunk(mod, 2, D), buf_.stream, buf_.branch);
  } else {
    attend(cols(buf_.attn_mlp, 0, D), qk_scale);
    pending = project(buf_.attn_mlp_room, D + M, w.linear2, chunk(mod, 2, D), buf_.stream, buf_.branch);
  }
}

}  // namespace fluxswap
