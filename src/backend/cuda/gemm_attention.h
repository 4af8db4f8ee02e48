#pragma once
// attention_ex's implementation: softmax(scale q k^T + bias [+ causal mask]) v as two cuBLASLt products around a
// softmax kernel, for any head dim (the VAE's single 512-wide head included), with the scores materialised.
//
// Scores are float32 (bf16 scores would shift exp() by up to ~0.4% of their magnitude); the probabilities are bf16,
// the operand type of the second product. To bound the scratch, the work runs in chunks: as many heads as fit a
// 256 MiB budget at 6 bytes per score, or, when one head's S x S scores alone exceed it (the VAE at S = 16384 would
// need 1.5 GiB), blocks of query rows of one head. Softmax is per row, so chunking changes no result.
#include <cuda_runtime.h>

#include "backend/cuda/cublaslt_linear.h"
#include "backend/cuda/kernels.h"

namespace fluxswap::cuda {

struct AttentionExArgs {
  const __nv_bfloat16 *q, *k, *v;  // contiguous [B, H, S, D]
  int64_t B, H, S, D;
  float scale;
  const float* bias;  // float32 [H, S, S] or null
  bool causal;
  RowsView out;  // [B, S, H*D]
};

// Every GEMM plan and the scratch are made on the first call of a shape, which must not be inside a recording.
void gemm_attention(CublasLtLinear& gemm, const AttentionExArgs& a, bool capturing, cudaStream_t stream);

}  // namespace fluxswap::cuda
