#include <mma.h>

#include <string>

#include "backend/cuda/cuda_check.h"
#include "backend/cuda/nf4_kernels.h"

namespace fluxswap::cuda {

namespace {

[[noreturn]] void bad_arg(const char* op, const std::string& why) {
  throw Error(std::string("cuda backend: ") + op + ": " + why);
}

void check_matrix(const Nf4Matrix& w, const char* op) {
  if (w.rows < 1 || w.cols < 1)
    bad_arg(op, "NF4 matrix [" + std::to_string(w.rows) + ", " + std::to_string(w.cols) + "] is empty");
  if (!w.packed) bad_arg(op, "NF4 packed codes are null");
  if (w.blocksize < 32 || w.blocksize > 4096 || (w.blocksize & (w.blocksize - 1)))
    bad_arg(op, "NF4 blocksize " + std::to_string(w.blocksize) + " is not a power of two from 32 to 4096");
  const bool nested = w.absmax_q || w.nested_absmax || w.nested_code;
  if (w.absmax && nested) bad_arg(op, "NF4 matrix has both a float32 absmax and a nested one");
  if (!w.absmax && !(w.absmax_q && w.nested_absmax && w.nested_code))
    bad_arg(op, "NF4 matrix needs a float32 absmax, or all three parts of a nested one");
  if (nested && w.nested_blocksize < 1) bad_arg(op, "NF4 nested blocksize must be positive");
}

// The float32 absmax of block b, computed exactly as the CPU reference does (two roundings, no FMA).
__device__ __forceinline__ float block_absmax(const Nf4Matrix& w, int64_t b) {
  if (w.absmax) return w.absmax[b];
  const float c = w.nested_code[w.absmax_q[b]];
  return __fadd_rn(__fmul_rn(c, w.nested_absmax[b / w.nested_blocksize]), w.nested_offset);
}

// One packed byte -> its two values (high nibble first) as a bf16 pair.
__device__ __forceinline__ __nv_bfloat162 decode_byte(uint32_t byte, float absmax, const float* code) {
  return __halves2bfloat162(__float2bfloat16_rn(__fmul_rn(code[(byte >> 4) & 0xF], absmax)),
                            __float2bfloat16_rn(__fmul_rn(code[byte & 0xF], absmax)));
}

// The quant map in shared memory: indexing a kernel parameter with a per-thread value would go through local memory.
__device__ __forceinline__ void load_code(const Nf4Matrix& w, float* s_code) {
  if (threadIdx.x < 16) s_code[threadIdx.x] = w.code[threadIdx.x];
  __syncthreads();
}

constexpr int kDequantThreads = 256;

// 16 elements (8 packed bytes) per step: they lie in one row (cols % 16 == 0) and in one block (blocks are
// powers of two >= 32), so one absmax and two 16-byte stores serve them.
__global__ void __launch_bounds__(kDequantThreads)
    nf4_dequantize16_kernel(Nf4Matrix w, __nv_bfloat16* out, int64_t ld, int64_t chunks) {
  __shared__ float s_code[16];
  load_code(w, s_code);
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < chunks; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t e = i * 16;
    const uint2 raw = reinterpret_cast<const uint2*>(w.packed)[i];
    const float a = block_absmax(w, e / w.blocksize);
    uint4 o[2];
    __nv_bfloat162* h = reinterpret_cast<__nv_bfloat162*>(o);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      h[j] = decode_byte(raw.x >> (8 * j), a, s_code);
      h[4 + j] = decode_byte(raw.y >> (8 * j), a, s_code);
    }
    const int64_t r = e / w.cols, c = e - r * w.cols;
    uint4* dst = reinterpret_cast<uint4*>(out + r * ld + c);
    dst[0] = o[0];
    dst[1] = o[1];
  }
}

// Any shape and alignment: one packed byte per step, each element placed on its own.
__global__ void __launch_bounds__(kDequantThreads)
    nf4_dequantize_any_kernel(Nf4Matrix w, __nv_bfloat16* out, int64_t ld, int64_t n) {
  __shared__ float s_code[16];
  load_code(w, s_code);
  const int64_t bytes = (n + 1) / 2;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < bytes; i += int64_t(gridDim.x) * blockDim.x) {
    const uint32_t byte = w.packed[i];
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int64_t e = 2 * i + half;
      if (e >= n) break;
      const uint32_t q = half == 0 ? byte >> 4 : byte & 0xF;
      const float v = __fmul_rn(s_code[q], block_absmax(w, e / w.blocksize));
      const int64_t r = e / w.cols, c = e - r * w.cols;
      out[r * ld + c] = __float2bfloat16_rn(v);
    }
  }
}

