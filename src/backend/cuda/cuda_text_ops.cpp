// The text-encoder ops of the CUDA backend (CLIP-L, T5; attention_ex also serves the VAE): argument checks, then
// the kernels in text_kernels.cu and, for attention_ex, the GEMM-based attention in gemm_attention.cpp.
#include "backend/cuda/cuda_backend.h"
#include "backend/cuda/gemm_attention.h"
#include "backend/cuda/text_kernels.h"

namespace fluxswap::cuda {

namespace {

// A contiguous bf16 [C] vector (norm weights and biases).
const __nv_bfloat16* vector_of(const Tensor& t, int64_t C, const char* op, const char* what) {
  check_cuda_tensor(t, op, what, DType::BF16);
  if (t.ndim() != 1 || t.size(0) != C || !t.is_contiguous())
    bad(op, std::string(what) + " must be a contiguous [" + std::to_string(C) + "] tensor, got " +
                shape_str(t.shape()));
  return t.ptr<__nv_bfloat16>();
}

// A contiguous bf16 [rows, C] table (embeddings).
const __nv_bfloat16* table_of(const Tensor& t, int64_t C, const char* op, const char* what) {
  check_cuda_tensor(t, op, what, DType::BF16);
  if (t.ndim() != 2 || t.size(1) != C || !t.is_contiguous())
    bad(op, std::string(what) + " must be a contiguous [rows, " + std::to_string(C) + "] tensor, got " +
                shape_str(t.shape()));
  return t.ptr<__nv_bfloat16>();
}

}  // namespace

void CudaBackend::layer_norm(const Tensor& x, const Tensor& weight, const Tensor& bias, float eps, const Tensor& y) {
  const char* op = "layer_norm";
  const RowsView X = rows_of(x, op, "input"), Y = rows_of(y, op, "output");
  check_same_rows(X, Y, op);
  const __nv_bfloat16* w = vector_of(weight, X.C, op, "weight");
  const __nv_bfloat16* b = bias.defined() ? vector_of(bias, X.C, op, "bias") : nullptr;
  timed(op, [&] { launch_layer_norm(X, w, b, eps, Y, stream()); });
}

void CudaBackend::rms_norm(const Tensor& x, const Tensor& weight, float eps, const Tensor& y) {
  const char* op = "rms_norm";
  const RowsView X = rows_of(x, op, "input"), Y = rows_of(y, op, "output");
  check_same_rows(X, Y, op);
  const __nv_bfloat16* w = vector_of(weight, X.C, op, "weight");
  timed(op, [&] { launch_rms_norm(X, w, eps, Y, stream()); });
}

void CudaBackend::embedding(const Tensor& ids, const Tensor& table, const Tensor& positions, const Tensor& out) {
  const char* op = "embedding";
  const RowsView O = rows_of(out, op, "output");
  check_cuda_tensor(ids, op, "ids (upload them with copy_from_host)", DType::I32);
  if (ids.ndim() != 2 || !ids.is_contiguous() || ids.size(0) != O.B || ids.size(1) != O.N)
    bad(op, "ids must be a contiguous int32 tensor [" + std::to_string(O.B) + ", " + std::to_string(O.N) + "], got " +
                shape_str(ids.shape()));
  const __nv_bfloat16* tab = table_of(table, O.C, op, "table");
  const __nv_bfloat16* pos = nullptr;
  if (positions.defined()) {
    pos = table_of(positions, O.C, op, "positions");
    if (positions.size(0) < O.N)
      bad(op, "positions must cover " + std::to_string(O.N) + " rows, got " + shape_str(positions.shape()));
  }
  timed(op, [&] { launch_embedding(ids.ptr<int32_t>(), tab, table.size(0), pos, O, stream()); });
}

void CudaBackend::split_heads(const Tensor& x, const Tensor& out) {
  const char* op = "split_heads";
  const RowsView X = rows_of(x, op, "input");
  check_cuda_tensor(out, op, "output", DType::BF16);
  check_contiguous(out, op, "output");
  if (out.ndim() != 4 || out.size(0) != X.B || out.size(2) != X.N || out.size(1) * out.size(3) != X.C)
    bad(op, "input " + shape_str(x.shape()) + " does not split into " + shape_str(out.shape()));
  timed(op, [&] { launch_split_heads(X, out.size(1), out.ptr<__nv_bfloat16>(), stream()); });
}

void CudaBackend::attention_ex(const Tensor& q, const Tensor& k, const Tensor& v, float scale, const Tensor& bias,
                               bool causal, const Tensor& out) {
  const char* op = "attention_ex";
  for (const Tensor* t : {&q, &k, &v}) {
    check_cuda_tensor(*t, op, "q, k, v", DType::BF16);
    check_contiguous(*t, op, "q, k, v");
    if (t->shape() != q.shape() || t->ndim() != 4) bad(op, "q, k, v must be [B, H, S, D] of one shape");
  }
  const int64_t B = q.size(0), H = q.size(1), S = q.size(2), D = q.size(3);
  const RowsView O = rows_of(out, op, "output");
  if (O.B != B || O.N != S || O.C != H * D) bad(op, "output " + shape_str(out.shape()) + " does not match q");
  if (bias.defined()) {
    check_cuda_tensor(bias, op, "bias", DType::F32);
    check_contiguous(bias, op, "bias");
    if (bias.shape() != Shape{H, S, S}) bad(op, "bias must be [H, S, S], got " + shape_str(bias.shape()));
  }
  const AttentionExArgs args{q.ptr<__nv_bfloat16>(), k.ptr<__nv_bfloat16>(), v.ptr<__nv_bfloat16>(), B, H, S, D,
                             scale, bias.defined() ? bias.ptr<float>() : nullptr, causal, O};
  timed(op, [&] { gemm_attention(*gemm_, args, capturing_, stream()); });
}

void CudaBackend::activation(const Tensor& x, Activation act, const Tensor& y) {
  const char* op = "activation";
  const RowsView X = rows_of(x, op, "input"), Y = rows_of(y, op, "output");
  check_same_rows(X, Y, op);
  timed(op, [&] { launch_activation(X, act, Y, stream()); });
}

void CudaBackend::mul(const Tensor& y, const Tensor& x) {
  const char* op = "mul";
  const RowsView Y = rows_of(y, op, "output"), X = rows_of(x, op, "input");
  check_same_rows(X, Y, op);
  timed(op, [&] { launch_mul(Y, X, stream()); });
}

}  // namespace fluxswap::cuda
