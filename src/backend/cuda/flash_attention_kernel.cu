// The built-in attention kernel, used when cuDNN is unavailable or refuses a shape: a FlashAttention-2 style
// kernel on mma.sync (bf16 in, float32 accumulation; sm_80 and newer). A block of 4 warps owns 64 query rows (16
// per warp) and streams 64-key tiles of K and V through double-buffered shared memory (cp.async), keeping the
// online-softmax state and the output accumulators in registers. Head dims up to 128 run in a kernel for the next
// padded size (32, 64 or 128), with the padding zero-filled.
#include <cmath>

#include "backend/cuda/cuda_check.h"
#include "backend/cuda/kernels.h"

namespace fluxswap::cuda {

namespace {

constexpr int kBlockM = 64, kBlockN = 64, kThreads = 128;

struct FlashParams {
  const __nv_bfloat16 *q, *k, *v;
  int64_t v_sb, v_sh, v_sn;  // v's strides: its own heads, or the v columns of qkv rows
  bool v_vec;                // v's rows allow 16-byte copies (q's and k's do where D % 8 == 0)
  __nv_bfloat16* out;
  int64_t out_sb, out_sn;
  int64_t H, S, D;
  float scale_log2;  // log2(e) / sqrt(D): the softmax runs in base 2
  bool out_pairs;    // output rows allow 4-byte stores of (d, d + 1)
};

__device__ inline uint32_t smem_u32(const void* p) { return static_cast<uint32_t>(__cvta_generic_to_shared(p)); }

// 16 bytes global -> shared; with valid = false nothing is read and the destination is zero-filled.
__device__ inline void cp_async16(void* dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(dst)), "l"(src),
               "r"(valid ? 16 : 0));
}
__device__ inline void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ inline void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

__device__ inline void ldmatrix_x4(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(p)));
}
__device__ inline void ldmatrix_x4_trans(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(p)));
}

// d += a (16x16, row-major fragment) * b (16x8, column-major fragment).
__device__ inline void mma_bf16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ inline uint32_t pack_bf16(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}

template <int DP>
constexpr int smem_stride() {
  return DP + 8;  // 16 bytes of padding per row: the 8 rows an ldmatrix reads fall in distinct banks
}
template <int DP>
constexpr size_t smem_bytes() {
  return size_t(5) * kBlockM * smem_stride<DP>() * sizeof(__nv_bfloat16);  // Q, K x 2, V x 2
}

// Rows row0 .. row0 + 64 of one head's [S, D] matrix (rows `ld` apart) into a [64, DP] tile; rows past S and
// columns past D are zero, so padded keys contribute nothing and padded dims add nothing to the dot products.
template <int DP>
__device__ inline void load_tile(__nv_bfloat16* tile, const __nv_bfloat16* g, int64_t row0, int64_t S, int64_t D,
                                 int64_t ld, bool vec) {
  constexpr int LDS = smem_stride<DP>();
  if (vec) {
    for (int i = threadIdx.x; i < kBlockM * DP / 8; i += kThreads) {
      const int r = i / (DP / 8), c = (i % (DP / 8)) * 8;
      const bool valid = row0 + r < S && c < D;
      cp_async16(tile + r * LDS + c, valid ? g + (row0 + r) * ld + c : g, valid);
    }
  } else {
    for (int i = threadIdx.x; i < kBlockM * DP; i += kThreads) {
      const int r = i / DP, c = i % DP;
      tile[r * LDS + c] = row0 + r < S && c < D ? g[(row0 + r) * ld + c] : __float2bfloat16_rn(0.0f);
    }
  }
}

