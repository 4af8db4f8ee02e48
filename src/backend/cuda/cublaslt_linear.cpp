#include "backend/cuda/cublaslt_linear.h"

#include <string>

#include "backend/cuda/cuda_check.h"

namespace fluxswap::cuda {

namespace {

constexpr size_t kWorkspaceBytes = size_t(32) << 20;

// The alignment cuBLASLt may assume for a pointer: its largest power-of-two divisor, capped at 256 bytes.
int alignment_of(const void* p) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  int al = 256;
  while (al > 1 && a % al) al /= 2;
  return al;
}

cublasLtEpilogue_t to_cublas(GemmEpilogue e) {
  switch (e) {
    case GemmEpilogue::Bias: return CUBLASLT_EPILOGUE_BIAS;
    case GemmEpilogue::Gelu: return CUBLASLT_EPILOGUE_GELU;
    case GemmEpilogue::GeluBias: return CUBLASLT_EPILOGUE_GELU_BIAS;
    case GemmEpilogue::None: break;
  }
  return CUBLASLT_EPILOGUE_DEFAULT;
}

}  // namespace

struct CublasLtLinear::Plan {
  cublasLtMatmulDesc_t op = nullptr;
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, d = nullptr;
  cublasLtMatmulAlgo_t algo{};
  ~Plan() {
    if (d) cublasLtMatrixLayoutDestroy(d);
    if (b) cublasLtMatrixLayoutDestroy(b);
    if (a) cublasLtMatrixLayoutDestroy(a);
    if (op) cublasLtMatmulDescDestroy(op);
  }
};

CublasLtLinear::CublasLtLinear(DeviceMemory& memory) : workspace_bytes_(kWorkspaceBytes) {
  check(cublasLtCreate(&handle_), "linear", "cublasLtCreate");
  workspace_ = memory.allocate(workspace_bytes_, "linear workspace");
}

CublasLtLinear::~CublasLtLinear() {
  plans_.clear();
  if (handle_) cublasLtDestroy(handle_);
}

CublasLtLinear::Plan& CublasLtLinear::plan_for(const Key& key, const void* bias, bool capturing) {
  auto it = plans_.find(key);
  if (it != plans_.end()) return *it->second;
  if (capturing)
    throw Error("cuda backend: linear: a GEMM of a new shape (m " + std::to_string(key.m) + ", n " +
                std::to_string(key.n) + ", k " + std::to_string(key.k) +
                ") was first issued while recording; run the work once before record()");
  auto plan = std::make_unique<Plan>();
  const char* op = "linear";
  check(cublasLtMatmulDescCreate(&plan->op, CUBLAS_COMPUTE_32F, CUDA_R_32F), op, "cublasLtMatmulDescCreate");
  const cublasOperation_t trans = CUBLAS_OP_T, no_trans = CUBLAS_OP_N;
  check(cublasLtMatmulDescSetAttribute(plan->op, CUBLASLT_MATMUL_DESC_TRANSA, &trans, sizeof(trans)), op,
        "cublasLtMatmulDescSetAttribute(TRANSA)");
  check(cublasLtMatmulDescSetAttribute(plan->op, CUBLASLT_MATMUL_DESC_TRANSB, &no_trans, sizeof(no_trans)), op,
        "cublasLtMatmulDescSetAttribute(TRANSB)");
  const cublasLtEpilogue_t epilogue = to_cublas(GemmEpilogue(key.epilogue));
  check(cublasLtMatmulDescSetAttribute(plan->op, CUBLASLT_MATMUL_DESC_EPILOGUE, &epilogue, sizeof(epilogue)), op,
        "cublasLtMatmulDescSetAttribute(EPILOGUE)");

  // A = w as column-major [k, m] (transposed by the op), B = x^T as [k, n], D = y^T as [m, n].
  check(cublasLtMatrixLayoutCreate(&plan->a, CUDA_R_16BF, uint64_t(key.k), uint64_t(key.m), key.k), op,
        "cublasLtMatrixLayoutCreate(A)");
  check(cublasLtMatrixLayoutCreate(&plan->b, CUDA_R_16BF, uint64_t(key.k), uint64_t(key.n), key.ldb), op,
        "cublasLtMatrixLayoutCreate(B)");
  check(cublasLtMatrixLayoutCreate(&plan->d, CUDA_R_16BF, uint64_t(key.m), uint64_t(key.n), key.ldd), op,
        "cublasLtMatrixLayoutCreate(D)");
  if (key.batch > 1) {
    const int32_t count = int32_t(key.batch);
    const int64_t zero = 0;
    for (auto [layout, stride] : {std::pair{plan->a, zero}, std::pair{plan->b, key.stride_b},
                                  std::pair{plan->d, key.stride_d}}) {
      check(cublasLtMatrixLayoutSetAttribute(layout, CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT, &count, sizeof(count)), op,
            "cublasLtMatrixLayoutSetAttribute(BATCH_COUNT)");
      check(cublasLtMatrixLayoutSetAttribute(layout, CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET, &stride,
                                             sizeof(stride)),
            op, "cublasLtMatrixLayoutSetAttribute(STRIDED_BATCH_OFFSET)");
    }
  }

  cublasLtMatmulPreference_t pref = nullptr;
  check(cublasLtMatmulPreferenceCreate(&pref), op, "cublasLtMatmulPreferenceCreate");
  struct PrefGuard {
    cublasLtMatmulPreference_t p;
    ~PrefGuard() { cublasLtMatmulPreferenceDestroy(p); }
  } guard{pref};
  const uint64_t ws = workspace_bytes_;
  check(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof(ws)), op,
        "cublasLtMatmulPreferenceSetAttribute(MAX_WORKSPACE_BYTES)");
  const uint32_t al_a = uint32_t(key.align_a), al_b = uint32_t(key.align_b), al_d = uint32_t(key.align_d);
  check(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &al_a, 4), op,
        "cublasLtMatmulPreferenceSetAttribute(MIN_ALIGNMENT_A_BYTES)");
  check(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &al_b, 4), op,
        "cublasLtMatmulPreferenceSetAttribute(MIN_ALIGNMENT_B_BYTES)");
  check(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &al_d, 4), op,
        "cublasLtMatmulPreferenceSetAttribute(MIN_ALIGNMENT_C_BYTES)");
  check(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &al_d, 4), op,
        "cublasLtMatmulPreferenceSetAttribute(MIN_ALIGNMENT_D_BYTES)");

  // The heuristic takes the bias alignment from the bias pointer in the descriptor.
  if (bias)
    check(cublasLtMatmulDescSetAttribute(plan->op, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias, sizeof(bias)), op,
          "cublasLtMatmulDescSetAttribute(BIAS_POINTER)");
  cublasLtMatmulHeuristicResult_t result{};
  int found = 0;
  check(cublasLtMatmulAlgoGetHeuristic(handle_, plan->op, plan->a, plan->b, plan->d, plan->d, pref, 1, &result,
                                       &found),
        op, "cublasLtMatmulAlgoGetHeuristic");
  if (found == 0)
    fail(op, "cublasLtMatmulAlgoGetHeuristic",
         "no algorithm for m " + std::to_string(key.m) + ", n " + std::to_string(key.n) + ", k " +
             std::to_string(key.k) + ", ldb " + std::to_string(key.ldb) + ", ldd " + std::to_string(key.ldd));
  plan->algo = result.algo;
  return *plans_.emplace(key, std::move(plan)).first->second;
}

