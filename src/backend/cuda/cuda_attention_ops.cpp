// The attention ops of the CUDA backend. bf16: qk_norm_rope into q, k (and v) heads, then cuDNN's flash attention
// (the built-in kernel where cuDNN refuses a shape), v read from its heads or in place from the qkv rows. FP8:
// qk_norm_rope writing e4m3 q and k, then v quantised, cuDNN's FP8 flash attention, and its e4m3 output either back
// to bf16 rows (attention_fp8) or kept with its row scales for the FP8 linears that read it (attention_fp8_rows).
// Every FP8 scale is computed on the device (v's from the amax qk_norm_rope_fp8 gathers), so the sequence records
// into a CUDA graph like the bf16 one.
#include <cmath>

#include "backend/cuda/cuda_backend.h"
#include "backend/cuda/fp8_attention_kernels.h"
#include "backend/cuda/text_kernels.h"

namespace fluxswap::cuda {

namespace {
void check_heads(const Tensor& t, DType dtype, const Shape& shape, const char* op, const char* what) {
  check_cuda_tensor(t, op, what, dtype);
  check_contiguous(t, op, what);
  if (t.shape() != shape || t.ndim() != 4)
    bad(op, std::string(what) + " must be [B, H, S, D] " + shape_str(shape) + ", got " + shape_str(t.shape()));
}

void check_amax(const Tensor& v_amax, const char* op) {
  check_cuda_tensor(v_amax, op, "v_amax", DType::F32);
  if (v_amax.numel() != 1) bad(op, "v_amax must be F32 [1], got " + shape_str(v_amax.shape()));
}

void check_qk_scale(float qk_scale, const char* op) {
  if (!(qk_scale > 0.0f) || !std::isfinite(qk_scale)) bad(op, "qk_scale must be a positive finite number");
}
}  // namespace

// v as attention reads it: heads [B, H, S, D] (contiguous), or the v columns of qkv rows [B, S, H*D].
static cuda::VHeads v_heads_of(const Tensor& v, const Shape& heads, const char* op) {
  if (v.ndim() == 4) {
    check_heads(v, DType::BF16, heads, op, "v");
    return {v.ptr<__nv_bfloat16>(), heads[0], heads[1], heads[2], heads[3], v.stride(0), v.stride(1), v.stride(2)};
  }
  const cuda::RowsView V = rows_of(v, op, "v rows");
  if (V.B != heads[0] || V.N != heads[2] || V.C != heads[1] * heads[3])
    bad(op, "v rows " + shape_str(v.shape()) + " do not match the heads " + shape_str(heads));
  return {V.p, heads[0], heads[1], heads[2], heads[3], V.sb, heads[3], V.sn};
}

void CudaBackend::qk_norm_rope(const Tensor& qkv, const Tensor& q_norm, const Tensor& k_norm, const Tensor& rope,
                               int64_t seq_offset, const Tensor& q, const Tensor& k, const Tensor& v) {
  const char* op = "qk_norm_rope";
  check_heads(q, DType::BF16, q.shape(), op, "q");
  check_heads(k, DType::BF16, q.shape(), op, "k");
  if (v.defined()) check_heads(v, DType::BF16, q.shape(), op, "v");
  qk_norm_rope_checked(qkv, q_norm, k_norm, rope, seq_offset, q.shape(), q.ptr<__nv_bfloat16>(),
                       k.ptr<__nv_bfloat16>(), v.defined() ? v.ptr<__nv_bfloat16>() : nullptr, nullptr, op);
}

void CudaBackend::attention(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out) {
  const char* op = "attention";
  check_heads(q, DType::BF16, q.shape(), op, "q");
  check_heads(k, DType::BF16, q.shape(), op, "k");
  cuda::VHeads vh = v_heads_of(v, q.shape(), op);
  const int64_t B = q.size(0), H = q.size(1), S = q.size(2), D = q.size(3);
  const cuda::RowsView O = rows_of(out, op, "output");
  if (O.B != B || O.N != S || O.C != H * D) bad(op, "output " + shape_str(out.shape()) + " does not match q");
  cuda::AttentionShape shape{.B = B, .H = H, .S = S, .D = D, .out_sb = O.sb, .out_sn = O.sn,
                             .v_sb = vh.sb, .v_sh = vh.sh, .v_ss = vh.ss};
  bool use_cudnn = cudnn_ready(shape);
  // Where cuDNN refuses v at the qkv rows' strides, v is copied into heads (what qk_norm_rope wrote before attention
  // read v in place) so that attention stays on cuDNN rather than the slower built-in kernel.
  const cuda::AttentionShape heads{.B = B, .H = H, .S = S, .D = D, .out_sb = O.sb, .out_sn = O.sn,
                                   .v_sb = H * S * D, .v_sh = S * D, .v_ss = D};
  const bool copy_v =
      !use_cudnn && !shape.v_in_heads() && attention_mode_ != AttentionMode::Naive && cudnn_ready(heads);
  cuda::RowsView v_rows{};
  if (copy_v) {
    if (!attention_v_heads_.defined() || attention_v_heads_.numel() < q.numel()) {
      if (capturing_) bad(op, "a recording needs a larger v buffer: run the work once eagerly first");
      attention_retired_.push_back(attention_v_heads_);  // a recording may still use the outgrown one
      attention_v_heads_ = empty(DType::BF16, {q.numel()});
    }
    v_rows = rows_of(v, op, "v rows");
    vh = {attention_v_heads_.ptr<__nv_bfloat16>(), B, H, S, D, H * S * D, S * D, D};
    shape = heads;
    use_cudnn = true;
  }
  timed(op, [&] {
    if (copy_v) cuda::launch_split_heads(v_rows, H, attention_v_heads_.ptr<__nv_bfloat16>(), stream());
    if (use_cudnn)
      cudnn_->run(shape, q.data(), k.data(), vh.p, O.p);
    else
      cuda::launch_flash_attention(q.ptr<__nv_bfloat16>(), k.ptr<__nv_bfloat16>(), vh, O, stream());
  });
}

void CudaBackend::qk_norm_rope_fp8(const Tensor& qkv, const Tensor& q_norm, const Tensor& k_norm, const Tensor& rope,
                                   int64_t seq_offset, float qk_scale, const Tensor& q8, const Tensor& k8,
                                   const Tensor& v, const Tensor& v_amax) {
  const char* op = "qk_norm_rope_fp8";
  check_heads(q8, DType::F8_E4M3, q8.shape(), op, "q8");
  check_heads(k8, DType::F8_E4M3, q8.shape(), op, "k8");
  if (v.defined()) check_heads(v, DType::BF16, q8.shape(), op, "v");
  check_amax(v_amax, op);
  check_qk_scale(qk_scale, op);
  const cuda::Fp8QkTarget target{static_cast<uint8_t*>(q8.data()), static_cast<uint8_t*>(k8.data()), qk_scale,
                                 v_amax.ptr<float>()};
  qk_norm_rope_checked(qkv, q_norm, k_norm, rope, seq_offset, q8.shape(), nullptr, nullptr,
                       v.defined() ? v.ptr<__nv_bfloat16>() : nullptr, &target, op);
}

// Checks, v quantised, cuDNN's e4m3 attention into o8 (contiguous [B, S, H*D]); returns the slots it used.
float* CudaBackend::run_fp8_attention(const Tensor& q8, const Tensor& k8, const Tensor& v, float qk_scale,
                                      const Tensor& v_amax, uint8_t* o8, const char* op) {
  check_heads(q8, DType::F8_E4M3, q8.shape(), op, "q8");
  check_heads(k8, DType::F8_E4M3, q8.shape(), op, "k8");
  const cuda::VHeads vh = v_heads_of(v, q8.shape(), op);
  check_amax(v_amax, op);
  check_qk_scale(qk_scale, op);
  const int64_t B = q8.size(0), H = q8.size(1), S = q8.size(2), D = q8.size(3);
  const cuda::AttentionShape shape{.B = B, .H = H, .S = S, .D = D, .out_sb = S * H * D, .out_sn = H * D,
                                   .v_sb = S * H * D, .v_sh = S * D, .v_ss = D, .fp8 = true};  // v8: e4m3 heads
  if (attention_mode_ == AttentionMode::Naive) bad(op, "needs cuDNN (FLUXSWAP_ATTENTION=naive is set)");
  if (!cudnn_ || !cudnn_->has_plan(shape)) {
    if (capturing_) bad(op, "a new attention shape was first issued while recording; run the work once first");
    if (!cudnn_) cudnn_ = std::make_unique<cuda::CudnnAttention>(memory_, stream());
    cudnn_->build(shape);  // no fallback kernel: an unsupported FP8 attention is an error
  }
  const int64_t n = B * H * S * D;
  if (!fp8_attention_slots_.defined()) {
    if (capturing_) bad(op, "the first FP8 attention must run before recording");
    fp8_attention_slots_ = empty(DType::F32, {int64_t(cuda::kFp8AttentionSlots)});
  }
  if (!fp8_attention_v8_.defined() || fp8_attention_v8_.numel() < n) {
    if (capturing_) bad(op, "a recording needs larger FP8 attention buffers: run the work once eagerly first");
    attention_retired_.push_back(fp8_attention_v8_);  // a recording may still use the outgrown one
    fp8_attention_v8_ = empty(DType::F8_E4M3, {n});
  }
  float* slots = fp8_attention_slots_.ptr<float>();
  auto* v8 = static_cast<uint8_t*>(fp8_attention_v8_.data());
  cuda::launch_quantize_v_e4m3(vh, v8, v_amax.ptr<float>(), qk_scale, slots, stream());
  cudnn_->run_fp8(shape, q8.data(), k8.data(), v8, o8, slots);
  return slots;
}

void CudaBackend::attention_fp8(const Tensor& q8, const Tensor& k8, const Tensor& v, float qk_scale,
                                const Tensor& v_amax, const Tensor& out) {
  const char* op = "attention_fp8";
  const cuda::RowsView O = rows_of(out, op, "output");
  if (q8.ndim() != 4 || O.B != q8.size(0) || O.N != q8.size(2) || O.C != q8.size(1) * q8.size(3))
    bad(op, "output " + shape_str(out.shape()) + " does not match q8 " + shape_str(q8.shape()));
  // cuDNN writes e4m3 rows [B, S, H*D] (contiguous) into a scratch buffer that the dequantisation reads.
  const int64_t n = q8.numel();
  if (!fp8_attention_o8_.defined() || fp8_attention_o8_.numel() < n) {
    if (capturing_) bad(op, "a recording needs larger FP8 attention buffers: run the work once eagerly first");
    attention_retired_.push_back(fp8_attention_o8_);
    fp8_attention_o8_ = empty(DType::F8_E4M3, {n});
  }
  auto* o8 = static_cast<uint8_t*>(fp8_attention_o8_.data());
  timed(op, [&] {
    const float* slots = run_fp8_attention(q8, k8, v, qk_scale, v_amax, o8, op);
    cuda::launch_dequantize_attention_e4m3(o8, slots, v_amax.ptr<float>(), O, stream());
  });
}

void CudaBackend::attention_fp8_rows(const Tensor& q8, const Tensor& k8, const Tensor& v, float qk_scale,
                                     const Tensor& v_amax, const Tensor& out8, const Tensor& out_scale) {
  const char* op = "attention_fp8_rows";
  check_cuda_tensor(out8, op, "out8", DType::F8_E4M3);
  if (q8.ndim() != 4 || out8.shape() != Shape{q8.size(0), q8.size(2), q8.size(1) * q8.size(3)} ||
      !out8.is_contiguous())
    bad(op, "out8 must be [B, S, H*D] contiguous for q8 " + shape_str(q8.shape()) + ", got " + shape_str(out8.shape()));
  if (reinterpret_cast<uintptr_t>(out8.data()) % 16) bad(op, "out8 must be 16-byte aligned");
  check_cuda_tensor(out_scale, op, "out_scale", DType::F32);
  const int64_t rows = q8.size(0) * q8.size(2);
  if (out_scale.numel() != rows || !out_scale.is_contiguous())
    bad(op, "out_scale must be F32 [" + std::to_string(rows) + "] contiguous, got " + shape_str(out_scale.shape()));
  timed(op, [&] {
    const float* slots = run_fp8_attention(q8, k8, v, qk_scale, v_amax, static_cast<uint8_t*>(out8.data()), op);
    cuda::launch_output_scales(slots, v_amax.ptr<float>(), out_scale.ptr<float>(), rows, stream());
  });
}

}  // namespace fluxswap::cuda
