#include "backend/cuda/fp8_linear.h"

#include <string>

#include "backend/cuda/cublaslt_common.h"
#include "backend/cuda/cuda_check.h"
#include "backend/cuda/fp8_quant_kernels.h"

namespace fluxswap::cuda {

namespace {

bool has_bias(GemmEpilogue e) { return e == GemmEpilogue::Bias || e == GemmEpilogue::GeluBias; }
bool has_gelu(GemmEpilogue e) { return e == GemmEpilogue::Gelu || e == GemmEpilogue::GeluBias; }

int current_device() {
  int device = 0;
  check(cudaGetDevice(&device), "linear_fp8", "cudaGetDevice");
  return device;
}

void require_fp8(int device) {
  std::string why;
  if (!fp8_gemm_supported(device, &why)) throw Error("cuda backend: linear_fp8: " + why);
}

template <typename T>
void set(cublasLtMatmulDesc_t desc, cublasLtMatmulDescAttributes_t attr, const T& value, const char* op,
         const char* what) {
  check(cublasLtMatmulDescSetAttribute(desc, attr, &value, sizeof(value)), op, what);
}

}  // namespace

bool fp8_gemm_supported(int device, std::string* why) {
  int major = 0, minor = 0;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess ||
      cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device) != cudaSuccess) {
    cudaGetLastError();  // the next launch check must not see this query's error
    if (why) *why = "cannot query the compute capability of device " + std::to_string(device);
    return false;
  }
  if (major * 10 + minor < 89) {
    if (why)
      *why = "FP8 GEMMs need compute capability 8.9 or newer (Ada, Hopper); device " + std::to_string(device) +
             " is " + std::to_string(major) + "." + std::to_string(minor);
    return false;
  }
  return true;
}

const char* fp8_gemm_path_name(Fp8GemmPath path) {
  switch (path) {
    case Fp8GemmPath::OuterVec: return "outer-vec";
    case Fp8GemmPath::OuterVecThenEpilogue: return "outer-vec+epilogue-kernel";
    case Fp8GemmPath::Fallback: return "fallback";
  }
  return "?";
}

struct CublasLtFp8Linear::Pointers {
  const void* bias;
  const float *sx, *sw;
};

struct CublasLtFp8Linear::Plan : LtMatmulObjects {
  Fp8GemmPath path = Fp8GemmPath::Fallback;
  bool confirmed = false;  // a cublasLtMatmul with it has succeeded
  cublasLtMatmulAlgo_t algo{};
};

CublasLtFp8Linear::CublasLtFp8Linear(DeviceMemory& memory, Options options) : options_(options) {
  require_fp8(current_device());
  check(cublasLtCreate(&handle_), "linear_fp8", "cublasLtCreate");
  own_handle_ = true;
  try {
    own_workspace_ = memory.allocate(kCublasLtWorkspaceBytes, "linear_fp8 workspace");
  } catch (...) {
    cublasLtDestroy(handle_);
    throw;
  }
  workspace_ = own_workspace_.get();
  workspace_bytes_ = kCublasLtWorkspaceBytes;
}

CublasLtFp8Linear::CublasLtFp8Linear(cublasLtHandle_t handle, void* workspace, size_t workspace_bytes,
                                     Options options)
    : options_(options), handle_(handle), workspace_(workspace), workspace_bytes_(workspace_bytes) {
  require_fp8(current_device());
}

CublasLtFp8Linear::~CublasLtFp8Linear() {
  plans_.clear();
  if (own_handle_ && handle_) cublasLtDestroy(handle_);
}

