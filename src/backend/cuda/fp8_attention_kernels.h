#pragma once
// The kernels around cuDNN's FP8 attention (Backend::attention_fp8): v to e4m3 at the scale its max |v| gives, the
// scalars cuDNN reads (descales of q, k, v, probabilities, the output's scale) written on the device so nothing
// waits on the host, and the e4m3 output back to bf16 rows.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "backend/cuda/kernels.h"

namespace fluxswap::cuda {

// The float32 scalars one FP8 attention reads and writes, in one device array.
enum Fp8AttentionSlot : int {
  kDescaleQ, kDescaleK, kDescaleV, kDescaleS, kScaleS, kScaleO, kAmaxS, kAmaxO, kDescaleO, kFp8AttentionSlots
};

// v8 (contiguous [B, H, S, D]) = e4m3(v * 448 / max(*v_amax, floor)) (16-byte loads when D and the strides are
// multiples of 8 and v is 16-byte aligned, else one value at a time); the first thread also fills `slots` (q and k
// descales 1 / qk_scale).
void launch_quantize_v_e4m3(const VHeads& v, uint8_t* v8, const float* v_amax, float qk_scale, float* slots,
                            cudaStream_t stream);

// out rows [B, S, H*D] (bf16) = e4m3 o8 (contiguous [B, S, H*D]) * slots[kDescaleO]; then *v_amax = 0, the state
// the next layer's qk_norm_rope_fp8 starts from.
void launch_dequantize_attention_e4m3(const uint8_t* o8, const float* slots, float* v_amax, const RowsView& out,
                                      cudaStream_t stream);

// out_scale[0 .. rows) = slots[kDescaleO] (cuDNN's e4m3 output kept as the FP8 input of a linear: one scale per row,
// all the same); then *v_amax = 0, as the dequantisation leaves it.
void launch_output_scales(const float* slots, float* v_amax, float* out_scale, int64_t rows, cudaStream_t stream);

}  // namespace fluxswap::cuda