void CublasLtLinear::run(const GemmRows& x, const void* w, const void* bias, const GemmRows& y, int64_t K,
                         int64_t nout, GemmEpilogue epilogue, bool capturing, cudaStream_t stream) {
  if (x.B * x.N == 0 || nout == 0) return;
  // One GEMM over all rows whenever the batch is a plain continuation of the rows; else strided-batched.
  Key key{};
  key.m = nout;
  key.k = K;
  key.batch = 1;
  if (x.B == 1) {
    key.n = x.N, key.ldb = x.sn, key.ldd = y.sn;
  } else if (x.N == 1) {
    key.n = x.B, key.ldb = x.sb, key.ldd = y.sb;
  } else if (x.sb == x.N * x.sn && y.sb == y.N * y.sn) {
    key.n = x.B * x.N, key.ldb = x.sn, key.ldd = y.sn;
  } else {
    key.n = x.N, key.ldb = x.sn, key.ldd = y.sn;
    key.batch = x.B, key.stride_b = x.sb, key.stride_d = y.sb;
  }
  key.epilogue = int(epilogue);
  key.align_a = alignment_of(w);
  key.align_b = alignment_of(x.p);
  key.align_d = alignment_of(y.p);
  key.align_bias = bias ? alignment_of(bias) : 0;
  if (key.ldb < key.k || key.ldd < key.m)
    fail("linear", "cublasLtMatmul", "row strides smaller than the row widths");
  Plan& plan = plan_for(key, bias, capturing);
  const char* op = "linear";
  if (bias)
    check(cublasLtMatmulDescSetAttribute(plan.op, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias, sizeof(bias)), op,
          "cublasLtMatmulDescSetAttribute(BIAS_POINTER)");
  const float alpha = 1.0f, beta = 0.0f;
  check(cublasLtMatmul(handle_, plan.op, &alpha, w, plan.a, x.p, plan.b, &beta, y.p, plan.d, y.p, plan.d, &plan.algo,
                       workspace_.get(), workspace_bytes_, stream),
        op, "cublasLtMatmul");
}

}  // namespace fluxswap::cuda