// Null when this cuBLASLt has no algorithm for the path (or does not know its scale mode).
std::unique_ptr<CublasLtFp8Linear::Plan> CublasLtFp8Linear::make_plan(const Key& key, Fp8GemmPath path,
                                                                      const Pointers& ptr, const char* op) {
  auto plan = std::make_unique<Plan>();
  plan->path = path;
  check(cublasLtMatmulDescCreate(&plan->op, CUBLAS_COMPUTE_32F, CUDA_R_32F), op, "cublasLtMatmulDescCreate");
  set(plan->op, CUBLASLT_MATMUL_DESC_TRANSA, CUBLAS_OP_T, op, "cublasLtMatmulDescSetAttribute(TRANSA)");
  set(plan->op, CUBLASLT_MATMUL_DESC_TRANSB, CUBLAS_OP_N, op, "cublasLtMatmulDescSetAttribute(TRANSB)");
  if (options_.fast_accum)
    set(plan->op, CUBLASLT_MATMUL_DESC_FAST_ACCUM, int8_t(1), op, "cublasLtMatmulDescSetAttribute(FAST_ACCUM)");
  if (path != Fp8GemmPath::Fallback) {
    // D[i, j] = scale_A[i] * scale_B[j] * sum_l A[i, l] B[l, j]: i runs over nout (A = the weight), j over T.
    const int32_t mode = CUBLASLT_MATMUL_MATRIX_SCALE_OUTER_VEC_32F;
    if (cublasLtMatmulDescSetAttribute(plan->op, CUBLASLT_MATMUL_DESC_A_SCALE_MODE, &mode, sizeof(mode)) !=
            CUBLAS_STATUS_SUCCESS ||
        cublasLtMatmulDescSetAttribute(plan->op, CUBLASLT_MATMUL_DESC_B_SCALE_MODE, &mode, sizeof(mode)) !=
            CUBLAS_STATUS_SUCCESS)
      return nullptr;
    set(plan->op, CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, static_cast<const void*>(ptr.sw), op,
        "cublasLtMatmulDescSetAttribute(A_SCALE_POINTER)");
    set(plan->op, CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, static_cast<const void*>(ptr.sx), op,
        "cublasLtMatmulDescSetAttribute(B_SCALE_POINTER)");
  }
  // Only the fully fused path hands the epilogue to cuBLASLt: elsewhere the bias must come after scales that
  // cuBLASLt does not apply, or no algorithm fused it.
  const GemmEpilogue fused = path == Fp8GemmPath::OuterVec ? GemmEpilogue(key.epilogue) : GemmEpilogue::None;
  set(plan->op, CUBLASLT_MATMUL_DESC_EPILOGUE, to_cublas(fused), op, "cublasLtMatmulDescSetAttribute(EPILOGUE)");
  if (has_bias(fused)) {
    // Spelled out: the default bias type of FP8 products is not the output type in every cuBLASLt version.
    set(plan->op, CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, int32_t(CUDA_R_16BF), op,
        "cublasLtMatmulDescSetAttribute(BIAS_DATA_TYPE)");
    // The heuristic takes the bias alignment from the pointer in the descriptor.
    set(plan->op, CUBLASLT_MATMUL_DESC_BIAS_POINTER, ptr.bias, op, "cublasLtMatmulDescSetAttribute(BIAS_POINTER)");
  }

  check(cublasLtMatrixLayoutCreate(&plan->a, CUDA_R_8F_E4M3, uint64_t(key.k), uint64_t(key.m), key.ldw), op,
        "cublasLtMatrixLayoutCreate(A)");
  check(cublasLtMatrixLayoutCreate(&plan->b, CUDA_R_8F_E4M3, uint64_t(key.k), uint64_t(key.n), key.ldx), op,
        "cublasLtMatrixLayoutCreate(B)");
  check(cublasLtMatrixLayoutCreate(&plan->d, CUDA_R_16BF, uint64_t(key.m), uint64_t(key.n), key.ldy), op,
        "cublasLtMatrixLayoutCreate(D)");

  const LtPreference pref(workspace_bytes_, uint32_t(key.align_w), uint32_t(key.align_x), uint32_t(key.align_y), op,
                          "cublasLtMatmulPreferenceSetAttribute(MIN_ALIGNMENT)");

  cublasLtMatmulHeuristicResult_t result{};
  int found = 0;
  const cublasStatus_t status = plan->heuristic(handle_, pref, result, found);
  // An unsupported scale mode or type combination may be reported as a status instead of zero results.
  if (status == CUBLAS_STATUS_NOT_SUPPORTED || status == CUBLAS_STATUS_INVALID_VALUE || found == 0) return nullptr;
  check(status, op, "cublasLtMatmulAlgoGetHeuristic");
  plan->algo = result.algo;
  return plan;
}

