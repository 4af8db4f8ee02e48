// linear_fp8_batch (the modulation linears in one launch) on the GPU:
//  - bit for bit the per-item linear_fp8 it stands for (both run the FP8 GEMV's arithmetic: the same MMAs per
//    feature, the same order of partial sums): several items of different widths, odd ones and ones under a tile,
//    with and without bias, outputs as column chunks of one wide buffer (NaN-poisoned: nothing written outside them)
//    and one on its own; B = 1 and 2; K = 3072 (FLUX), 4096 (the widest the kernel takes), 64, 48. Also within 1e-2
//    of the CPU's linear_fp8 (max|a-b|/max|b|, as test_cuda_fp8_gemv.cpp: reordered float32 sums, bf16 output).
//  - an input the GEMV does not take (3 rows) runs every item through linear_fp8's GEMM path: still equal to it.
//  - recorded into a graph after one eager call, replayed on new input values: equal to linear_fp8 on them; a list
//    first issued while recording is refused (its descriptors would need an upload).
#include <algorithm>
#include <cstring>
#include <iterator>

#include "cuda_test_util.h"

namespace fluxswap::test {
namespace {

// An FP8 linear on the GPU, and its host copy for the CPU reference.
struct Fp8Linear {
  Tensor wq, ws, bias;              // GPU
  Tensor wq_cpu, ws_cpu, bias_cpu;  // host
  int64_t nout;
};

Fp8Linear make_linear(Backend& gpu, int64_t nout, int64_t K, uint64_t seed, bool with_bias) {
  Fp8Linear l;
  l.nout = nout;
  const Pair w = random_pair(gpu, {nout, K}, seed, 0.02f);
  l.wq = gpu.empty(DType::F8_E4M3, {nout, K});
  l.ws = gpu.empty(DType::F32, {nout});
  gpu.quantize_fp8_rows(w.gpu, l.wq, l.ws);
  l.wq_cpu = download_raw(gpu, l.wq);
  l.ws_cpu = gpu.to_host_f32(l.ws);
  if (with_bias) {
    const Pair b = random_pair(gpu, {nout}, seed + 1, 0.5f);
    l.bias = b.gpu;
    l.bias_cpu = b.cpu;
  }
  return l;
}

// The items' outputs: the first ones as column chunks of one [B, total + pad] buffer, the last in a buffer of its own.
struct Outputs {
  Tensor wide, own;
  std::vector<Tensor> views;
};

Outputs make_outputs(Backend& gpu, int64_t B, const std::vector<Fp8Linear>& ls, int64_t pad = 5) {
  int64_t total = 0;
  for (size_t i = 0; i + 1 < ls.size(); ++i) total += ls[i].nout;
  Outputs o{nan_pair(gpu, {B, total + pad}).gpu, nan_pair(gpu, {B, ls.back().nout}).gpu, {}};
  int64_t col = 0;
  for (size_t i = 0; i + 1 < ls.size(); ++i) {
    o.views.push_back(o.wide.narrow(1, col, ls[i].nout));
    col += ls[i].nout;
  }
  o.views.push_back(o.own);
  return o;
}

std::vector<Backend::Fp8LinearItem> items_of(const std::vector<Fp8Linear>& ls, const Outputs& o) {
  std::vector<Backend::Fp8LinearItem> items;
  for (size_t i = 0; i < ls.size(); ++i) items.push_back({ls[i].wq, ls[i].ws, ls[i].bias, o.views[i]});
  return items;
}

void expect_same_outputs(Backend& gpu, const Outputs& a, const Outputs& b, const std::string& what) {
  EXPECT_TRUE(same_bytes(download_raw(gpu, a.wide), download_raw(gpu, b.wide))) << what << ": outputs in the wide buffer";
  EXPECT_TRUE(same_bytes(download_raw(gpu, a.own), download_raw(gpu, b.own))) << what << ": the output of its own";
}

struct BatchCase {
  int64_t B, K;
};

class CudaFp8GemvBatch : public GpuAndCpu, public ::testing::WithParamInterface<BatchCase> {};

TEST_P(CudaFp8GemvBatch, IsLinearFp8PerItemBitForBit) {
  const auto [B, K] = GetParam();
  const std::string what = "B " + std::to_string(B) + " K " + std::to_string(K);
  SCOPED_TRACE(what);
  const Pair x = random_pair(*gpu_, {B, K}, 11, 2.0f);
  std::vector<Fp8Linear> ls;
  const int64_t nouts[] = {9216, 33, 1, 1000, 17, 160, 6144};
  for (size_t i = 0; i < std::size(nouts); ++i) ls.push_back(make_linear(*gpu_, nouts[i], K, 20 + 3 * i, i % 3 != 1));
  const Outputs batch = make_outputs(*gpu_, B, ls), each = make_outputs(*gpu_, B, ls);
  gpu_->linear_fp8_batch(x.gpu, items_of(ls, batch));
  for (size_t i = 0; i < ls.size(); ++i)
    gpu_->linear_fp8(x.gpu, ls[i].wq, ls[i].ws, ls[i].bias, each.views[i], Activation::None);
  expect_same_outputs(*gpu_, batch, each, what);

  double worst = 0;
  for (size_t i = 0; i < ls.size(); ++i) {
    const Tensor want = Tensor::empty(DType::F32, {B, ls[i].nout});
    cpu_->linear_fp8(x.cpu, ls[i].wq_cpu, ls[i].ws_cpu, ls[i].bias_cpu, want, Activation::None);
    worst = std::max(worst, max_rel_error(gpu_->to_host_f32(batch.views[i]), want));
  }
  std::printf("[ fp8 batch] %s, %zu items: bit for bit with linear_fp8; worst item vs CPU %.3g\n", what.c_str(),
              ls.size(), worst);
  EXPECT_LE(worst, 1e-2);
}

INSTANTIATE_TEST_SUITE_P(Shapes, CudaFp8GemvBatch,
                         ::testing::Values(BatchCase{1, 3072}, BatchCase{2, 3072}, BatchCase{2, 4096},
                                           BatchCase{1, 64}, BatchCase{2, 48}));

class CudaFp8GemvBatchPaths : public GpuAndCpu {};

TEST_F(CudaFp8GemvBatchPaths, RowsTheKernelDoesNotTakeRunAsLinearFp8) {
  const Pair x = random_pair(*gpu_, {3, 64}, 31, 1.0f);
  const std::vector<Fp8Linear> ls = {make_linear(*gpu_, 48, 64, 32, true), make_linear(*gpu_, 16, 64, 34, false)};
  // (The GEMM path writes 16-byte aligned rows only: no padding column.)
  const Outputs batch = make_outputs(*gpu_, 3, ls, 0), each = make_outputs(*gpu_, 3, ls, 0);
  gpu_->linear_fp8_batch(x.gpu, items_of(ls, batch));
  for (size_t i = 0; i < ls.size(); ++i)
    gpu_->linear_fp8(x.gpu, ls[i].wq, ls[i].ws, ls[i].bias, each.views[i], Activation::None);
  expect_same_outputs(*gpu_, batch, each, "3 rows");
}

TEST_F(CudaFp8GemvBatchPaths, RecordsAndReplays) {
  const int64_t B = 2, K = 3072;
  const Tensor x = gpu_->empty(DType::BF16, {B, K});
  gpu_->fill_normal(x, 41, 0.0f, 1.0f);
  const std::vector<Fp8Linear> ls = {make_linear(*gpu_, 1000, K, 42, true), make_linear(*gpu_, 33, K, 44, false),
                                     make_linear(*gpu_, 3072, K, 46, true)};
  const Outputs batch = make_outputs(*gpu_, B, ls), each = make_outputs(*gpu_, B, ls);
  const auto items = items_of(ls, batch);
  gpu_->linear_fp8_batch(x, items);  // eager: uploads the list
  auto work = gpu_->record([&] { gpu_->linear_fp8_batch(x, items); });
  gpu_->fill_normal(x, 43, 0.5f, 2.0f);
  work->replay();
  for (size_t i = 0; i < ls.size(); ++i)
    gpu_->linear_fp8(x, ls[i].wq, ls[i].ws, ls[i].bias, each.views[i], Activation::None);
  expect_same_outputs(*gpu_, batch, each, "replayed");

  const std::vector<Backend::Fp8LinearItem> unseen = {items[1], items[0]};
  EXPECT_THROW(gpu_->record([&] { gpu_->linear_fp8_batch(x, unseen); }), Error);
}

TEST_F(CudaFp8GemvBatchPaths, MismatchedItemsAreRefused) {
  const Tensor x = gpu_->empty(DType::BF16, {1, 64});
  gpu_->fill_normal(x, 51, 0.0f, 1.0f);
  const Fp8Linear l = make_linear(*gpu_, 32, 64, 52, true);
  EXPECT_THROW(gpu_->linear_fp8_batch(x, {{l.wq, l.ws, l.bias, gpu_->empty(DType::BF16, {1, 31})}}), Error);
  EXPECT_THROW(gpu_->linear_fp8_batch(x, {{l.wq, l.ws, l.bias, gpu_->empty(DType::BF16, {2, 32})}}), Error);
  EXPECT_THROW(gpu_->linear_fp8_batch(gpu_->empty(DType::BF16, {1, 48}),
                                      {{l.wq, l.ws, l.bias, gpu_->empty(DType::BF16, {1, 32})}}),
               Error);
  EXPECT_NO_THROW(gpu_->linear_fp8_batch(x, {}));
}

}  // namespace
}  // namespace fluxswap::test
