#pragma once
// Launchers for the kernels behind the text-encoder ops (CLIP-L, T5), the unfused attention's softmax and the
// sampler's axpy. Same conventions as kernels.h: plain strided views (bf16 unless stated), enqueued on `stream`
// without synchronising, float32 math, Error naming the op when a launch fails.
#include "backend/backend.h"
#include "backend/cuda/kernels.h"

namespace fluxswap::cuda {

// y = LayerNorm(x, eps) * weight (+ bias); weight, bias [C] (bias may be null). y may alias x.
void launch_layer_norm(const RowsView& x, const __nv_bfloat16* weight, const __nv_bfloat16* bias, float eps,
                       const RowsView& y, cudaStream_t stream);
// y = x / sqrt(mean(x^2) + eps) * weight. y may alias x.
void launch_rms_norm(const RowsView& x, const __nv_bfloat16* weight, float eps, const RowsView& y,
                     cudaStream_t stream);
// out[b, s] = table[ids[b * S + s]] (+ positions[s]); ids int32, contiguous [B, S]; table [V, C]; positions [>= S, C]
// or null. An id outside 0..V-1 cannot be reported without a host sync: its row is written as NaN instead.
void launch_embedding(const int32_t* ids, const __nv_bfloat16* table, int64_t V, const __nv_bfloat16* positions,
                      const RowsView& out, cudaStream_t stream);
// Rows [B, S, H*D] -> contiguous [B, H, S, D].
void launch_split_heads(const RowsView& x, int64_t H, __nv_bfloat16* out, cudaStream_t stream);
// y = act(x); y may alias x.
void launch_activation(const RowsView& x, Activation act, const RowsView& y, cudaStream_t stream);
// y *= x.
void launch_mul(const RowsView& y, const RowsView& x, cudaStream_t stream);

// Row-wise softmax of attention scores for `heads` heads of `rows` query rows each (query positions row0 ..
// row0 + rows - 1) against S keys. scores: float32 [heads, rows, S] (alpha already applied by the GEMM); bias:
// float32 [heads, S_total, S] rows row0.. of the first head, or null; causal: key j > query i is masked (exact
// zero). Writes bf16 probabilities p [heads, rows, S].
struct SoftmaxRows {
  const float* scores;
  const float* bias;  // first head's row row0, head stride bias_head_stride
  int64_t bias_head_stride;
  __nv_bfloat16* p;
  int64_t heads, rows, S, row0;
  bool causal;
};
void launch_attention_softmax(const SoftmaxRows& s, cudaStream_t stream);

// y += alpha * x over rows [B, N, C] whose elements are bf16 or float32 (each side independently).
struct AnyRows {
  void* p;
  bool f32;
  int64_t B, N, C, sb, sn;
};
void launch_axpy(const AnyRows& y, float alpha, const AnyRows& x, cudaStream_t stream);

}  // namespace fluxswap::cuda