template <int DP>
__global__ void __launch_bounds__(kThreads) flash_attention_kernel(FlashParams p) {
  constexpr int LDS = smem_stride<DP>(), TILE = kBlockM * LDS;
  extern __shared__ __align__(16) unsigned char smem[];
  __nv_bfloat16* sQ = reinterpret_cast<__nv_bfloat16*>(smem);
  __nv_bfloat16* sK = sQ + TILE;
  __nv_bfloat16* sV = sK + 2 * TILE;

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, t = lane % 4;  // mma fragment coordinates: row group and column pair
  const int64_t bh = blockIdx.y, b = bh / p.H, h = bh % p.H, S = p.S, D = p.D;
  const int64_t q0 = int64_t(blockIdx.x) * kBlockM;
  const __nv_bfloat16* Q = p.q + bh * S * D;
  const __nv_bfloat16* K = p.k + bh * S * D;
  const __nv_bfloat16* V = p.v + b * p.v_sb + h * p.v_sh;

  const bool qk_vec = D % 8 == 0;
  load_tile<DP>(sQ, Q, q0, S, D, D, qk_vec);
  load_tile<DP>(sK, K, 0, S, D, D, qk_vec);
  load_tile<DP>(sV, V, 0, S, D, p.v_sn, p.v_vec);
  cp_async_commit();

  uint32_t qf[DP / 16][4];
  float o[DP / 8][4];
#pragma unroll
  for (int i = 0; i < DP / 8; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.0f;
  // Rows g and g + 8 of this warp's 16: running max (scaled, base 2) and this thread's share of the sum.
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};

  const int64_t n_tiles = (S + kBlockN - 1) / kBlockN;
  for (int64_t j = 0; j < n_tiles; ++j) {
    const int buf = int(j & 1);
    if (j + 1 < n_tiles) {
      load_tile<DP>(sK + (buf ^ 1) * TILE, K, (j + 1) * kBlockN, S, D, D, qk_vec);
      load_tile<DP>(sV + (buf ^ 1) * TILE, V, (j + 1) * kBlockN, S, D, p.v_sn, p.v_vec);
    }
    cp_async_commit();
    cp_async_wait<1>();  // everything but the tile just issued has landed
    __syncthreads();
    if (j == 0) {
#pragma unroll
      for (int kk = 0; kk < DP / 16; ++kk)
        ldmatrix_x4(qf[kk], sQ + (warp * 16 + lane % 16) * LDS + kk * 16 + (lane / 16) * 8);
    }
    const __nv_bfloat16* k_s = sK + buf * TILE;
    const __nv_bfloat16* v_s = sV + buf * TILE;

    float s[kBlockN / 8][4];
#pragma unroll
    for (int nt = 0; nt < kBlockN / 8; ++nt) {
      s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.0f;
#pragma unroll
      for (int kk = 0; kk < DP / 16; kk += 2) {
        uint32_t kb[4];  // K rows are the columns of K^T: plain ldmatrix gives the col-major B fragments
        ldmatrix_x4(kb, k_s + (nt * 8 + lane % 8) * LDS + kk * 16 + (lane / 8) * 8);
        mma_bf16(s[nt], qf[kk], kb[0], kb[1]);
        mma_bf16(s[nt], qf[kk + 1], kb[2], kb[3]);
      }
    }

    const int64_t kv0 = j * kBlockN;
#pragma unroll
    for (int nt = 0; nt < kBlockN / 8; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e)
        s[nt][e] = kv0 + nt * 8 + 2 * t + (e & 1) < S ? s[nt][e] * p.scale_log2 : -INFINITY;

    // Every tile holds at least one real key, so the new max is finite and exp2 never sees inf - inf.
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float mx = m[r];
#pragma unroll
      for (int nt = 0; nt < kBlockN / 8; ++nt) mx = fmaxf(mx, fmaxf(s[nt][2 * r], s[nt][2 * r + 1]));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      const float alpha = exp2f(m[r] - mx);
      m[r] = mx;
      float sum = 0.0f;
#pragma unroll
      for (int nt = 0; nt < kBlockN / 8; ++nt) {
        s[nt][2 * r] = exp2f(s[nt][2 * r] - mx);
        s[nt][2 * r + 1] = exp2f(s[nt][2 * r + 1] - mx);
        sum += s[nt][2 * r] + s[nt][2 * r + 1];
      }
      l[r] = l[r] * alpha + sum;
#pragma unroll
      for (int dt = 0; dt < DP / 8; ++dt) {
        o[dt][2 * r] *= alpha;
        o[dt][2 * r + 1] *= alpha;
      }
    }

    // The S accumulators of two adjacent key tiles are exactly the A fragment of P for one 16-key chunk.
#pragma unroll
    for (int kc = 0; kc < kBlockN / 16; ++kc) {
      const uint32_t pa[4] = {pack_bf16(s[2 * kc][0], s[2 * kc][1]), pack_bf16(s[2 * kc][2], s[2 * kc][3]),
                              pack_bf16(s[2 * kc + 1][0], s[2 * kc + 1][1]),
                              pack_bf16(s[2 * kc + 1][2], s[2 * kc + 1][3])};
#pragma unroll
      for (int dt = 0; dt < DP / 8; dt += 2) {
        uint32_t vb[4];  // V is [key, d] row-major: the transposing ldmatrix gives its col-major B fragments
        ldmatrix_x4_trans(vb, v_s + (kc * 16 + lane % 8 + ((lane / 8) % 2) * 8) * LDS + dt * 8 + (lane / 16) * 8);
        mma_bf16(o[dt], pa, vb[0], vb[1]);
        mma_bf16(o[dt + 1], pa, vb[2], vb[3]);
      }
    }
    __syncthreads();  // the next iteration refills the buffer read here
  }

