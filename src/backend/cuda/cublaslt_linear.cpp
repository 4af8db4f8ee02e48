#include "backend/cuda/cublaslt_linear.h"

#include <algorithm>
#include <string>

#include "backend/cuda/cublaslt_common.h"
#include "backend/cuda/cuda_check.h"

namespace fluxswap::cuda {

struct CublasLtLinear::Plan : LtMatmulObjects {
  cublasLtMatmulAlgo_t algo{};
};

CublasLtLinear::CublasLtLinear(DeviceMemory& memory) : memory_(memory), workspace_bytes_(kCublasLtWorkspaceBytes) {
  check(cublasLtCreate(&handle_), "linear", "cublasLtCreate");
  workspace_ = memory.allocate(workspace_bytes_, "linear workspace");
}

CublasLtLinear::~CublasLtLinear() {
  plans_.clear();
  if (handle_) cublasLtDestroy(handle_);
}

CublasLtLinear::Plan& CublasLtLinear::plan_for(const Key& key, const void* bias, bool capturing, const char* op) {
  auto it = plans_.find(key);
  if (it != plans_.end()) return *it->second;
  if (capturing)
    throw Error(std::string("cuda backend: ") + op + ": a GEMM of a new shape (m " + std::to_string(key.m) + ", n " +
                std::to_string(key.n) + ", k " + std::to_string(key.k) +
                ") was first issued while recording; run the work once before record()");
  auto plan = std::make_unique<Plan>();
  check(cublasLtMatmulDescCreate(&plan->op, CUBLAS_COMPUTE_32F, CUDA_R_32F), op, "cublasLtMatmulDescCreate");
  const cublasOperation_t trans_a = key.trans_a ? CUBLAS_OP_T : CUBLAS_OP_N, no_trans = CUBLAS_OP_N;
  check(cublasLtMatmulDescSetAttribute(plan->op, CUBLASLT_MATMUL_DESC_TRANSA, &trans_a, sizeof(trans_a)), op,
        "cublasLtMatmulDescSetAttribute(TRANSA)");
  check(cublasLtMatmulDescSetAttribute(plan->op, CUBLASLT_MATMUL_DESC_TRANSB, &no_trans, sizeof(no_trans)), op,
        "cublasLtMatmulDescSetAttribute(TRANSB)");
  const cublasLtEpilogue_t epilogue = to_cublas(GemmEpilogue(key.epilogue));
  check(cublasLtMatmulDescSetAttribute(plan->op, CUBLASLT_MATMUL_DESC_EPILOGUE, &epilogue, sizeof(epilogue)), op,
        "cublasLtMatmulDescSetAttribute(EPILOGUE)");

  const uint64_t a_rows = uint64_t(key.trans_a ? key.k : key.m), a_cols = uint64_t(key.trans_a ? key.m : key.k);
  check(cublasLtMatrixLayoutCreate(&plan->a, CUDA_R_16BF, a_rows, a_cols, key.lda), op,
        "cublasLtMatrixLayoutCreate(A)");
  check(cublasLtMatrixLayoutCreate(&plan->b, CUDA_R_16BF, uint64_t(key.k), uint64_t(key.n), key.ldb), op,
        "cublasLtMatrixLayoutCreate(B)");
  check(cublasLtMatrixLayoutCreate(&plan->d, key.f32_out ? CUDA_R_32F : CUDA_R_16BF, uint64_t(key.m),
                                   uint64_t(key.n), key.ldd),
        op, "cublasLtMatrixLayoutCreate(D)");
  if (key.batch > 1) {
    const int32_t count = int32_t(key.batch);
    for (auto [layout, stride] : {std::pair{plan->a, key.stride_a}, std::pair{plan->b, key.stride_b},
                                  std::pair{plan->d, key.stride_d}}) {
      check(cublasLtMatrixLayoutSetAttribute(layout, CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT, &count, sizeof(count)), op,
            "cublasLtMatrixLayoutSetAttribute(BATCH_COUNT)");
      check(cublasLtMatrixLayoutSetAttribute(layout, CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET, &stride,
                                             sizeof(stride)),
            op, "cublasLtMatrixLayoutSetAttribute(STRIDED_BATCH_OFFSET)");
    }
  }

  const LtPreference pref(workspace_bytes_, uint32_t(key.align_a), uint32_t(key.align_b), uint32_t(key.align_d), op);

  // The heuristic takes the bias alignment from the bias pointer in the descriptor.
  if (bias)
    check(cublasLtMatmulDescSetAttribute(plan->op, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias, sizeof(bias)), op,
          "cublasLtMatmulDescSetAttribute(BIAS_POINTER)");
  cublasLtMatmulHeuristicResult_t result{};
  int found = 0;
  check(plan->heuristic(handle_, pref, result, found), op, "cublasLtMatmulAlgoGetHeuristic");
  if (found == 0)
    fail(op, "cublasLtMatmulAlgoGetHeuristic",
         "no algorithm for m " + std::to_string(key.m) + ", n " + std::to_string(key.n) + ", k " +
             std::to_string(key.k) + ", lda " + std::to_string(key.lda) + ", ldb " + std::to_string(key.ldb) +
             ", ldd " + std::to_string(key.ldd));
  plan->algo = result.algo;
  return *plans_.emplace(key, std::move(plan)).first->second;
}

void CublasLtLinear::matmul(const Matmul& mm, bool capturing, cudaStream_t stream, const char* op) {
  if (mm.m == 0 || mm.n == 0 || mm.batch == 0) return;
  if (mm.k <= 0) fail(op, "cublasLtMatmul", "the inner dimension must be positive");
  if (mm.f32_out && (mm.epilogue != GemmEpilogue::None || mm.bias))
    fail(op, "cublasLtMatmul", "float32 outputs take no epilogue");
  Key key{};
  key.m = mm.m, key.n = mm.n, key.k = mm.k;
  key.lda = mm.lda, key.ldb = mm.ldb, key.ldd = mm.ldd;
  key.batch = mm.batch;
  if (mm.batch > 1) key.stride_a = mm.stride_a, key.stride_b = mm.stride_b, key.stride_d = mm.stride_d;
  key.trans_a = mm.trans_a;
  key.f32_out = mm.f32_out;
  key.epilogue = int(mm.epilogue);
  key.align_a = alignment_of(mm.a, mm.batch, mm.stride_a, 2);
  key.align_b = alignment_of(mm.b, mm.batch, mm.stride_b, 2);
  key.align_d = alignment_of(mm.d, mm.batch, mm.stride_d, mm.f32_out ? 4 : 2);
  const void* c = mm.accumulate && mm.c ? mm.c : mm.d;
  // (The preference's C alignment is D's: C's must be as good.)
  key.align_d = std::min(key.align_d, alignment_of(c, mm.batch, mm.stride_d, mm.f32_out ? 4 : 2));
  key.align_bias = mm.bias ? alignment_of(mm.bias) : 0;
  if (key.lda < (mm.trans_a ? key.k : key.m) || key.ldb < key.k || key.ldd < key.m)
    fail(op, "cublasLtMatmul", "row strides smaller than the row widths");
  Plan& plan = plan_for(key, mm.bias, capturing, op);
  if (mm.bias)
    check(cublasLtMatmulDescSetAttribute(plan.op, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &mm.bias, sizeof(mm.bias)), op,
          "cublasLtMatmulDescSetAttribute(BIAS_POINTER)");
  const float beta = mm.accumulate ? 1.0f : 0.0f;
  check(cublasLtMatmul(handle_, plan.op, &mm.alpha, mm.a, plan.a, mm.b, plan.b, &beta, c, plan.d, mm.d, plan.d,
                       &plan.algo, workspace_.get(), workspace_bytes_, stream),
        op, "cublasLtMatmul");
}

void CublasLtLinear::run(const GemmRows& x, const void* w, const void* bias, const GemmRows& y, int64_t K,
                         int64_t nout, GemmEpilogue epilogue, bool capturing, cudaStream_t stream, bool accumulate,
                         const char* op, int64_t ldw) {
  if (x.B * x.N == 0 || nout == 0) return;
  // A = w as column-major [k, m] (transposed by the op), B = x^T as [k, n], D = y^T as [m, n]. One GEMM over all
  // rows whenever the batch is a plain continuation of the rows; else strided-batched (w shared: stride 0).
  Matmul mm;
  mm.trans_a = true;
  mm.m = nout, mm.k = K;
  mm.a = w, mm.lda = ldw > 0 ? ldw : K;
  mm.b = x.p, mm.d = y.p;
  mm.accumulate = accumulate;
  mm.epilogue = epilogue;
  mm.bias = bias;
  if (x.B == 1) {
    mm.n = x.N, mm.ldb = x.sn, mm.ldd = y.sn;
  } else if (x.N == 1) {
    mm.n = x.B, mm.ldb = x.sb, mm.ldd = y.sb;
  } else if (x.sb == x.N * x.sn && y.sb == y.N * y.sn) {
    mm.n = x.B * x.N, mm.ldb = x.sn, mm.ldd = y.sn;
  } else {
    mm.n = x.N, mm.ldb = x.sn, mm.ldd = y.sn;
    mm.batch = x.B, mm.stride_b = x.sb, mm.stride_d = y.sb;
  }
  matmul(mm, capturing, stream, op);
}

void* CublasLtLinear::scratch(size_t bytes, bool capturing, const char* op) {
  if (bytes <= scratch_bytes_) return scratch_.back().get();
  if (capturing)
    throw Error(std::string("cuda backend: ") + op + ": needs " + std::to_string(bytes) +
                " bytes of scratch, first asked for while recording; run the work once before record()");
  // Powers of two, so the buffers kept for recordings add up to less than twice the largest.
  size_t size = size_t(1) << 20;
  while (size < bytes) size *= 2;
  scratch_.push_back(memory_.allocate(size, op));
  scratch_bytes_ = size;
  return scratch_.back().get();
}

}  // namespace fluxswap::cuda