unsigned grid_for(int64_t work, int threads) {
  const int64_t blocks = (work + threads - 1) / threads;
  return unsigned(blocks < 1 ? 1 : blocks > (1 << 20) ? (1 << 20) : blocks);
}

bool aligned(const void* p, size_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

// ---- fused dequantise + GEMM ----
// A block computes a 64 (tokens) x 64 (outputs) tile of y with 4 warps, each a 32 x 32 quarter as 2 x 2 wmma
// fragments. Per 64-wide K step it stages x's tile and W's tile (dequantised to bf16 on the way) in shared memory;
// the next step's global loads are issued into registers before this step's MMAs, so they overlap.
constexpr int kBM = 64, kBN = 64, kBK = 64;
constexpr int kLds = kBK + 8;  // bf16 row pitch of the staged tiles: 144 bytes, so ldmatrix rows spread over banks
constexpr int kLdc = kBN + 4;  // float pitch of the output staging
constexpr int kGemmThreads = 128;
constexpr int kStageBytes = 2 * kBM * kLds * 2;
constexpr int kOutBytes = kBM * kLdc * 4;
constexpr int kSmemBytes = kStageBytes > kOutBytes ? kStageBytes : kOutBytes;

struct TileRegs {
  uint4 a[4];  // x: 64 rows x 8 chunks of 8 bf16, four chunks per thread
  uint4 b;     // W: 64 rows x 2 halves of 32 codes (16 bytes), one half-row per thread
  float absmax;
  bool b_valid;
};

__device__ __forceinline__ void load_tile(const Nf4Matrix& w, const __nv_bfloat16* x, int64_t ldx, int64_t T,
                                          int64_t m0, int64_t n0, int64_t k0, TileRegs& r) {
  const int tid = threadIdx.x;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int idx = tid + i * kGemmThreads, row = idx >> 3, chunk = idx & 7;
    const int64_t m = m0 + row;
    r.a[i] = m < T ? *reinterpret_cast<const uint4*>(x + m * ldx + k0 + chunk * 8) : make_uint4(0, 0, 0, 0);
  }
  const int row = tid >> 1, half = tid & 1;
  const int64_t n = n0 + row;
  r.b_valid = n < w.rows;
  if (r.b_valid) {
    // 32 consecutive elements starting at a multiple of 32: one absmax block.
    const int64_t e = n * w.cols + k0 + half * 32;
    r.b = *reinterpret_cast<const uint4*>(w.packed + e / 2);
    r.absmax = block_absmax(w, e / w.blocksize);
  }
}

__device__ __forceinline__ void store_tile(const TileRegs& r, __nv_bfloat16* As, __nv_bfloat16* Bs,
                                           const float* s_code) {
  const int tid = threadIdx.x;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int idx = tid + i * kGemmThreads, row = idx >> 3, chunk = idx & 7;
    *reinterpret_cast<uint4*>(As + row * kLds + chunk * 8) = r.a[i];
  }
  const int row = tid >> 1, half = tid & 1;
  uint4 o[4] = {};
  if (r.b_valid) {
    __nv_bfloat162* h = reinterpret_cast<__nv_bfloat162*>(o);
    const uint32_t words[4] = {r.b.x, r.b.y, r.b.z, r.b.w};
#pragma unroll
    for (int j = 0; j < 16; ++j) h[j] = decode_byte(words[j / 4] >> (8 * (j % 4)), r.absmax, s_code);
  }
  uint4* dst = reinterpret_cast<uint4*>(Bs + row * kLds + half * 32);
#pragma unroll
  for (int j = 0; j < 4; ++j) dst[j] = o[j];
}

__global__ void __launch_bounds__(kGemmThreads)
    nf4_fused_gemm_kernel(Nf4Matrix w, const __nv_bfloat16* x, int64_t ldx, int64_t T, __nv_bfloat16* y,
                          int64_t ldy) {
  namespace wmma = nvcuda::wmma;
  __shared__ __align__(128) unsigned char smem[kSmemBytes];
  __shared__ float s_code[16];
  auto* As = reinterpret_cast<__nv_bfloat16*>(smem);
  __nv_bfloat16* Bs = As + kBM * kLds;
  auto* Cs = reinterpret_cast<float*>(smem);  // reused once the K loop is done

  const int64_t m0 = int64_t(blockIdx.y) * kBM, n0 = int64_t(blockIdx.x) * kBN;
  const int warp = threadIdx.x / 32, wm = warp / 2, wn = warp % 2;

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][2];
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.0f);

  TileRegs regs;
  load_tile(w, x, ldx, T, m0, n0, 0, regs);
  load_code(w, s_code);
  for (int64_t k0 = 0; k0 < w.cols; k0 += kBK) {
    store_tile(regs, As, Bs, s_code);
    __syncthreads();
    if (k0 + kBK < w.cols) load_tile(w, x, ldx, T, m0, n0, k0 + kBK, regs);
#pragma unroll
    for (int kk = 0; kk < kBK; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major> fa[2];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::col_major> fb[2];
#pragma unroll
      for (int i = 0; i < 2; ++i) wmma::load_matrix_sync(fa[i], As + (wm * 32 + i * 16) * kLds + kk, kLds);
      // W's tile is stored [n][k]: as the K x N operand that is column-major.
#pragma unroll
      for (int j = 0; j < 2; ++j) wmma::load_matrix_sync(fb[j], Bs + (wn * 32 + j * 16) * kLds + kk, kLds);
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
    }
    __syncthreads();
  }

