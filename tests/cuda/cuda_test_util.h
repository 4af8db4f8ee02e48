#pragma once
// Helpers for the CUDA tests: a GPU backend (or a skip when there is none), and buffers that exist on both the GPU
// backend (bf16) and the CPU reference (float32 holding exactly the same bf16 values), so that a comparison
// measures only the difference in computation.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdlib>
#include <limits>
#include <memory>
#include <string>

#include "backend/backend.h"
#include "core/compare.h"
#include "core/error.h"
#include "../test_support.h"

namespace fluxswap::test {

// The CUDA backend with FLUXSWAP_ATTENTION set to `attention` ("" leaves the default); null when there is no GPU.
inline std::unique_ptr<Backend> try_cuda(std::string* why, const char* attention = "") {
  if (*attention)
    setenv("FLUXSWAP_ATTENTION", attention, 1);
  else
    unsetenv("FLUXSWAP_ATTENTION");
  try {
    auto be = make_cuda_backend(0);
    unsetenv("FLUXSWAP_ATTENTION");
    return be;
  } catch (const Error& e) {
    unsetenv("FLUXSWAP_ATTENTION");
    *why = e.what();
    return nullptr;
  }
}

#define FLUXSWAP_CUDA_BACKEND(var, ...)                     \
  std::string var##_why;                                    \
  auto var = ::fluxswap::test::try_cuda(&var##_why, ##__VA_ARGS__); \
  if (!var) GTEST_SKIP() << "no CUDA backend: " << var##_why

// A test with the GPU backend and the CPU reference side by side (skipped without a GPU).
class GpuAndCpu : public ::testing::Test {
 protected:
  void SetUp() override {
    gpu_ = try_cuda(&why_);
    if (!gpu_) GTEST_SKIP() << "no CUDA backend: " << why_;
    cpu_ = make_cpu_backend();
  }
  std::string why_;
  std::unique_ptr<Backend> gpu_, cpu_;
};

// One logical tensor on both backends.
struct Pair {
  Tensor gpu, cpu;
  Pair narrow(int dim, int64_t start, int64_t length) const {
    return {gpu.narrow(dim, start, length), cpu.narrow(dim, start, length)};
  }
};

// A device tensor's bytes on the host, as they are (no conversion).
inline Tensor download_raw(Backend& gpu, const Tensor& t) {
  Tensor h = Tensor::empty(t.dtype(), t.shape());
  gpu.copy_to_host(t, h);
  gpu.synchronize();
  return h;
}

// Random bf16 values on the GPU; the CPU side holds the same values in float32.
inline Pair random_pair(Backend& gpu, const Shape& shape, uint64_t seed, float std = 1.0f, float mean = 0.0f) {
  Tensor g = gpu.empty(DType::BF16, shape);
  gpu.fill_normal(g, seed, mean, std);
  return {g, gpu.to_host_f32(g)};
}

// NaN everywhere: an output that must be overwritten.
inline Pair nan_pair(Backend& gpu, const Shape& shape) {
  Tensor h = Tensor::empty(DType::F32, shape);
  for (int64_t i = 0; i < h.numel(); ++i) h.ptr<float>()[i] = std::numeric_limits<float>::quiet_NaN();
  Tensor g = gpu.empty(DType::BF16, shape);
  gpu.copy_from_host(h, g);
  return {g, h};
}

// A float32 host tensor uploaded as float32 (inputs the ops take in float32: timesteps, the RoPE table).
inline Pair f32_pair(Backend& gpu, const Tensor& host) {
  Tensor g = gpu.empty(DType::F32, host.shape());
  gpu.copy_from_host(host, g);
  return {g, host};
}

inline int64_t count_finite(const Tensor& host_f32) {
  Tensor c = host_f32.to_f32();
  int64_t n = 0;
  for (int64_t i = 0; i < c.numel(); ++i) n += std::isfinite(c.ptr<float>()[i]) ? 1 : 0;
  return n;
}

// How the ops see their rows, as flux_transformer.cpp creates them.
enum class Layout {
  Contiguous,   // a packed [B, N, C] tensor
  Columns,      // a column slice of a wider buffer (row stride > C), 16-byte aligned
  PaddedBatch,  // a row and column slice: batch stride > N * row stride
  Unaligned,    // a column slice starting 3 elements in (no 16-byte accesses possible)
};

inline const char* layout_name(Layout l) {
  switch (l) {
    case Layout::Contiguous: return "contiguous";
    case Layout::Columns: return "columns";
    case Layout::PaddedBatch: return "padded-batch";
    case Layout::Unaligned: return "unaligned";
  }
  return "?";
}

constexpr Layout kLayouts[] = {Layout::Contiguous, Layout::Columns, Layout::PaddedBatch, Layout::Unaligned};

// Rows [B, N, C] laid out as `layout` inside `full`; full is random (seed, normal(mean, 1)) or NaN-poisoned
// (seed 0).
struct RowsCase {
  Pair full, view;
};

inline RowsCase make_rows(Backend& gpu, int64_t B, int64_t N, int64_t C, Layout layout, uint64_t seed,
                          float mean = 0.0f) {
  const int64_t row0 = layout == Layout::PaddedBatch ? 1 : 0, extra_rows = layout == Layout::PaddedBatch ? 3 : 0;
  const int64_t col0 = layout == Layout::Contiguous ? 0 : layout == Layout::Unaligned ? 3 : 8;
  const int64_t W = layout == Layout::Contiguous ? C : C + col0 + 13;
  const Shape shape{B, N + extra_rows, W};
  Pair full = seed ? random_pair(gpu, shape, seed, 1.0f, mean) : nan_pair(gpu, shape);
  return {full, full.narrow(1, row0, N).narrow(2, col0, C)};
}

// The GPU result of an op whose output was NaN-poisoned: every element of the view must have been written and
// nothing outside it. Returns max|gpu - cpu| / max|cpu| over the view (infinite when a NaN is left).
inline double poisoned_output_error(Backend& gpu, const RowsCase& out) {
  const Tensor full = gpu.to_host_f32(out.full.gpu);
  const int64_t finite = count_finite(full);
  EXPECT_EQ(finite, out.view.gpu.numel()) << "elements written outside the output view (or left unwritten)";
  return max_rel_error(gpu.to_host_f32(out.view.gpu), out.view.cpu);
}

}  // namespace fluxswap::test
