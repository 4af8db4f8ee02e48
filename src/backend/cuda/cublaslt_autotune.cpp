#include "backend/cuda/cublaslt_autotune.h"

#include <algorithm>
#include <cstdio>
#include <cstdlib>

namespace fluxswap::cuda {

namespace {

// Events for the timing, freed on every way out.
struct EventPair {
  cudaEvent_t begin = nullptr, end = nullptr;
  EventPair() {
    check(cudaEventCreate(&begin), "gemm autotune", "cudaEventCreate");
    if (cudaError_t e = cudaEventCreate(&end); e != cudaSuccess) {
      cudaEventDestroy(begin);
      check(e, "gemm autotune", "cudaEventCreate");
    }
  }
  ~EventPair() {
    cudaEventDestroy(end);
    cudaEventDestroy(begin);
  }
  EventPair(const EventPair&) = delete;
  EventPair& operator=(const EventPair&) = delete;
};

}  // namespace

int gemm_candidates_from_env() {
  const char* v = std::getenv("FLUXSWAP_GEMM_CANDIDATES");
  if (!v || !*v) return 1;
  return std::clamp(std::atoi(v), 1, 16);
}

cublasStatus_t heuristic_candidates(cublasLtHandle_t handle, const LtMatmulObjects& objects, const LtPreference& pref,
                                    int count, std::vector<cublasLtMatmulAlgo_t>& out) {
  std::vector<cublasLtMatmulHeuristicResult_t> results(size_t(std::max(count, 1)));
  int found = 0;
  const cublasStatus_t status = cublasLtMatmulAlgoGetHeuristic(handle, objects.op, objects.a, objects.b, objects.d,
                                                               objects.d, pref.get(), int(results.size()),
                                                               results.data(), &found);
  out.clear();
  if (status != CUBLAS_STATUS_SUCCESS) return status;
  for (int i = 0; i < found; ++i)
    if (results[size_t(i)].state == CUBLAS_STATUS_SUCCESS) out.push_back(results[size_t(i)].algo);
  return status;
}

GemmTuning time_candidates(const std::vector<cublasLtMatmulAlgo_t>& candidates, size_t scratch_bytes,
                           DeviceMemory& memory, cudaStream_t stream,
                           const std::function<cublasStatus_t(const cublasLtMatmulAlgo_t&, void*)>& issue) {
  const char* op = "gemm autotune";
  GemmTuning t;
  t.ms.assign(candidates.size(), -1.0f);
  if (candidates.size() < 2) return t;
  std::shared_ptr<void> scratch;
  try {
    scratch = memory.allocate(scratch_bytes, op);
  } catch (const Error&) {
    return t;  // no room to time in: the heuristic's first answer
  }
  EventPair ev;
  // A warm-up run each (it also finds the candidates that refuse the problem), then rounds of timed runs.
  std::vector<bool> ok(candidates.size());
  for (size_t c = 0; c < candidates.size(); ++c) {
    ok[c] = issue(candidates[c], scratch.get()) == CUBLAS_STATUS_SUCCESS;
    cudaGetLastError();  // a refusing candidate may leave a launch error behind
  }
  constexpr int kRounds = 3, kRuns = 2;
  for (int round = 0; round < kRounds; ++round)
    for (size_t c = 0; c < candidates.size(); ++c) {
      if (!ok[c]) continue;
      check(cudaEventRecord(ev.begin, stream), op, "cudaEventRecord");
      for (int r = 0; r < kRuns; ++r) issue(candidates[c], scratch.get());
      check(cudaEventRecord(ev.end, stream), op, "cudaEventRecord");
      check(cudaEventSynchronize(ev.end), op, "cudaEventSynchronize");
      float ms = 0;
      check(cudaEventElapsedTime(&ms, ev.begin, ev.end), op, "cudaEventElapsedTime");
      ms /= float(kRuns);
      if (t.ms[c] < 0 || ms < t.ms[c]) t.ms[c] = ms;
    }
  for (size_t c = 0; c < candidates.size(); ++c)
    if (t.ms[c] >= 0 && (t.ms[t.chosen] < 0 || t.ms[c] < t.ms[t.chosen])) t.chosen = c;
  // The scratch output is freed (cudaFree waits for the timed runs) before the product proper is issued.
  return t;
}

void log_gemm_tuning(const char* op, int64_t m, int64_t n, int64_t k, const GemmTuning& t) {
  const char* v = std::getenv("FLUXSWAP_GEMM_TUNE_LOG");
  if (!v || *v != '1' || t.ms.size() < 2) return;
  std::fprintf(stderr, "gemm autotune %s m %lld n %lld k %lld: chose #%zu (%.4f ms; heuristic's first %.4f ms):", op,
               (long long)m, (long long)n, (long long)k, t.chosen, double(t.ms[t.chosen]), double(t.ms[0]));
  for (float ms : t.ms) std::fprintf(stderr, " %.4f", double(ms));
  std::fprintf(stderr, "\n");
}

}  // namespace fluxswap::cuda