// The first available path at or after `from`, in the order OuterVec, OuterVecThenEpilogue, Fallback.
std::unique_ptr<CublasLtFp8Linear::Plan> CublasLtFp8Linear::first_plan(const Key& key, Fp8GemmPath from,
                                                                       const Pointers& ptr, const char* op) {
  const bool epilogue = GemmEpilogue(key.epilogue) != GemmEpilogue::None;
  if (from == Fp8GemmPath::OuterVec)
    if (auto plan = make_plan(key, Fp8GemmPath::OuterVec, ptr, op)) return plan;
  // Without an epilogue the split path is the fused one.
  if (from != Fp8GemmPath::Fallback && epilogue)
    if (auto plan = make_plan(key, Fp8GemmPath::OuterVecThenEpilogue, ptr, op)) return plan;
  if (auto plan = make_plan(key, Fp8GemmPath::Fallback, ptr, op)) return plan;
  fail(op, "cublasLtMatmulAlgoGetHeuristic",
       "no FP8 algorithm for m " + std::to_string(key.m) + ", n " + std::to_string(key.n) + ", k " +
           std::to_string(key.k) + ", lda " + std::to_string(key.ldw) + ", ldb " + std::to_string(key.ldx) +
           ", ldd " + std::to_string(key.ldy));
}

void CublasLtFp8Linear::run(const Fp8Rows& x, const Fp8Rows& w, const void* bias, void* y, int64_t ldy, int64_t T,
                            int64_t K, int64_t nout, GemmEpilogue epilogue, bool capturing, cudaStream_t stream,
                            const char* op) {
  issue(x, w, bias, y, ldy, T, K, nout, epilogue, false, capturing, stream, op);
}

bool CublasLtFp8Linear::run_residual(const Fp8Rows& x, const Fp8Rows& w, const void* bias, void* acc, int64_t ld,
                                     int64_t T, int64_t K, int64_t nout, bool capturing, cudaStream_t stream,
                                     const char* op) {
  return issue(x, w, bias, acc, ld, T, K, nout, bias ? GemmEpilogue::Bias : GemmEpilogue::None, true, capturing,
               stream, op);
}

