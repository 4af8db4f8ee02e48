// The LoRA and sampler ops of the CUDA backend: axpy (the Euler step), copy (saving and restoring merged weights),
// add_matmul (merging W + up @ down) and lora_linear (a linear plus a runtime low-rank branch).
#include "backend/cuda/cuda_backend.h"
#include "backend/cuda/lora_kernels.h"
#include "backend/cuda/text_kernels.h"

namespace fluxswap::cuda {

namespace {

// Rows [B, N, C] of float32 or bf16 elements, as the CPU reference reads them.
AnyRows any_rows_of(const Tensor& t, const char* op, const char* what) {
  if (!t.defined()) bad(op, std::string(what) + " is undefined");
  if (t.device() != Device::CUDA) bad(op, std::string(what) + " must be a CUDA tensor");
  if (t.dtype() != DType::F32 && t.dtype() != DType::BF16) bad(op, std::string(what) + " must be float32 or bf16");
  if (t.stride(-1) != 1) bad(op, std::string(what) + " needs a contiguous last dimension");
  const bool f32 = t.dtype() == DType::F32;
  if (t.ndim() == 3) return {t.data(), f32, t.size(0), t.size(1), t.size(2), t.stride(0), t.stride(1)};
  if (t.ndim() == 2) return {t.data(), f32, 1, t.size(0), t.size(1), 0, t.stride(0)};
  bad(op, std::string(what) + " must be 2-D or 3-D, got " + shape_str(t.shape()));
}

GemmRows gemm_rows(const RowsView& r) { return {r.p, r.B, r.N, r.sb, r.sn}; }

}  // namespace

void CudaBackend::axpy(const Tensor& y, float alpha, const Tensor& x) {
  const char* op = "axpy";
  const AnyRows Y = any_rows_of(y, op, "output"), X = any_rows_of(x, op, "input");
  if (X.B != Y.B || X.N != Y.N || X.C != Y.C) bad(op, "shape mismatch");
  timed(op, [&] { launch_axpy(Y, alpha, X, stream()); });
}

void CudaBackend::copy(const Tensor& src, const Tensor& dst) {
  const char* op = "copy";
  if (src.shape() != dst.shape() || src.dtype() != dst.dtype())
    bad(op, std::string(dtype_name(src.dtype())) + " " + shape_str(src.shape()) + " -> " +
                std::string(dtype_name(dst.dtype())) + " " + shape_str(dst.shape()));
  if (src.device() != Device::CUDA || dst.device() != Device::CUDA)
    bad(op, "source and destination must be CUDA tensors");
  if (src.numel() == 0) return;
  const size_t es = dtype_size(src.dtype());
  if (src.is_contiguous() && dst.is_contiguous()) {
    if (src.data() == dst.data()) return;
    timed(op, [&] {
      check(cudaMemcpyAsync(dst.data(), src.data(), src.nbytes(), cudaMemcpyDeviceToDevice, stream()), op,
            "cudaMemcpyAsync");
    });
    return;
  }
  // Rows views: one pitched copy per batch entry (a 2-D [B, C] view is one batch of B rows).
  if ((src.ndim() != 2 && src.ndim() != 3) || src.stride(-1) != 1 || dst.stride(-1) != 1)
    bad(op, "strided tensors must be rows views ([B, N, C] or [B, C]) with a contiguous last dimension");
  const bool three = src.ndim() == 3;
  const int64_t B = three ? src.size(0) : 1, N = src.size(-2), C = src.size(-1);
  const int64_t ssb = three ? src.stride(0) : 0, dsb = three ? dst.stride(0) : 0;
  // A single row has no pitch to speak of; cudaMemcpy2D still wants one at least as wide as the row.
  const int64_t ssn = N == 1 ? C : src.stride(-2), dsn = N == 1 ? C : dst.stride(-2);
  const auto* s = static_cast<const char*>(src.data());
  auto* d = static_cast<char*>(dst.data());
  timed(op, [&] {
    for (int64_t b = 0; b < B; ++b)
      check(cudaMemcpy2DAsync(d + b * dsb * es, size_t(dsn) * es, s + b * ssb * es, size_t(ssn) * es, size_t(C) * es,
                              size_t(N), cudaMemcpyDeviceToDevice, stream()),
            op, "cudaMemcpy2DAsync");
  });
}

void CudaBackend::add_matmul(const Tensor& base, const Tensor& up, const Tensor& down, const Tensor& out,
                             float alpha) {
  const char* op = "add_matmul";
  for (auto [t, what] : {std::pair{&base, "base"}, {&up, "up"}, {&down, "down"}, {&out, "output"}}) {
    check_cuda_tensor(*t, op, what, DType::BF16);
    check_contiguous(*t, op, what);
    if (t->ndim() != 2) bad(op, std::string(what) + " must be 2-D, got " + shape_str(t->shape()));
  }
  const int64_t M = out.size(0), K = out.size(1), R = down.size(0);
  if (base.shape() != out.shape() || up.size(0) != M || up.size(1) != R || down.size(1) != K)
    bad(op, shape_str(base.shape()) + " + " + shape_str(up.shape()) + " @ " + shape_str(down.shape()) + " -> " +
                shape_str(out.shape()));
  timed(op, [&] {
    if (R == 0 || M * K == 0) {
      if (base.data() != out.data())
        check(cudaMemcpyAsync(out.data(), base.data(), out.nbytes(), cudaMemcpyDeviceToDevice, stream()), op,
              "cudaMemcpyAsync");
      return;
    }
    // Row-major out[M, K] += up[M, R] down[R, K] is column-major out^T[K, M] += down^T up^T, with down^T and up^T
    // being down and up read column-major.
    Matmul mm;
    mm.m = K, mm.n = M, mm.k = R;
    mm.a = down.data(), mm.lda = K;
    mm.b = up.data(), mm.ldb = R;
    mm.d = out.data(), mm.ldd = K;
    mm.c = base.data();  // out = base + alpha up down in one pass: base is read where out would be
    mm.accumulate = true;
    mm.alpha = alpha;
    gemm_->matmul(mm, capturing_, stream(), op);
  });
}

void CudaBackend::zero(const Tensor& t) {
  const char* op = "zero";
  if (t.device() != Device::CUDA) bad(op, "needs a CUDA tensor");
  if (t.is_contiguous()) {
    timed(op, [&] { check(cudaMemsetAsync(t.data(), 0, t.nbytes(), stream()), op, "cudaMemsetAsync"); });
    return;
  }
  // A column slice of a matrix (a runtime LoRA slot inside [W | up]): one pitched memset.
  if (t.ndim() != 2 || t.stride(1) != 1) bad(op, "a strided tensor must be 2-D with contiguous rows");
  const size_t es = dtype_size(t.dtype());
  timed(op, [&] {
    check(cudaMemset2DAsync(t.data(), size_t(t.stride(0)) * es, 0, size_t(t.size(1)) * es, size_t(t.size(0)),
                            stream()),
          op, "cudaMemset2DAsync");
  });
}

void CudaBackend::reserve_scaled_copies(size_t n) {
  const size_t bytes = n * sizeof(cuda::ScaledCopyDesc);
  if (scaled_copy_descs_.defined() && scaled_copy_descs_.nbytes() >= bytes) return;
  if (capturing_) bad("reserve_scaled_copies", "cannot allocate while recording");
  synchronize();  // the old list may still be read by an earlier launch
  scaled_copy_descs_ = empty(DType::U8, {int64_t(bytes)});
}

void CudaBackend::scaled_copy_batch(const std::vector<ScaledCopy>& copies) {
  const char* op = "scaled_copy_batch";
  if (copies.empty()) return;
  if (capturing_) bad(op, "cannot be recorded (it uploads its descriptor list)");
  std::vector<cuda::ScaledCopyDesc> descs;
  for (const ScaledCopy& c : copies) {
    for (auto [t, what] : {std::pair{&c.src, "source"}, {&c.dst, "destination"}}) {
      check_cuda_tensor(*t, op, what, DType::BF16);
      if (t->ndim() != 2 || t->stride(1) != 1) bad(op, std::string(what) + " must be 2-D with contiguous rows");
    }
    if (c.src.shape() != c.dst.shape()) bad(op, shape_str(c.src.shape()) + " -> " + shape_str(c.dst.shape()));
    if (c.src.numel() == 0) continue;
    descs.push_back({static_cast<const __nv_bfloat16*>(c.src.data()), static_cast<__nv_bfloat16*>(c.dst.data()),
                     c.src.size(0), c.src.size(1), c.src.stride(0), c.dst.stride(0), c.alpha});
  }
  const size_t bytes = descs.size() * sizeof(cuda::ScaledCopyDesc);
  reserve_scaled_copies(descs.size());
  timed(op, [&] {
    // From pageable memory: the call returns once the list is staged, so `descs` may go.
    check(cudaMemcpyAsync(scaled_copy_descs_.data(), descs.data(), bytes, cudaMemcpyHostToDevice, stream()), op,
          "cudaMemcpyAsync");
    cuda::launch_scaled_copies(static_cast<const cuda::ScaledCopyDesc*>(scaled_copy_descs_.data()),
                               int64_t(descs.size()), stream());
  });
}

// Three GEMMs: t = x down^T into the scratch, y = t up^T, then the main product accumulating onto y with the bias
// and GELU as its epilogue (cuBLASLt applies them after adding C, so GELU sees the whole sum). This order beats
// accumulating the rank-R product last: that GEMM is memory-bound and would read and write all of y again, while
// the main GEMM's epilogue streams C in at little cost (FLUX linear1, 4608 x 3072 -> 9216 at rank 192 on an H100:
// +20% over the plain linear, against +31% the other way round). SiLU and QuickGELU have no epilogue and follow as a
// separate kernel.
void CudaBackend::lora_linear(const Tensor& x, const Tensor& w, const Tensor& bias, const Tensor& down,
                              const Tensor& up, const Tensor& scratch, const Tensor& y, Activation act) {
  const char* op = "lora_linear";
  const RowsView X = rows_of(x, op, "input"), Y = rows_of(y, op, "output"), T = rows_of(scratch, op, "scratch");
  check_cuda_tensor(w, op, "weight", DType::BF16);
  if (w.ndim() != 2 || w.stride(1) != 1 || w.stride(0) < w.size(1))
    bad(op, "weight must be a 2-D tensor with contiguous rows");
  const int64_t nout = w.size(0), k = w.size(1), R = down.size(0);
  if (X.C != k || Y.C != nout || X.B != Y.B || X.N != Y.N)
    bad(op, shape_str(x.shape()) + " x " + shape_str(w.shape()) + "^T -> " + shape_str(y.shape()));
  check_lora_factors(down, up, X, T, nout, op);
  check_bias(bias, nout, op);
  const GemmRows xr = gemm_rows(X), yr = gemm_rows(Y), tr = gemm_rows(T);
  const GemmEpilogue epilogue = epilogue_for(bias, act);
  timed(op, [&] {
    if (R > 0) {
      gemm_->run(xr, down.data(), nullptr, tr, k, R, GemmEpilogue::None, capturing_, stream(), false, op,
                 down.stride(0));
      gemm_->run(tr, up.data(), nullptr, yr, R, nout, GemmEpilogue::None, capturing_, stream(), false, op,
                 up.stride(0));
    }
    gemm_->run(xr, w.data(), bias.data(), yr, k, nout, epilogue, capturing_, stream(), R > 0, op, w.stride(0));
    if (act == Activation::Silu || act == Activation::QuickGelu) launch_activation(Y, act, Y, stream());
  });
}

// The runtime LoRA branch on an output computed already (FP8 linears): t = x down^T, then y = act(t up^T + y) with
// GELU, when asked, in the accumulating GEMM's epilogue so that it sees the whole sum.
void CudaBackend::add_lora_branch(const Tensor& x, const Tensor& down, const Tensor& up, const Tensor& scratch,
                                  const Tensor& y, Activation act) {
  const char* op = "add_lora_branch";
  const RowsView X = rows_of(x, op, "input"), Y = rows_of(y, op, "output"), T = rows_of(scratch, op, "scratch");
  if (X.B != Y.B || X.N != Y.N) bad(op, shape_str(x.shape()) + " -> " + shape_str(y.shape()));
  check_lora_factors(down, up, X, T, Y.C, op);
  const int64_t R = down.size(0);
  timed(op, [&] {
    gemm_->run(gemm_rows(X), down.data(), nullptr, gemm_rows(T), X.C, R, GemmEpilogue::None, capturing_, stream(),
               false, op, down.stride(0));
    gemm_->run(gemm_rows(T), up.data(), nullptr, gemm_rows(Y), R, Y.C,
               act == Activation::GeluTanh ? GemmEpilogue::Gelu : GemmEpilogue::None, capturing_, stream(), true, op,
               up.stride(0));
    if (act == Activation::Silu || act == Activation::QuickGelu) launch_activation(Y, act, Y, stream());
  });
}

}  // namespace fluxswap::cuda
