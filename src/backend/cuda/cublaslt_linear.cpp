#include "backend/cuda/cublaslt_linear.h"

#include <algorithm>
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

// The alignment every matrix of a strided batch keeps: the first one's, capped by the stride's.
int alignment_of(const void* p, int64_t batch, int64_t stride, size_t element_bytes) {
  const int al = alignment_of(p);
  if (batch <= 1) return al;
  return std::min(al, alignment_of(reinterpret_cast<const void*>(uintptr_t(stride) * element_bytes)));
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

CublasLtLinear::CublasLtLinear(DeviceMemory& memory) : memory_(memory), workspace_bytes_(kWorkspaceBytes) {
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
  // C is always D (accumulation is in place), so one layout serves both and every algorithm qualifies.
  cublasLtMatmulHeuristicResult_t result{};
  int found = 0;
  check(cublasLtMatmulAlgoGetHeuristic(handle_, plan->op, plan->a, plan->b, plan->d, plan->d, pref, 1, &result,
                                       &found),
        op, "cublasLtMatmulAlgoGetHeuristic");
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
  key.align_bias = mm.bias ? alignment_of(mm.bias) : 0;
  if (key.lda < (mm.trans_a ? key.k : key.m) || key.ldb < key.k || key.ldd < key.m)
    fail(op, "cublasLtMatmul", "row strides smaller than the row widths");
  Plan& plan = plan_for(key, mm.bias, capturing, op);
  if (mm.bias)
    check(cublasLtMatmulDescSetAttribute(plan.op, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &mm.bias, sizeof(mm.bias)), op,
          "cublasLtMatmulDescSetAttribute(BIAS_POINTER)");
  const float beta = mm.accumulate ? 1.0f : 0.0f;
  check(cublasLtMatmul(handle_, plan.op, &mm.alpha, mm.a, plan.a, mm.b, plan.b, &beta, mm.d, plan.d, mm.d, plan.d,
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