bool CublasLtFp8Linear::issue(const Fp8Rows& x, const Fp8Rows& w, const void* bias, void* y, int64_t ldy, int64_t T,
                              int64_t K, int64_t nout, GemmEpilogue epilogue, bool residual, bool capturing,
                              cudaStream_t stream, const char* op) {
  if (T == 0 || nout == 0) return true;
  const char* call = "cublasLtMatmul";
  if (K <= 0 || K % 16)
    fail(op, call, "FP8 GEMMs need the inner dimension to be a positive multiple of 16; it is " + std::to_string(K));
  if (x.ld < K || w.ld < K || ldy < nout) fail(op, call, "row strides smaller than the row widths");
  if (x.ld % 16 || w.ld % 16 || alignment_of(x.q) < 16 || alignment_of(w.q) < 16)
    fail(op, call, "FP8 operands need 16-byte aligned rows: row strides multiples of 16, pointers 16-byte aligned");
  if (nout % 8 || ldy % 8 || alignment_of(y) < 16)
    fail(op, call, "the bf16 output needs 16-byte aligned rows: nout and its row stride multiples of 8, y 16-byte "
                   "aligned");
  if (!x.scale || !w.scale) fail(op, call, "every FP8 operand needs its row scales");
  if (has_bias(epilogue) != (bias != nullptr)) fail(op, call, "a bias is given exactly when the epilogue adds one");

  Key key{};
  key.m = nout, key.n = T, key.k = K;
  key.ldx = x.ld, key.ldw = w.ld, key.ldy = ldy;
  key.epilogue = int(epilogue);
  key.align_x = alignment_of(x.q), key.align_w = alignment_of(w.q), key.align_y = alignment_of(y);
  key.align_bias = bias ? alignment_of(bias) : 0;
  key.align_sx = alignment_of(x.scale), key.align_sw = alignment_of(w.scale);
  key.residual = residual;
  const Pointers ptr{bias, x.scale, w.scale};

  auto it = plans_.find(key);
  if (it == plans_.end()) {
    if (capturing)
      throw Error(std::string("cuda backend: ") + op + ": an FP8 GEMM of a new shape (m " + std::to_string(nout) +
                  ", n " + std::to_string(T) + ", k " + std::to_string(K) +
                  ") was first issued while recording; run the work once before record()");
    std::unique_ptr<Plan> plan;
    if (!residual)
      plan = first_plan(key, options_.force_fallback ? Fp8GemmPath::Fallback : Fp8GemmPath::OuterVec, ptr, op);
    else if (!options_.force_fallback)  // the scales and bias must act before C is added: the fully fused path only
      plan = make_plan(key, Fp8GemmPath::OuterVec, ptr, op);
    it = plans_.emplace(key, std::move(plan)).first;
  }
  if (!it->second) return false;
  const float alpha = 1.0f, beta = residual ? 1.0f : 0.0f;
  for (;;) {
    Plan& plan = *it->second;
    if (plan.path != Fp8GemmPath::Fallback) {
      set(plan.op, CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, static_cast<const void*>(w.scale), op,
          "cublasLtMatmulDescSetAttribute(A_SCALE_POINTER)");
      set(plan.op, CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, static_cast<const void*>(x.scale), op,
          "cublasLtMatmulDescSetAttribute(B_SCALE_POINTER)");
    }
    if (plan.path == Fp8GemmPath::OuterVec && bias)
      set(plan.op, CUBLASLT_MATMUL_DESC_BIAS_POINTER, bias, op, "cublasLtMatmulDescSetAttribute(BIAS_POINTER)");
    const cublasStatus_t status = cublasLtMatmul(handle_, plan.op, &alpha, w.q, plan.a, x.q, plan.b, &beta, y, plan.d,
                                                 y, plan.d, &plan.algo, workspace_, workspace_bytes_, stream);
    if (status == CUBLAS_STATUS_SUCCESS) {
      plan.confirmed = true;
      break;
    }
    // A refusal of a plan never run before is a path this cuBLASLt does not have after all: take the next one.
    // Plans are made only outside recordings and confirmed by their first run, so this never happens in one.
    if (plan.confirmed || plan.path == Fp8GemmPath::Fallback) check(status, op, call);
    if (residual) {
      it->second.reset();
      return false;
    }
    const Fp8GemmPath next = plan.path == Fp8GemmPath::OuterVec ? Fp8GemmPath::OuterVecThenEpilogue
                                                                : Fp8GemmPath::Fallback;
    it->second = first_plan(key, next, ptr, op);
  }

  const Fp8GemmPath path = it->second->path;
  last_path_ = path;
  if (residual) return true;
  const Fp8Accumulator acc{y, false, ldy};
  auto* out = static_cast<__nv_bfloat16*>(y);
  const auto* bias_bf16 = static_cast<const __nv_bfloat16*>(bias);
  if (path == Fp8GemmPath::OuterVecThenEpilogue)
    launch_fp8_scale_epilogue(acc, nullptr, nullptr, bias_bf16, has_gelu(epilogue), T, nout, out, ldy, stream, op);
  else if (path == Fp8GemmPath::Fallback)
    launch_fp8_scale_epilogue(acc, x.scale, w.scale, bias_bf16, has_gelu(epilogue), T, nout, out, ldy, stream, op);
  return true;
}

}  // namespace fluxswap::cuda
