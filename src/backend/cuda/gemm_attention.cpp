#include "backend/cuda/gemm_attention.h"

#include <algorithm>

#include "backend/cuda/text_kernels.h"

namespace fluxswap::cuda {

namespace {

constexpr size_t kScratchBudget = size_t(256) << 20;
constexpr size_t kBytesPerScore = sizeof(float) + sizeof(__nv_bfloat16);

struct Chunking {
  int64_t heads, rows;
};

Chunking chunking(int64_t H, int64_t S) {
  const size_t head_bytes = size_t(S) * size_t(S) * kBytesPerScore;
  if (head_bytes <= kScratchBudget) return {std::min<int64_t>(H, int64_t(kScratchBudget / head_bytes)), S};
  int64_t rows = std::max<int64_t>(1, int64_t(kScratchBudget / (size_t(S) * kBytesPerScore)));
  if (rows > 64) rows -= rows % 64;  // whole GEMM tiles
  return {1, rows};
}

}  // namespace

void gemm_attention(CublasLtLinear& gemm, const AttentionExArgs& a, bool capturing, cudaStream_t stream) {
  const char* op = "attention_ex";
  const int64_t S = a.S, D = a.D;
  if (a.B * a.H * S * D == 0) return;
  const Chunking c = chunking(a.H, S);
  const size_t scores = size_t(c.heads * c.rows * S);
  // The probabilities follow the scores, 256-byte aligned.
  const size_t p_offset = (scores * sizeof(float) + 255) / 256 * 256;
  char* scratch = static_cast<char*>(gemm.scratch(p_offset + scores * sizeof(__nv_bfloat16), capturing, op));
  float* sc = reinterpret_cast<float*>(scratch);
  auto* p = reinterpret_cast<__nv_bfloat16*>(scratch + p_offset);

  for (int64_t b = 0; b < a.B; ++b)
    for (int64_t h0 = 0; h0 < a.H; h0 += c.heads)
      for (int64_t r0 = 0; r0 < S; r0 += c.rows) {
        const int64_t nh = std::min(c.heads, a.H - h0), nr = std::min(c.rows, S - r0);
        const int64_t head = (b * a.H + h0) * S * D;  // first head's offset in q, k, v
        // scores^T [S keys, nr queries] = k q^T per head: k is stored [D, S] column-major and transposed.
        Matmul qk;
        qk.trans_a = true;
        qk.m = S, qk.n = nr, qk.k = D, qk.batch = nh;
        qk.a = a.k + head, qk.lda = D, qk.stride_a = S * D;
        qk.b = a.q + head + r0 * D, qk.ldb = D, qk.stride_b = S * D;
        qk.d = sc, qk.ldd = S, qk.stride_d = nr * S;
        qk.f32_out = true;
        qk.alpha = a.scale;
        gemm.matmul(qk, capturing, stream, op);

        launch_attention_softmax({sc, a.bias ? a.bias + (h0 * S + r0) * S : nullptr, S * S, p, nh, nr, S, r0, a.causal},
                                 stream);

        // out^T [D, nr] = v^T P^T per head, into the head's column slice of the output rows (batch stride D).
        Matmul pv;
        pv.m = D, pv.n = nr, pv.k = S, pv.batch = nh;
        pv.a = a.v + head, pv.lda = D, pv.stride_a = S * D;
        pv.b = p, pv.ldb = S, pv.stride_b = nr * S;
        pv.d = a.out.p + b * a.out.sb + r0 * a.out.sn + h0 * D, pv.ldd = a.out.sn, pv.stride_d = D;
        gemm.matmul(pv, capturing, stream, op);
      }
}

}  // namespace fluxswap::cuda