#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float sum = l[r];
    sum += __shfl_xor_sync(0xffffffffu, sum, 1);
    sum += __shfl_xor_sync(0xffffffffu, sum, 2);
    const float inv = 1.0f / sum;
    const int64_t qi = q0 + warp * 16 + g + 8 * r;
    if (qi >= S) continue;
    __nv_bfloat16* orow = p.out + b * p.out_sb + qi * p.out_sn + h * D;
#pragma unroll
    for (int dt = 0; dt < DP / 8; ++dt) {
      const int64_t d = dt * 8 + 2 * t;
      const float v0 = o[dt][2 * r] * inv, v1 = o[dt][2 * r + 1] * inv;
      if (p.out_pairs && d + 1 < D) {
        *reinterpret_cast<__nv_bfloat162*>(orow + d) = __floats2bfloat162_rn(v0, v1);
      } else {
        if (d < D) orow[d] = __float2bfloat16_rn(v0);
        if (d + 1 < D) orow[d + 1] = __float2bfloat16_rn(v1);
      }
    }
  }
}

template <int DP>
void launch(const FlashParams& p, int64_t B, cudaStream_t stream) {
  const dim3 grid(unsigned((p.S + kBlockM - 1) / kBlockM), unsigned(B * p.H));
  flash_attention_kernel<DP><<<grid, kThreads, smem_bytes<DP>(), stream>>>(p);
}

}  // namespace

void prepare_flash_attention() {
  check(cudaFuncSetAttribute(flash_attention_kernel<32>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             int(smem_bytes<32>())),
        "attention", "cudaFuncSetAttribute");
  check(cudaFuncSetAttribute(flash_attention_kernel<64>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             int(smem_bytes<64>())),
        "attention", "cudaFuncSetAttribute");
  check(cudaFuncSetAttribute(flash_attention_kernel<128>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             int(smem_bytes<128>())),
        "attention", "cudaFuncSetAttribute");
}

void launch_flash_attention(const __nv_bfloat16* q, const __nv_bfloat16* k, const VHeads& v, const RowsView& out,
                            cudaStream_t stream) {
  const int64_t B = v.B, H = v.H, S = v.S, D = v.D;
  if (D < 1 || D > 128)
    fail("attention", "flash_attention_kernel", "head_dim must be 1..128, got " + std::to_string(D));
  if (B * H == 0 || S == 0) return;
  if (B * H > 65535) fail("attention", "flash_attention_kernel", "batch x heads must be at most 65535");
  const bool pairs = D % 2 == 0 && out.sb % 2 == 0 && out.sn % 2 == 0 && reinterpret_cast<uintptr_t>(out.p) % 4 == 0;
  const bool v_vec =
      D % 8 == 0 && v.sb % 8 == 0 && v.sh % 8 == 0 && v.ss % 8 == 0 && reinterpret_cast<uintptr_t>(v.p) % 16 == 0;
  const FlashParams p{q, k, v.p, v.sb, v.sh, v.ss, v_vec, out.p, out.sb, out.sn, H, S, D,
                      float(M_LOG2E / std::sqrt(double(D))), pairs};
  if (D <= 32)
    launch<32>(p, B, stream);
  else if (D <= 64)
    launch<64>(p, B, stream);
  else
    launch<128>(p, B, stream);
  check_launch("attention", "flash_attention_kernel");
}

}  // namespace fluxswap::cuda