#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j)
      wmma::store_matrix_sync(Cs + (wm * 32 + i * 16) * kLdc + wn * 32 + j * 16, acc[i][j], kLdc,
                              wmma::mem_row_major);
  __syncthreads();
  for (int idx = threadIdx.x; idx < kBM * kBN; idx += kGemmThreads) {
    const int row = idx / kBN, col = idx % kBN;
    const int64_t m = m0 + row, n = n0 + col;
    if (m < T && n < w.rows) y[m * ldy + n] = __float2bfloat16_rn(Cs[row * kLdc + col]);
  }
}

// The largest power of two (up to 256) dividing a pointer: what cuBLASLt may assume about its alignment.
uint32_t alignment_of(const void* p) {
  uint32_t a = 256;
  while (a > 1 && reinterpret_cast<uintptr_t>(p) % a) a /= 2;
  return a;
}

struct LtObjects {
  cublasLtMatmulDesc_t op = nullptr;
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, d = nullptr;
  cublasLtMatmulPreference_t pref = nullptr;
  ~LtObjects() {
    if (pref) cublasLtMatmulPreferenceDestroy(pref);
    if (d) cublasLtMatrixLayoutDestroy(d);
    if (b) cublasLtMatrixLayoutDestroy(b);
    if (a) cublasLtMatrixLayoutDestroy(a);
    if (op) cublasLtMatmulDescDestroy(op);
  }
};

}  // namespace

void launch_nf4_dequantize(const Nf4Matrix& w, __nv_bfloat16* out, int64_t ld_out, cudaStream_t stream) {
  const char* op = "nf4_dequantize";
  check_matrix(w, op);
  if (!out) bad_arg(op, "output is null");
  if (ld_out < w.cols)
    bad_arg(op, "output row stride " + std::to_string(ld_out) + " is below the " + std::to_string(w.cols) + " columns");
  const int64_t n = w.rows * w.cols;
  if (w.cols % 16 == 0 && ld_out % 8 == 0 && aligned(out, 16) && aligned(w.packed, 8)) {
    const int64_t chunks = n / 16;
    nf4_dequantize16_kernel<<<grid_for(chunks, kDequantThreads), kDequantThreads, 0, stream>>>(w, out, ld_out, chunks);
    check_launch(op, "nf4_dequantize16_kernel");
  } else {
    nf4_dequantize_any_kernel<<<grid_for((n + 1) / 2, kDequantThreads), kDequantThreads, 0, stream>>>(w, out, ld_out,
                                                                                                     n);
    check_launch(op, "nf4_dequantize_any_kernel");
  }
}

bool nf4_fused_gemm_supported(const Nf4Matrix& w, const __nv_bfloat16* x, int64_t ldx) {
  return w.cols % kBK == 0 && ldx % 8 == 0 && aligned(x, 16) && aligned(w.packed, 16);
}

void launch_nf4_fused_gemm(const Nf4Matrix& w, const __nv_bfloat16* x, int64_t ldx, int64_t T, __nv_bfloat16* y,
                           int64_t ldy, cudaStream_t stream) {
  const char* op = "nf4_fused_gemm";
  check_matrix(w, op);
  if (!x || !y) bad_arg(op, "x or y is null");
  if (T < 0) bad_arg(op, "negative token count");
  if (ldx < w.cols || ldy < w.rows) bad_arg(op, "row strides below the row widths");
  if (!nf4_fused_gemm_supported(w, x, ldx))
    bad_arg(op, "needs in_features % 64 == 0 (got " + std::to_string(w.cols) +
                    "), an x row stride % 8 == 0 and 16-byte aligned x and packed codes");
  if (T == 0) return;
  const int64_t tiles_m = (T + kBM - 1) / kBM;
  if (tiles_m > 65535) bad_arg(op, "too many tokens for one launch: " + std::to_string(T));
  const dim3 grid(unsigned((w.rows + kBN - 1) / kBN), unsigned(tiles_m));
  nf4_fused_gemm_kernel<<<grid, kGemmThreads, 0, stream>>>(w, x, ldx, T, y, ldy);
  check_launch(op, "nf4_fused_gemm_kernel");
}

