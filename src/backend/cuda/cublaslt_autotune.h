#pragma once
// GEMM algorithms chosen by measurement. cuBLASLt's heuristic ranks its algorithms by a model of the GPU; for the
// wide FLUX shapes that model is not always right about tile shape, cluster shape or stream-K. With more than one
// candidate asked for, a plan keeps the heuristic's first `candidates` answers and, on its first eager run, times
// each on the actual operands (writing a scratch output, so no result and no accumulation is disturbed) and keeps
// the fastest. One product per candidate costs well under a millisecond; a FLUX step has ~25 shapes.
#include <cublasLt.h>
#include <cuda_runtime.h>

#include <functional>
#include <string>
#include <vector>

#include "backend/cuda/cublaslt_common.h"
#include "backend/cuda/device_memory.h"

namespace fluxswap::cuda {

// FLUXSWAP_GEMM_CANDIDATES (1 to 16; default 1: the heuristic's first answer, untimed).
int gemm_candidates_from_env();

// The heuristic's first `count` answers (fewer when it has fewer). The status is returned, not checked (the FP8
// planner treats some failures as "no algorithm").
cublasStatus_t heuristic_candidates(cublasLtHandle_t handle, const LtMatmulObjects& objects, const LtPreference& pref,
                                    int count, std::vector<cublasLtMatmulAlgo_t>& out);

// What timing the candidates found (FLUXSWAP_GEMM_TUNE_LOG=1 prints it to stderr).
struct GemmTuning {
  size_t chosen = 0;
  std::vector<float> ms;  // per candidate, the fastest of its timed runs; < 0: the candidate refused the problem
};

// Runs `issue(algo, scratch_d)` (one product into scratch_d on `stream`) for every candidate, a few times each,
// interleaved so clock drift falls on all; returns the fastest one's index and the times. `scratch_bytes` of scratch
// output are allocated from `memory` for the duration; where that fails, candidate 0 is kept untimed.
GemmTuning time_candidates(const std::vector<cublasLtMatmulAlgo_t>& candidates, size_t scratch_bytes,
                           DeviceMemory& memory, cudaStream_t stream,
                           const std::function<cublasStatus_t(const cublasLtMatmulAlgo_t&, void*)>& issue);

// "m 3072 n 4608 k 15360" and the times, for the log.
void log_gemm_tuning(const char* op, int64_t m, int64_t n, int64_t k, const GemmTuning& t);

}  // namespace fluxswap::cuda
