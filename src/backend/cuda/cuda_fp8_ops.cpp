// The FP8 ops of the CUDA backend: per-row e4m3 quantisation, the FP8 linear (activations quantised per token
// on the fly, cuBLASLt with per-row scales on both sides), its split form (a LayerNorm that writes the e4m3
// activations itself, and the linear that takes them), the batch of modulation linears in one launch, and the gated
// residual fused into the LayerNorm that follows it (bf16 and e4m3 outputs).
#include <algorithm>
#include <string>
#include <unordered_map>

#include "backend/cuda/cuda_backend.h"
#include "backend/cuda/fp8_gemv.h"
#include "backend/cuda/fp8_operands.h"
#include "backend/cuda/fp8_quant_kernels.h"

namespace fluxswap::cuda {

// linear_fp8_batch's item lists on the device, keyed by their contents (pointers, strides, sizes): a list issued
// once outside a recording is found again while recording, with no upload. Lists are packed into chunks, and none
// is ever freed or rewritten: a recorded graph keeps reading the copy it was captured with. (A list whose tensors
// moved is a new key; the old copy, a few KiB, stays.)
struct Fp8GemvLists {
  std::unordered_map<std::string, const Fp8GemvItem*> lists;
  std::vector<Tensor> chunks;
  size_t used = 0;  // bytes taken in the last chunk
};

namespace {

// Rows as one matrix: [B, N, C] whose batches follow each other at the row stride, or a single batch.
struct Matrix {
  const void* p;
  int64_t rows, ld;
};
Matrix as_matrix(const RowsView& r, const char* op, const char* what) {
  if (r.B != 1 && r.sb != r.N * r.sn) bad(op, std::string(what) + " rows must be evenly strided across the batch");
  return {r.p, r.B * r.N, r.sn};
}

// The e4m3 output of a LayerNorm that quantises (q, q_scale beside x's rows X), checked as the FP8 GEMM that reads
// it needs it.
Fp8RowsOut normed_fp8_out(const Tensor& x, const RowsView& X, const Tensor& q, const Tensor& q_scale, const char* op) {
  const Fp8RowsView Q = fp8_rows_view(q, op, "output");
  if (q.ndim() != x.ndim() || Q.B != X.B || Q.N != X.N || Q.C != X.C)
    bad(op, "output " + shape_str(q.shape()) + " does not match the input " + shape_str(x.shape()));
  if (Q.sn % 16 || Q.sb % 16 || reinterpret_cast<uintptr_t>(Q.p) % 16)
    bad(op, "the output must be 16-byte aligned with row and batch strides multiples of 16 (FP8 GEMM operands)");
  check_row_scales(q_scale, X.B * X.N, op, "output scales");
  return {Q.p, Q.sb, Q.sn, q_scale.ptr<float>()};
}

// The device copy of a descriptor list: found, or uploaded (outside recordings only) into fresh chunk bytes, which no
// launch in flight reads.
template <class Alloc>
const Fp8GemvItem* device_list(Fp8GemvLists& cache, const std::vector<Fp8GemvItem>& descs, bool capturing,
                               Alloc&& alloc, cudaStream_t stream, const char* op) {
  const size_t bytes = descs.size() * sizeof(Fp8GemvItem);
  std::string key(reinterpret_cast<const char*>(descs.data()), bytes);
  if (auto it = cache.lists.find(key); it != cache.lists.end()) return it->second;
  if (capturing) bad(op, "a new list of items was first issued while recording; run it once before record()");
  constexpr size_t kChunkBytes = 64 * 1024;
  if (cache.chunks.empty() || cache.used + bytes > size_t(cache.chunks.back().nbytes())) {
    cache.chunks.push_back(alloc(int64_t(std::max(kChunkBytes, bytes))));
    cache.used = 0;
  }
  auto* dst = reinterpret_cast<Fp8GemvItem*>(static_cast<char*>(cache.chunks.back().data()) + cache.used);
  // From pageable memory: the call returns once the list is staged, so `descs` may go.
  check(cudaMemcpyAsync(dst, descs.data(), bytes, cudaMemcpyHostToDevice, stream), op, "cudaMemcpyAsync");
  cache.used += (bytes + 255) / 256 * 256;
  cache.lists.emplace(std::move(key), dst);
  return dst;
}

}  // namespace

void CudaBackend::layer_norm_modulate_fp8(const Tensor& x, const Tensor& shift, const Tensor& scale, const Tensor& q,
                                          const Tensor& q_scale) {
  const char* op = "layer_norm_modulate_fp8";
  const RowsView X = rows_of(x, op, "input");
  const VecsView Sh = vecs_of(shift, op, "shift"), Sc = vecs_of(scale, op, "scale");
  check_vecs_fit(Sh, X, op, "shift");
  check_vecs_fit(Sc, X, op, "scale");
  const Fp8RowsOut out = normed_fp8_out(x, X, q, q_scale, op);
  timed(op, [&] { launch_layer_norm_modulate_fp8(X, Sh, Sc, out, stream()); });
}

void CudaBackend::linear_fp8_quantized(const Tensor& xq, const Tensor& x_scale, const Tensor& wq,
                                       const Tensor& w_scale, const Tensor& bias, const Tensor& y, Activation act) {
  const char* op = "linear_fp8_quantized";
  const Fp8RowsView X = fp8_rows_view(xq, op, "input");
  const RowsView Y = rows_of(y, op, "output");
  const int64_t K = X.C, nout = wq.size(0);
  check_fp8_quantized_product(X, xq, x_scale, wq, w_scale, bias, Y, y, op);
  CublasLtFp8Linear& gemm = fp8_gemm(fp8_, memory_, fp8_fast_accum_, capturing_, op);
  // One product over all rows when the batches follow each other at the row stride on both sides; else one per
  // batch (a stream's rows inside the [B, text + image, D] buffer).
  const bool one = X.B == 1 || (X.sb == X.N * X.sn && Y.sb == Y.N * Y.sn);
  const int64_t parts = one ? 1 : X.B, rows = one ? X.B * X.N : X.N;
  const GemmEpilogue epilogue = epilogue_for(bias, act);
  timed(gemm_key(profiler_.enabled(), op, X.B * X.N, nout, K).c_str(), [&] {
    for (int64_t b = 0; b < parts; ++b)
      gemm.run({X.p + b * X.sb, X.sn, x_scale.ptr<float>() + b * X.N}, {wq.data(), wq.stride(0), w_scale.ptr<float>()},
               bias.data(), Y.p + b * Y.sb, Y.sn, rows, K, nout, epilogue, capturing_, stream(), op);
    if (act == Activation::Silu || act == Activation::QuickGelu) launch_activation(Y, act, Y, stream());
  });
}

std::pair<uint8_t*, float*> CudaBackend::fp8_activation_buffer(int64_t rows, int64_t ldq, const char* op) {
  if (fp8_act_.empty() || fp8_act_.back().numel() < rows * ldq || fp8_act_scale_.back().numel() < rows) {
    if (capturing_) bad(op, "a recording needs larger FP8 activation buffers: run the work once eagerly first");
    fp8_act_.push_back(empty(DType::F8_E4M3, {rows * ldq}));
    fp8_act_scale_.push_back(empty(DType::F32, {rows}));
  }
  return {static_cast<uint8_t*>(fp8_act_.back().data()), fp8_act_scale_.back().ptr<float>()};
}

void CudaBackend::quantize_fp8_rows(const Tensor& x, const Tensor& q, const Tensor& scale) {
  const char* op = "quantize_fp8_rows";
  const Matrix X = as_matrix(rows_of(x, op, "input"), op, "input");
  check_fp8_rows(q, scale, x.size(-1), op, "output");
  if (q.size(0) != X.rows) bad(op, "output must have the input's " + std::to_string(X.rows) + " rows");
  timed(op, [&] {
    launch_quantize_rows_e4m3(static_cast<const __nv_bfloat16*>(X.p), X.ld, X.rows, x.size(-1),
                              static_cast<uint8_t*>(q.data()), q.stride(0), scale.ptr<float>(), stream(), op);
  });
}

void CudaBackend::quantize_fp8_rows_joined(const Tensor& a8, const Tensor& a_scale, const Tensor& b, const Tensor& q,
                                           const Tensor& scale) {
  const char* op = "quantize_fp8_rows_joined";
  const Fp8RowsView A = fp8_rows_view(a8, op, "a8");
  if (A.B != 1 && A.sb != A.N * A.sn) bad(op, "a8 rows must be evenly strided across the batch");
  const Matrix Bm = as_matrix(rows_of(b, op, "b"), op, "b");
  const int64_t rows = A.B * A.N, ca = A.C, cb = b.size(-1);
  if (Bm.rows != rows) bad(op, "b has " + std::to_string(Bm.rows) + " rows, a8 " + std::to_string(rows));
  check_row_scales(a_scale, rows, op, "a_scale");
  check_fp8_rows(q, scale, ca + cb, op, "output");
  if (q.size(0) != rows) bad(op, "output must have " + std::to_string(rows) + " rows");
  timed(op, [&] {
    launch_quantize_joined_rows_e4m3(A.p, A.sn, a_scale.ptr<float>(), ca, static_cast<const __nv_bfloat16*>(Bm.p),
                                     Bm.ld, cb, rows, static_cast<uint8_t*>(q.data()), q.stride(0),
                                     scale.ptr<float>(), stream(), op);
  });
}

void CudaBackend::set_fp8_fast_accumulation(bool on) {
  if (on == fp8_fast_accum_) return;
  if (capturing_) bad("set_fp8_fast_accumulation", "cannot change while recording");
  fp8_fast_accum_ = on;
  fp8_.reset();  // plans are made with the option
}

void CudaBackend::linear_fp8(const Tensor& x, const Tensor& wq, const Tensor& w_scale, const Tensor& bias,
                             const Tensor& y, Activation act) {
  const char* op = "linear_fp8";
  const RowsView X = rows_of(x, op, "input"), Y = rows_of(y, op, "output");
  const int64_t K = X.C, nout = wq.size(0);
  check_fp8_rows(wq, w_scale, K, op, "weight");
  if (Y.C != nout || X.B != Y.B || X.N != Y.N)
    bad(op, shape_str(x.shape()) + " x " + shape_str(wq.shape()) + "^T -> " + shape_str(y.shape()));
  check_bias(bias, nout, op);
  fp8_gemm(fp8_, memory_, fp8_fast_accum_, capturing_, op);
  // A few rows (the modulation linears' conditioning vectors): stream the weights instead of tiling a GEMM.
  // (linear_fp8_batch sends exactly the items that pass this test to the same kernel.)
  const bool gemv = act == Activation::None && (X.B == 1 || X.sb == X.N * X.sn) && (Y.B == 1 || Y.sb == Y.N * Y.sn) &&
                    cuda::fp8_gemv_fits(X.B * X.N, K) && cuda::fp8_gemv_weights_ok(wq.data(), wq.stride(0)) &&
                    cuda::fp8_gemv_input_ok(X.p, X.sn);
  if (gemv) {
    timed("linear_fp8 gemv", [&] {
      cuda::launch_fp8_gemv(X.p, X.sn, X.B * X.N, K, static_cast<const uint8_t*>(wq.data()), wq.stride(0),
                            w_scale.ptr<float>(), bias.defined() ? bias.ptr<__nv_bfloat16>() : nullptr, nout, Y.p,
                            Y.sn, stream());
    });
    return;
  }
  // One product over all rows when the batches follow each other at the row stride on both sides; else one per
  // batch (a stream's rows inside the [B, text + image, D] buffer).
  const bool one = X.B == 1 || (X.sb == X.N * X.sn && Y.sb == Y.N * Y.sn);
  const int64_t parts = one ? 1 : X.B, rows = one ? X.B * X.N : X.N;
  const int64_t ldq = fp8_activation_stride(K);
  const auto [q, sx] = fp8_activation_buffer(rows, ldq, op);
  const cuda::GemmEpilogue epilogue = epilogue_for(bias, act);
  const std::string key = gemm_key(profiler_.enabled(), op, X.B * X.N, nout, K);
  timed(key.c_str(), [&] {
    for (int64_t b = 0; b < parts; ++b) {
      const __nv_bfloat16* xb = X.p + b * X.sb;
      launch_quantize_rows_e4m3(xb, X.sn, rows, K, q, ldq, sx, stream(), op);
      fp8_->run({q, ldq, sx}, {wq.data(), wq.stride(0), w_scale.ptr<float>()}, bias.data(), Y.p + b * Y.sb, Y.sn,
                rows, K, nout, epilogue, capturing_, stream(), op);
    }
    if (act == Activation::Silu || act == Activation::QuickGelu) cuda::launch_activation(Y, act, Y, stream());
  });
}

// Items the GEMV kernel takes go into one launch; the others (misaligned weights, or an input it does not take) run
// as linear_fp8 would run them anyway.
void CudaBackend::linear_fp8_batch(const Tensor& x, const std::vector<Fp8LinearItem>& items) {
  const char* op = "linear_fp8_batch";
  if (x.ndim() != 2) bad(op, "input must be [B, K], got " + shape_str(x.shape()));
  const RowsView X = rows_of(x, op, "input");
  const int64_t rows = X.N, K = X.C;
  const bool kernel = fp8_gemv_fits(rows, K) && fp8_gemv_input_ok(X.p, X.sn);
  std::vector<Fp8GemvItem> descs;
  std::vector<const Fp8LinearItem*> others;
  int64_t tiles = 0;
  for (const Fp8LinearItem& it : items) {
    check_fp8_rows(it.wq, it.w_scale, K, op, "weight");
    const int64_t nout = it.wq.size(0);
    if (it.y.ndim() != 2) bad(op, "outputs must be [B, nout] views, got " + shape_str(it.y.shape()));
    const RowsView Y = rows_of(it.y, op, "output");
    if (Y.N != rows || Y.C != nout)
      bad(op, shape_str(x.shape()) + " x " + shape_str(it.wq.shape()) + "^T -> " + shape_str(it.y.shape()));
    check_bias(it.bias, nout, op);
    if (!kernel || !fp8_gemv_weights_ok(it.wq.data(), it.wq.stride(0))) {
      others.push_back(&it);
      continue;
    }
    if (nout == 0) continue;
    descs.push_back({static_cast<const uint8_t*>(it.wq.data()), it.wq.stride(0), it.w_scale.ptr<float>(),
                     it.bias.defined() ? it.bias.ptr<__nv_bfloat16>() : nullptr, Y.p, Y.sn, nout, tiles});
    tiles += fp8_gemv_tiles(nout);
  }
  if (rows == 0) return;
  if (!descs.empty()) {
    if (!fp8_gemv_lists_) fp8_gemv_lists_ = std::make_shared<Fp8GemvLists>();
    const Fp8GemvItem* list = device_list(
        *fp8_gemv_lists_, descs, capturing_, [&](int64_t n) { return empty(DType::U8, {n}); }, stream(), op);
    timed(op, [&] { launch_fp8_gemv_batch(X.p, X.sn, rows, K, list, int64_t(descs.size()), tiles, stream()); });
  }
  for (const Fp8LinearItem* it : others) linear_fp8(x, it->wq, it->w_scale, it->bias, it->y, Activation::None);
}

void CudaBackend::gated_residual_layer_norm_modulate(const Tensor& x, const Tensor& gate, const Tensor& y,
                                                     const Tensor& shift, const Tensor& scale, const Tensor& normed) {
  const char* op = "gated_residual_layer_norm_modulate";
  const RowsView X = rows_of(x, op, "residual"), Y = rows_of(y, op, "gated branch"), O = rows_of(normed, op, "output");
  const VecsView G = vecs_of(gate, op, "gate"), Sh = vecs_of(shift, op, "shift"), Sc = vecs_of(scale, op, "scale");
  check_same_rows(X, Y, op);
  check_same_rows(X, O, op);
  check_vecs_fit(G, X, op, "gate");
  check_vecs_fit(Sh, X, op, "shift");
  check_vecs_fit(Sc, X, op, "scale");
  timed(op, [&] { launch_gated_residual_layer_norm_modulate(X, G, Y, Sh, Sc, O, stream()); });
}

void CudaBackend::gated_residual_layer_norm_modulate_fp8(const Tensor& x, const Tensor& gate, const Tensor& y,
                                                         const Tensor& shift, const Tensor& scale, const Tensor& q,
                                                         const Tensor& q_scale) {
  const char* op = "gated_residual_layer_norm_modulate_fp8";
  const RowsView X = rows_of(x, op, "residual"), Y = rows_of(y, op, "gated branch");
  const VecsView G = vecs_of(gate, op, "gate"), Sh = vecs_of(shift, op, "shift"), Sc = vecs_of(scale, op, "scale");
  check_same_rows(X, Y, op);
  check_vecs_fit(G, X, op, "gate");
  check_vecs_fit(Sh, X, op, "shift");
  check_vecs_fit(Sc, X, op, "scale");
  const Fp8RowsOut out = normed_fp8_out(x, X, q, q_scale, op);
  timed(op, [&] { launch_gated_residual_layer_norm_modulate_fp8(X, G, Y, Sh, Sc, out, stream()); });
}

}  // namespace fluxswap::cuda