void nf4_linear_cublaslt(cublasLtHandle_t handle, const Nf4Matrix& w, const __nv_bfloat16* x, int64_t ldx, int64_t T,
                         __nv_bfloat16* y, int64_t ldy, __nv_bfloat16* w_scratch, void* workspace,
                         size_t workspace_bytes, cudaStream_t stream) {
  const char* op = "nf4_linear";
  check_matrix(w, op);
  if (!handle || !x || !y || !w_scratch) bad_arg(op, "null handle, x, y or scratch");
  if (T < 0) bad_arg(op, "negative token count");
  if (ldx < w.cols || ldy < w.rows) bad_arg(op, "row strides below the row widths");
  if (T == 0) return;
  launch_nf4_dequantize(w, w_scratch, w.cols, stream);

  // Row-major y[T, out] = x[T, in] W^T is, column-major, y^T[out, T] = W[out, in] x^T: A = the scratch stored
  // [in, out] column-major (transposed), B = x stored [in, T], D = y stored [out, T].
  LtObjects lt;
  check(cublasLtMatmulDescCreate(&lt.op, CUBLAS_COMPUTE_32F, CUDA_R_32F), op, "cublasLtMatmulDescCreate");
  const cublasOperation_t trans_a = CUBLAS_OP_T, trans_b = CUBLAS_OP_N;
  check(cublasLtMatmulDescSetAttribute(lt.op, CUBLASLT_MATMUL_DESC_TRANSA, &trans_a, sizeof(trans_a)), op,
        "cublasLtMatmulDescSetAttribute(TRANSA)");
  check(cublasLtMatmulDescSetAttribute(lt.op, CUBLASLT_MATMUL_DESC_TRANSB, &trans_b, sizeof(trans_b)), op,
        "cublasLtMatmulDescSetAttribute(TRANSB)");
  check(cublasLtMatrixLayoutCreate(&lt.a, CUDA_R_16BF, uint64_t(w.cols), uint64_t(w.rows), w.cols), op,
        "cublasLtMatrixLayoutCreate(A)");
  check(cublasLtMatrixLayoutCreate(&lt.b, CUDA_R_16BF, uint64_t(w.cols), uint64_t(T), ldx), op,
        "cublasLtMatrixLayoutCreate(B)");
  check(cublasLtMatrixLayoutCreate(&lt.d, CUDA_R_16BF, uint64_t(w.rows), uint64_t(T), ldy), op,
        "cublasLtMatrixLayoutCreate(D)");
  check(cublasLtMatmulPreferenceCreate(&lt.pref), op, "cublasLtMatmulPreferenceCreate");
  const uint64_t ws = workspace ? workspace_bytes : 0;
  check(cublasLtMatmulPreferenceSetAttribute(lt.pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof(ws)), op,
        "cublasLtMatmulPreferenceSetAttribute(workspace)");
  const uint32_t align_a = alignment_of(w_scratch), align_b = alignment_of(x), align_d = alignment_of(y);
  check(cublasLtMatmulPreferenceSetAttribute(lt.pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &align_a,
                                             sizeof(align_a)),
        op, "cublasLtMatmulPreferenceSetAttribute(align A)");
  check(cublasLtMatmulPreferenceSetAttribute(lt.pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &align_b,
                                             sizeof(align_b)),
        op, "cublasLtMatmulPreferenceSetAttribute(align B)");
  for (auto attr : {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES})
    check(cublasLtMatmulPreferenceSetAttribute(lt.pref, attr, &align_d, sizeof(align_d)), op,
          "cublasLtMatmulPreferenceSetAttribute(align C/D)");
  cublasLtMatmulHeuristicResult_t result{};
  int found = 0;
  check(cublasLtMatmulAlgoGetHeuristic(handle, lt.op, lt.a, lt.b, lt.d, lt.d, lt.pref, 1, &result, &found), op,
        "cublasLtMatmulAlgoGetHeuristic");
  if (found < 1)
    bad_arg(op, "cuBLASLt has no algorithm for [" + std::to_string(T) + ", " + std::to_string(w.cols) + "] x [" +
                    std::to_string(w.rows) + ", " + std::to_string(w.cols) + "]^T");
  const float alpha = 1.0f, beta = 0.0f;
  check(cublasLtMatmul(handle, lt.op, &alpha, w_scratch, lt.a, x, lt.b, &beta, y, lt.d, y, lt.d, &result.algo,
                       workspace, ws, stream),
        op, "cublasLtMatmul");
}

}  // namespace fluxswap::cuda
