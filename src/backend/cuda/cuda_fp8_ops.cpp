// The FP8 ops of the CUDA backend: per-row e4m3 quantisation, the FP8 linear (activations quantised per token
// on the fly, cuBLASLt with per-row scales on both sides), its split form (a LayerNorm that writes the e4m3
// activations itself, and the linear that takes them), a block's gated output projection added onto the residual
// inside its GEMM, the batch of modulation linears in one launch, and the gated residual fused into the LayerNorm
// that follows it (bf16 and e4m3 outputs).
#include <algorithm>
#include <cstdlib>
#include <functional>
#include <string>
#include <unordered_map>

#include "backend/cuda/cuda_backend.h"
#include "backend/cuda/fp8_gemv.h"
#include "backend/cuda/fp8_quant_kernels.h"

namespace fluxswap::cuda {

// Item lists of batched launches (linear_fp8_batch, gated_output_factors) on the device, keyed by their kind and
// contents (pointers, strides, sizes): a list issued once outside a recording is found again while recording, with
// no upload. Lists are packed into chunks, and none is ever freed or rewritten: a recorded graph keeps reading the
// copy it was captured with. (A list whose tensors moved is a new key; the old copy, a few KiB, stays.)
struct DeviceItemLists {
  std::unordered_map<std::string, const void*> lists;
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

void check_fp8_rows(const Tensor& q, const Tensor& scale, int64_t cols, const char* op, const char* what) {
  check_cuda_tensor(q, op, what, DType::F8_E4M3);
  if (q.ndim() != 2 || q.size(1) != cols || q.stride(1) != 1)
    bad(op, std::string(what) + " must be [rows, " + std::to_string(cols) + "] with contiguous rows, got " +
                shape_str(q.shape()));
  check_cuda_tensor(scale, op, "scales", DType::F32);
  if (scale.ndim() != 1 || scale.size(0) != q.size(0) || !scale.is_contiguous())
    bad(op, "scales must be F32 [" + std::to_string(q.size(0)) + "], got " + shape_str(scale.shape()));
}

// e4m3 rows [B, N, C] on the device ([rows, C] is one batch), contiguous last dimension; strides in bytes.
struct Fp8RowsView {
  uint8_t* p;
  int64_t B, N, C, sb, sn;
};
Fp8RowsView fp8_rows_view(const Tensor& t, const char* op, const char* what) {
  check_cuda_tensor(t, op, what, DType::F8_E4M3);
  if ((t.ndim() != 2 && t.ndim() != 3) || t.stride(-1) != 1)
    bad(op, std::string(what) + " must be 2-D or 3-D e4m3 rows with a contiguous last dimension, got " +
                shape_str(t.shape()));
  auto* p = static_cast<uint8_t*>(t.data());
  if (t.ndim() == 3) return {p, t.size(0), t.size(1), t.size(2), t.size(0) == 1 ? 0 : t.stride(0), t.stride(1)};
  return {p, 1, t.size(0), t.size(1), 0, t.stride(0)};
}

void check_row_scales(const Tensor& s, int64_t rows, const char* op, const char* what) {
  check_cuda_tensor(s, op, what, DType::F32);
  if (s.ndim() != 1 || s.size(0) != rows || !s.is_contiguous())
    bad(op, std::string(what) + " must be F32 [" + std::to_string(rows) + "] contiguous, got " + shape_str(s.shape()));
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

// Made on first use: it refuses GPUs below sm_89, and its plans need eager runs before any recording.
CublasLtFp8Linear& fp8_gemm(std::unique_ptr<CublasLtFp8Linear>& fp8, DeviceMemory& memory, bool fast_accum,
                            bool capturing, const char* op) {
  if (!fp8) {
    if (capturing) bad(op, "the first FP8 linear must run before recording");
    Fp8LinearOptions options;
    options.fast_accum = fast_accum;
    fp8 = std::make_unique<CublasLtFp8Linear>(memory, options);
  }
  return *fp8;
}

// The device copy of a descriptor list: found, or uploaded (outside recordings only) into fresh chunk bytes, which no
// launch in flight reads.
template <class Item, class Alloc>
const Item* device_list(DeviceItemLists& cache, const std::vector<Item>& descs, bool capturing, Alloc&& alloc,
                        cudaStream_t stream, const char* op) {
  const size_t bytes = descs.size() * sizeof(Item);
  std::string key = op;  // the kind
  key.push_back('\0');
  key.append(reinterpret_cast<const char*>(descs.data()), bytes);
  if (auto it = cache.lists.find(key); it != cache.lists.end()) return static_cast<const Item*>(it->second);
  if (capturing) bad(op, "a new list of items was first issued while recording; run it once before record()");
  constexpr size_t kChunkBytes = 64 * 1024;
  if (cache.chunks.empty() || cache.used + bytes > size_t(cache.chunks.back().nbytes())) {
    cache.chunks.push_back(alloc(int64_t(std::max(kChunkBytes, bytes))));
    cache.used = 0;
  }
  auto* dst = reinterpret_cast<Item*>(static_cast<char*>(cache.chunks.back().data()) + cache.used);
  // From pageable memory: the call returns once the list is staged, so `descs` may go.
  check(cudaMemcpyAsync(dst, descs.data(), bytes, cudaMemcpyHostToDevice, stream), op, "cudaMemcpyAsync");
  cache.used += (bytes + 255) / 256 * 256;
  cache.lists.emplace(std::move(key), dst);
  return dst;
}

// While profiling, FP8 GEMMs are told apart by shape, as in linear().
std::string gemm_key(bool profiling, const char* op, int64_t rows, int64_t nout, int64_t k) {
  if (!profiling) return op;
  return std::string(op) + " " + std::to_string(rows) + "x" + std::to_string(nout) + "x" + std::to_string(k);
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
  check_fp8_rows(wq, w_scale, K, op, "weight");
  check_row_scales(x_scale, X.B * X.N, op, "input scales");
  if (Y.C != nout || X.B != Y.B || X.N != Y.N)
    bad(op, shape_str(xq.shape()) + " x " + shape_str(wq.shape()) + "^T -> " + shape_str(y.shape()));
  check_bias(bias, nout, op);
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

bool CudaBackend::fp8_residual_in_gemm() const {
  static const bool wanted = [] {
    const char* env = std::getenv("FLUXSWAP_FP8_FUSED_RESIDUAL");
    return !(env && std::string(env) == "0");
  }();
  return wanted && !fp8_residual_refused_;
}

std::pair<uint8_t*, float*> CudaBackend::fp8_activation_buffer(int64_t rows, int64_t ldq, const char* op) {
  if (fp8_act_.empty() || fp8_act_.back().numel() < rows * ldq || fp8_act_scale_.back().numel() < rows) {
    if (capturing_) bad(op, "a recording needs larger FP8 activation buffers: run the work once eagerly first");
    fp8_act_.push_back(empty(DType::F8_E4M3, {rows * ldq}));
    fp8_act_scale_.push_back(empty(DType::F32, {rows}));
  }
  return {static_cast<uint8_t*>(fp8_act_.back().data()), fp8_act_scale_.back().ptr<float>()};
}

void CudaBackend::gated_output_factors(const std::vector<GatedFactors>& items) {
  const char* op = "gated_output_factors";
  std::vector<GatedFactorsItem> descs;
  int64_t B = -1, max_n = 0;
  for (const GatedFactors& f : items) {
    const VecsView G = vecs_of(f.gate, op, "gate");
    const int64_t n = G.C;
    if (B >= 0 && G.B != B) bad(op, "every gate must have the same batch");
    B = G.B;
    check_cuda_tensor(f.w_scale, op, "w_scale", DType::F32);
    if (f.w_scale.numel() != n || !f.w_scale.is_contiguous()) bad(op, "w_scale must be F32 [" + std::to_string(n) + "]");
    check_bias(f.bias, n, op);
    check_cuda_tensor(f.scale, op, "scale", DType::F32);
    if (f.scale.shape() != Shape{B, n} || !f.scale.is_contiguous())
      bad(op, "scale must be F32 [" + std::to_string(B) + ", " + std::to_string(n) + "] contiguous");
    if (f.bias.defined()) {
      check_cuda_tensor(f.bias_out, op, "bias_out", DType::BF16);
      if (f.bias_out.shape() != Shape{B, n} || !f.bias_out.is_contiguous())
        bad(op, "bias_out must be [" + std::to_string(B) + ", " + std::to_string(n) + "] contiguous");
    }
    descs.push_back({G.p, G.sb, f.w_scale.ptr<float>(), f.bias.defined() ? f.bias.ptr<__nv_bfloat16>() : nullptr,
                     f.scale.ptr<float>(), f.bias.defined() ? f.bias_out.ptr<__nv_bfloat16>() : nullptr, n});
    max_n = std::max(max_n, n);
  }
  if (descs.empty()) return;
  if (!item_lists_) item_lists_ = std::make_shared<DeviceItemLists>();
  const GatedFactorsItem* list = device_list(
      *item_lists_, descs, capturing_, [&](int64_t n) { return empty(DType::U8, {n}); }, stream(), op);
  timed(op, [&] { launch_gated_output_factors(list, int64_t(descs.size()), B, max_n, stream(), op); });
}

// `ready` made by gated_output_factors for this gate, weight and bias: checked for shape only (the caller pairs them).
static void check_ready(const Backend::GatedFactors& ready, int64_t B, int64_t nout, bool bias, const char* op) {
  if (!ready.scale.defined()) return;
  check_cuda_tensor(ready.scale, op, "ready scale", DType::F32);
  if (ready.scale.numel() != B * nout || !ready.scale.is_contiguous()) bad(op, "ready scale must be [B, nout]");
  if (bias) {
    check_cuda_tensor(ready.bias_out, op, "ready bias", DType::BF16);
    if (ready.bias_out.numel() != B * nout || !ready.bias_out.is_contiguous()) bad(op, "ready bias must be [B, nout]");
  }
}

bool CudaBackend::gated_residual_products(const RowsView& R, const VecsView& G, const Tensor& wq,
                                          const Tensor& w_scale, const Tensor& bias, const GatedFactors& ready,
                                          int64_t K, const std::function<Fp8Rows(int64_t b)>& input,
                                          const char* op) {
  if (!fp8_residual_in_gemm()) return false;
  const int64_t nout = R.C;
  // cuBLASLt writes the bf16 rows 16-byte aligned only: other rows take the composition.
  if (reinterpret_cast<uintptr_t>(R.p) % 16 || R.sn % 8 || (R.B > 1 && R.sb % 8) || nout % 8) return false;
  if (fp8_gated_scale_.empty() || fp8_gated_scale_.back().numel() < nout) {
    if (capturing_) bad(op, "a recording needs larger gated-scale buffers: run the work once eagerly first");
    fp8_gated_scale_.push_back(empty(DType::F32, {nout}));
    fp8_gated_bias_.push_back(empty(DType::BF16, {nout}));
  }
  check_ready(ready, R.B, nout, bias.defined(), op);
  const bool made = ready.scale.defined();
  // One product per sample (each has its own gate); its factors are ready, or made into scratch that is rewritten
  // in stream order behind the product that read it.
  for (int64_t b = 0; b < R.B; ++b) {
    float* scale = made ? ready.scale.ptr<float>() + b * nout : fp8_gated_scale_.back().ptr<float>();
    __nv_bfloat16* gated_bias = !bias.defined() ? nullptr
                                : made          ? ready.bias_out.ptr<__nv_bfloat16>() + b * nout
                                                : fp8_gated_bias_.back().ptr<__nv_bfloat16>();
    if (!made)
      launch_gated_output_scales(G.p + b * G.sb, w_scale.ptr<float>(),
                                 bias.defined() ? bias.ptr<__nv_bfloat16>() : nullptr, nout, scale, gated_bias,
                                 stream(), op);
    if (!fp8_->run_residual(input(b), {wq.data(), wq.stride(0), scale}, gated_bias, R.p + b * R.sb, R.sn, R.N, K,
                            nout, capturing_, stream(), op)) {
      fp8_residual_refused_ = true;  // (sm_89 has no outer-vector scaling): the transformer goes back to the old way
      return false;                  // the first product decides (they share one plan)
    }
  }
  return true;
}

void CudaBackend::linear_fp8_quantized_residual(const Tensor& xq, const Tensor& x_scale, const Tensor& wq,
                                                const Tensor& w_scale, const Tensor& bias, const Tensor& gate,
                                                const Tensor& x, const Tensor& branch, const GatedFactors& ready) {
  const char* op = "linear_fp8_quantized_residual";
  const Fp8RowsView X = fp8_rows_view(xq, op, "input");
  const RowsView R = rows_of(x, op, "residual");
  const VecsView G = vecs_of(gate, op, "gate");
  const int64_t K = X.C, nout = wq.size(0);
  check_fp8_rows(wq, w_scale, K, op, "weight");
  check_row_scales(x_scale, X.B * X.N, op, "input scales");
  if (R.C != nout || X.B != R.B || X.N != R.N)
    bad(op, shape_str(xq.shape()) + " x " + shape_str(wq.shape()) + "^T -> " + shape_str(x.shape()));
  check_vecs_fit(G, R, op, "gate");
  check_bias(bias, nout, op);
  fp8_gemm(fp8_, memory_, fp8_fast_accum_, capturing_, op);
  bool fused = false;
  timed(gemm_key(profiler_.enabled(), op, X.B * X.N, nout, K).c_str(), [&] {
    fused = gated_residual_products(R, G, wq, w_scale, bias, ready, K, [&](int64_t b) {
      return Fp8Rows{X.p + b * X.sb, X.sn, x_scale.ptr<float>() + b * X.N};
    }, op);
  });
  if (!fused) Backend::linear_fp8_quantized_residual(xq, x_scale, wq, w_scale, bias, gate, x, branch, ready);
}

void CudaBackend::linear_fp8_residual(const Tensor& in, const Tensor& wq, const Tensor& w_scale, const Tensor& bias,
                                      const Tensor& gate, const Tensor& x, const Tensor& branch,
                                      const GatedFactors& ready) {
  const char* op = "linear_fp8_residual";
  const RowsView I = rows_of(in, op, "input"), R = rows_of(x, op, "residual");
  const VecsView G = vecs_of(gate, op, "gate");
  const int64_t K = I.C, nout = wq.size(0);
  check_fp8_rows(wq, w_scale, K, op, "weight");
  if (R.C != nout || I.B != R.B || I.N != R.N)
    bad(op, shape_str(in.shape()) + " x " + shape_str(wq.shape()) + "^T -> " + shape_str(x.shape()));
  check_vecs_fit(G, R, op, "gate");
  check_bias(bias, nout, op);
  fp8_gemm(fp8_, memory_, fp8_fast_accum_, capturing_, op);
  const int64_t ldq = fp8_activation_stride(K);
  const auto [q, sx] = fp8_activation_buffer(I.N, ldq, op);
  bool fused = false;
  timed(gemm_key(profiler_.enabled(), op, I.B * I.N, nout, K).c_str(), [&] {
    fused = gated_residual_products(R, G, wq, w_scale, bias, ready, K, [&](int64_t b) {
      launch_quantize_rows_e4m3(I.p + b * I.sb, I.sn, I.N, K, q, ldq, sx, stream(), op);
      return Fp8Rows{q, ldq, sx};
    }, op);
  });
  if (!fused) Backend::linear_fp8_residual(in, wq, w_scale, bias, gate, x, branch, ready);
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
    if (!item_lists_) item_lists_ = std::make_shared<DeviceItemLists>();
    const Fp8GemvItem* list = device_list(
        *item_lists_, descs, capturing_, [&](int64_t n) { return empty(DType::U8, {n}); }, stream(), op);
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
