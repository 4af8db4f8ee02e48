#pragma once
// Launchers for the backend's own kernels. They take plain strided views (bf16 elements unless stated), enqueue
// on `stream` without synchronising, and throw Error naming `op` when a launch fails.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace fluxswap::cuda {

// Rows [B, N, C] with the last dimension contiguous (a 2-D [B, C] tensor is B rows of one batch).
struct RowsView {
  __nv_bfloat16* p;
  int64_t B, N, C, sb, sn;
};

// Per-sample vectors [B, C] with any batch stride.
struct VecsView {
  const __nv_bfloat16* p;
  int64_t B, C, sb;
};

void launch_add(const RowsView& y, const RowsView& x, cudaStream_t stream);
void launch_gated_residual(const RowsView& x, const VecsView& gate, const RowsView& y, cudaStream_t stream);
// t: float32 [rows of out]; out: one row per sample.
void launch_timestep_embedding(const float* t, float t_scale, const RowsView& out, cudaStream_t stream);
void launch_layer_norm_modulate(const RowsView& x, const VecsView& shift, const VecsView& scale, const RowsView& y,
                                cudaStream_t stream);

// e4m3 rows [B, N, C] (bytes; strides in bytes) and one float32 scale per row, row (b, n) at scales[b * N + n].
struct Fp8RowsOut {
  uint8_t* q;
  int64_t sb, sn;
  float* scales;
};
// launch_layer_norm_modulate with y rounded to bf16 and quantised per row as launch_quantize_rows_e4m3 does
// (fp8_quant_kernels.h), bit for bit: the same kernel choice and arithmetic as launch_layer_norm_modulate into
// 16-byte-aligned rows. q: row and batch strides multiples of 8, 8-byte aligned.
void launch_layer_norm_modulate_fp8(const RowsView& x, const VecsView& shift, const VecsView& scale,
                                    const Fp8RowsOut& q, cudaStream_t stream);

// launch_gated_residual(x, gate, branch) then launch_layer_norm_modulate(x, shift, scale, y) (or its _fp8 form into
// q), bit for bit, in one kernel: a row of x is read, updated, written back and normalised by one block, from
// registers at FLUX's widths. The LayerNorm part takes the kernel the unfused launcher would (same alignment rules);
// where gate or branch cannot follow its 16-byte path (misaligned while x, shift, scale and y are aligned), the two
// unfused kernels run instead. y and q must not overlap x or branch.
void launch_gated_residual_layer_norm_modulate(const RowsView& x, const VecsView& gate, const RowsView& branch,
                                               const VecsView& shift, const VecsView& scale, const RowsView& y,
                                               cudaStream_t stream);
void launch_gated_residual_layer_norm_modulate_fp8(const RowsView& x, const VecsView& gate, const RowsView& branch,
                                                   const VecsView& shift, const VecsView& scale, const Fp8RowsOut& q,
                                                   cudaStream_t stream);

struct QkvHeads {
  __nv_bfloat16 *q, *k, *v;  // contiguous [B, H, S, D]; v null: not written (attention reads it from the qkv rows)
  int64_t H, S, D;
};
// FP8 attention's form of the output: q and k as e4m3 at qk_scale (contiguous [B, H, S, D] bytes) instead of
// QkvHeads' q and k, v still bf16 (or not written when QkvHeads' v is null: attention_fp8 then reads it from the
// qkv rows), and max |v| raised into *v_amax.
struct Fp8QkTarget {
  uint8_t *q8 = nullptr, *k8 = nullptr;
  float qk_scale = 1.0f;
  float* v_amax = nullptr;
};
// fp8: null for the bf16 form.
void launch_qk_norm_rope(const RowsView& qkv, const __nv_bfloat16* q_norm, const __nv_bfloat16* k_norm,
                         const float* rope, int64_t seq_offset, const QkvHeads& out, const Fp8QkTarget* fp8,
                         cudaStream_t stream);

// n contiguous elements, float32 or bf16.
void launch_fill_normal(void* p, bool bf16, int64_t n, uint64_t seed, float mean, float std, cudaStream_t stream);

// bf16 v as [B, H, S, D] at any strides (elements): contiguous heads, or the v columns of qkv rows [B, S, 3 H D]
// (sb = the rows' batch stride, sh = D, ss = the row stride).
struct VHeads {
  const __nv_bfloat16* p;
  int64_t B, H, S, D, sb, sh, ss;
};

// softmax(q k^T / sqrt(D)) v for contiguous bf16 q, k [B, H, S, D] (D <= 128) and v of their shape at v's strides;
// out rows [B, S, H*D].
void launch_flash_attention(const __nv_bfloat16* q, const __nv_bfloat16* k, const VHeads& v, const RowsView& out,
                            cudaStream_t stream);
// Raises the shared-memory limit of the attention kernels; called once per device before any launch.
void prepare_flash_attention();

}  // namespace fluxswap::cuda
