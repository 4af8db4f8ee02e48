#pragma once
// The cuBLASLt plumbing the bf16 GEMMs (cublaslt_linear.cpp) and the FP8 GEMMs (fp8_linear.cpp) share, so both keep
// the same workspace size, alignment rules and object lifetimes.
#include <cublasLt.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>

#include "backend/cuda/cublaslt_linear.h"
#include "backend/cuda/cuda_check.h"

namespace fluxswap::cuda {

inline constexpr size_t kCublasLtWorkspaceBytes = size_t(32) << 20;

// The alignment cuBLASLt may assume for a pointer: its largest power-of-two divisor, capped at 256 bytes.
inline int alignment_of(const void* p) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  int al = 256;
  while (al > 1 && a % al) al /= 2;
  return al;
}

// The alignment every matrix of a strided batch keeps: the first one's, capped by the stride's.
inline int alignment_of(const void* p, int64_t batch, int64_t stride, size_t element_bytes) {
  const int al = alignment_of(p);
  if (batch <= 1) return al;
  return std::min(al, alignment_of(reinterpret_cast<const void*>(uintptr_t(stride) * element_bytes)));
}

inline cublasLtEpilogue_t to_cublas(GemmEpilogue e) {
  switch (e) {
    case GemmEpilogue::Bias: return CUBLASLT_EPILOGUE_BIAS;
    case GemmEpilogue::Gelu: return CUBLASLT_EPILOGUE_GELU;
    case GemmEpilogue::GeluBias: return CUBLASLT_EPILOGUE_GELU_BIAS;
    case GemmEpilogue::None: break;
  }
  return CUBLASLT_EPILOGUE_DEFAULT;
}

// The search preferences of one heuristic query. A member owns the handle, so it is destroyed even when a check()
// in the constructor throws after the create succeeded.
class LtPreference {
 public:
  // C is always D in these GEMMs, so C takes D's alignment. `align_what` names all four alignment attributes in
  // an error at once; null names each one.
  LtPreference(uint64_t workspace_bytes, uint32_t align_a, uint32_t align_b, uint32_t align_d, const char* op,
               const char* align_what = nullptr) {
    check(cublasLtMatmulPreferenceCreate(&owner_.p), op, "cublasLtMatmulPreferenceCreate");
    check(cublasLtMatmulPreferenceSetAttribute(owner_.p, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &workspace_bytes,
                                               sizeof(workspace_bytes)),
          op, "cublasLtMatmulPreferenceSetAttribute(MAX_WORKSPACE_BYTES)");
    const struct {
      cublasLtMatmulPreferenceAttributes_t attr;
      uint32_t value;
      const char* what;
    } alignments[] = {
        {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, align_a,
         "cublasLtMatmulPreferenceSetAttribute(MIN_ALIGNMENT_A_BYTES)"},
        {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, align_b,
         "cublasLtMatmulPreferenceSetAttribute(MIN_ALIGNMENT_B_BYTES)"},
        {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, align_d,
         "cublasLtMatmulPreferenceSetAttribute(MIN_ALIGNMENT_C_BYTES)"},
        {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, align_d,
         "cublasLtMatmulPreferenceSetAttribute(MIN_ALIGNMENT_D_BYTES)"},
    };
    for (const auto& al : alignments)
      check(cublasLtMatmulPreferenceSetAttribute(owner_.p, al.attr, &al.value, sizeof(al.value)), op,
            align_what ? align_what : al.what);
  }

  cublasLtMatmulPreference_t get() const { return owner_.p; }

 private:
  struct Owner {
    cublasLtMatmulPreference_t p = nullptr;
    Owner() = default;
    Owner(const Owner&) = delete;
    Owner& operator=(const Owner&) = delete;
    ~Owner() {
      if (p) cublasLtMatmulPreferenceDestroy(p);
    }
  } owner_;
};

// The descriptor and layouts of one planned GEMM, freed in reverse order of creation. Plans derive from it, so a
// check() that throws halfway through planning frees what was already made.
struct LtMatmulObjects {
  cublasLtMatmulDesc_t op = nullptr;
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, d = nullptr;

  LtMatmulObjects() = default;
  LtMatmulObjects(const LtMatmulObjects&) = delete;
  LtMatmulObjects& operator=(const LtMatmulObjects&) = delete;
  ~LtMatmulObjects() {
    if (d) cublasLtMatrixLayoutDestroy(d);
    if (b) cublasLtMatrixLayoutDestroy(b);
    if (a) cublasLtMatrixLayoutDestroy(a);
    if (op) cublasLtMatmulDescDestroy(op);
  }

  // C is always D (accumulation in place, or beta 0), so one layout serves both. The status is returned, not
  // checked: the FP8 planner treats some failures as "no algorithm".
  cublasStatus_t heuristic(cublasLtHandle_t handle, const LtPreference& pref, cublasLtMatmulHeuristicResult_t& result,
                           int& found) const {
    return cublasLtMatmulAlgoGetHeuristic(handle, op, a, b, d, d, pref.get(), 1, &result, &found);
  }
};

}  // namespace fluxswap::cuda
