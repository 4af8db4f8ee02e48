// The CUDA LoRA, sampler and text-encoder ops against the float32 CPU reference on the same bf16 input values, in
// the layouts the models use them (column slices, padded batches, unaligned slices, 2-D per-sample rows), with
// NaN-poisoned outputs and the in-place forms. Tolerance as in test_cuda_ops.cpp: max|gpu - cpu| / max|cpu| <= 1e-2
// for bf16 outputs; copies are exact.
#include <cmath>
#include <cstdio>
#include <cstring>
#include <functional>
#include <vector>

#include "cuda_test_util.h"

namespace fluxswap::test {
namespace {

constexpr double kTol = 1e-2;

class CudaLoraOps : public GpuAndCpu {};
using CudaTextOps = CudaLoraOps;

std::string where(int64_t B, int64_t N, int64_t C, Layout layout) {
  return "B " + std::to_string(B) + " N " + std::to_string(N) + " C " + std::to_string(C) + " " + layout_name(layout);
}

// The same rows case with float32 elements on the GPU (same values, same layout inside the same-shaped buffer).
RowsCase as_f32(Backend& gpu, const RowsCase& c) {
  Tensor full = gpu.empty(DType::F32, c.full.cpu.shape());
  gpu.copy_from_host(c.full.cpu, full);
  const int64_t off = (static_cast<const char*>(c.view.gpu.data()) - static_cast<const char*>(c.full.gpu.data())) / 2;
  const int64_t W = c.full.cpu.size(2);
  const Tensor view = full.narrow(1, off / W, c.view.cpu.size(1)).narrow(2, off % W, c.view.cpu.size(2));
  return {{full, c.full.cpu}, {view, c.view.cpu}};
}

// An output RowsCase that is a whole NaN-poisoned tensor.
RowsCase poisoned(Backend& gpu, const Shape& shape) {
  RowsCase r{nan_pair(gpu, shape), {}};
  r.view = r.full;
  return r;
}

// ---- Sampler and LoRA ops ----

TEST_F(CudaLoraOps, AxpyInEveryDtypeAndLayout) {
  uint64_t seed = 100;
  for (bool y_f32 : {false, true})
    for (bool x_f32 : {false, true})
      for (int64_t B : {1, 2})
        for (int64_t N : {1, 77, 333})
          for (Layout layout : kLayouts) {
            const int64_t C = 64;
            RowsCase y = make_rows(*gpu_, B, N, C, layout, ++seed), x = make_rows(*gpu_, B, N, C, layout, ++seed);
            if (y_f32) y = as_f32(*gpu_, y);
            if (x_f32) x = as_f32(*gpu_, x);
            gpu_->axpy(y.view.gpu, -0.37f, x.view.gpu);
            cpu_->axpy(y.view.cpu, -0.37f, x.view.cpu);
            // A float32 result sees no rounding but the float32 arithmetic's.
            EXPECT_LE(max_rel_error(gpu_->to_host_f32(y.full.gpu), y.full.cpu), y_f32 ? 1e-6 : kTol)
                << where(B, N, C, layout) << " y f32 " << y_f32 << " x f32 " << x_f32;
          }
}

// A copy is exact and writes nothing outside the destination view.
void expect_copied(Backend& gpu, const RowsCase& src, const RowsCase& dst, const std::string& what) {
  const Tensor full = gpu.to_host_f32(dst.full.gpu);
  EXPECT_EQ(count_finite(full), dst.view.gpu.numel()) << what;
  EXPECT_EQ(max_rel_error(gpu.to_host_f32(dst.view.gpu), src.view.cpu), 0.0) << what;
}

TEST_F(CudaLoraOps, CopyContiguousAndRowsViews) {
  uint64_t seed = 200;
  for (bool f32 : {false, true})
    for (int64_t B : {1, 2})
      for (int64_t N : {1, 7, 333})
        for (Layout layout : kLayouts) {
          RowsCase src = make_rows(*gpu_, B, N, 40, layout, ++seed), dst = make_rows(*gpu_, B, N, 40, layout, 0);
          if (f32) src = as_f32(*gpu_, src), dst = as_f32(*gpu_, dst);
          gpu_->copy(src.view.gpu, dst.view.gpu);
          expect_copied(*gpu_, src, dst, where(B, N, 40, layout) + (f32 ? " f32" : " bf16"));
        }
  // Per-sample [B, C] rows (a 2-D view), between differently strided buffers.
  RowsCase src{random_pair(*gpu_, {4, 100}, 210), {}}, dst{nan_pair(*gpu_, {4, 80}), {}};
  src.view = src.full.narrow(1, 3, 50);
  dst.view = dst.full.narrow(1, 8, 50);
  gpu_->copy(src.view.gpu, dst.view.gpu);
  expect_copied(*gpu_, src, dst, "2-D rows");
  // 1-D biases and whole weights (contiguous).
  RowsCase bias{random_pair(*gpu_, {3072}, 211), {}}, bias_dst = poisoned(*gpu_, {3072});
  bias.view = bias.full;
  gpu_->copy(bias.view.gpu, bias_dst.view.gpu);
  expect_copied(*gpu_, bias, bias_dst, "1-D");
  EXPECT_THROW(gpu_->copy(bias.view.gpu, gpu_->empty(DType::F32, {3072})), Error);
  EXPECT_THROW(gpu_->copy(bias.view.gpu, gpu_->empty(DType::BF16, {3071})), Error);
}

TEST_F(CudaLoraOps, CopyInt32) {
  Tensor h = Tensor::empty(DType::I32, {2, 9, 11});
  for (int64_t i = 0; i < h.numel(); ++i) h.ptr<int32_t>()[i] = int32_t(i * 7 - 50);
  Tensor src = gpu_->empty(DType::I32, h.shape()), dst = gpu_->empty(DType::I32, h.shape());
  gpu_->copy_from_host(h, src);  // byte for byte
  gpu_->copy(src, dst);
  Tensor hf = Tensor::empty(DType::F32, h.shape());
  for (int64_t i = 0; i < h.numel(); ++i) hf.ptr<float>()[i] = float(h.ptr<int32_t>()[i]);
  EXPECT_EQ(max_rel_error(gpu_->to_host_f32(dst), hf), 0.0);
  Tensor other = gpu_->empty(DType::I32, {2, 7, 8});
  gpu_->copy(src.narrow(1, 1, 5).narrow(2, 2, 6), other.narrow(1, 1, 5).narrow(2, 1, 6));
  EXPECT_EQ(max_rel_error(gpu_->to_host_f32(other.narrow(1, 1, 5).narrow(2, 1, 6)), hf.narrow(1, 1, 5).narrow(2, 2, 6)),
            0.0);
  EXPECT_THROW(gpu_->copy_from_host(hf, src), Error);  // integers travel only as they are
}

TEST_F(CudaLoraOps, AddMatmulAliasedAndNot) {
  struct Case {
    int64_t M, K, R;
  };
  uint64_t seed = 300;
  for (const Case c : {Case{37, 53, 5}, Case{3072, 3072, 64}, Case{64, 3072, 1}})
    for (bool aliased : {false, true}) {
      // down ~ 1/sqrt(R) makes the product as large as the base: an error in either shows.
      Pair base = random_pair(*gpu_, {c.M, c.K}, ++seed), up = random_pair(*gpu_, {c.M, c.R}, ++seed);
      Pair down = random_pair(*gpu_, {c.R, c.K}, ++seed, 1.0f / std::sqrt(float(c.R)));
      const Pair out = aliased ? base : nan_pair(*gpu_, {c.M, c.K});
      gpu_->add_matmul(base.gpu, up.gpu, down.gpu, out.gpu, 0.75f);
      cpu_->add_matmul(base.cpu, up.cpu, down.cpu, out.cpu, 0.75f);
      EXPECT_LE(max_rel_error(gpu_->to_host_f32(out.gpu), out.cpu), kTol)
          << "M " << c.M << " K " << c.K << " R " << c.R << " aliased " << aliased;
    }
}

// A runtime LoRA slot as flux_transformer.cpp uses one: up is a row range of a taller slot, the scratch rows are
// the first N rows of a [B, S, R + 5] buffer (batch stride > N * row stride), y a poisoned view.
struct LoraCase {
  Pair w, bias, down, up;
  int64_t R;
};

LoraCase lora_case(Backend& gpu, int64_t K, int64_t nout, int64_t R, uint64_t seed) {
  LoraCase c;
  c.w = random_pair(gpu, {nout, K}, seed, 1.0f / std::sqrt(float(K)));
  c.bias = random_pair(gpu, {nout + 16}, seed + 1, 0.5f).narrow(0, 8, nout);
  c.down = random_pair(gpu, {R, K}, seed + 2, 1.0f / std::sqrt(float(K)));
  c.up = random_pair(gpu, {nout + 24, R}, seed + 3, 1.0f / std::sqrt(float(R))).narrow(0, 16, nout);
  c.R = R;
  return c;
}

void check_lora_linear(Backend& gpu, Backend& cpu, const LoraCase& c, const RowsCase& x, const RowsCase& y,
                       const Pair& scratch, Activation act, bool with_bias, const std::string& what) {
  const Tensor bg = with_bias ? c.bias.gpu : Tensor(), bc = with_bias ? c.bias.cpu : Tensor();
  gpu.lora_linear(x.view.gpu, c.w.gpu, bg, c.down.gpu, c.up.gpu, scratch.gpu, y.view.gpu, act);
  cpu.lora_linear(x.view.cpu, c.w.cpu, bc, c.down.cpu, c.up.cpu, scratch.cpu, y.view.cpu, act);
  const std::string tag = what + " act " + std::to_string(int(act)) + " bias " + std::to_string(with_bias);
  EXPECT_LE(poisoned_output_error(gpu, y), kTol) << tag;
  const Pair t = scratch.narrow(-1, 0, c.R);
  EXPECT_LE(max_rel_error(gpu.to_host_f32(t.gpu), t.cpu), kTol) << tag << " (scratch)";
}

constexpr Activation kActivations[] = {Activation::None, Activation::GeluTanh, Activation::Silu,
                                       Activation::QuickGelu};

TEST_F(CudaLoraOps, LoraLinearEveryActivationAndLayout) {
  const int64_t K = 72, nout = 48, R = 12;
  const LoraCase c = lora_case(*gpu_, K, nout, R, 400);
  uint64_t seed = 410;
  for (int64_t B : {1, 2})
    for (int64_t N : {1, 7, 77, 333})
      for (Layout layout : kLayouts)
        for (Activation act : kActivations)
          for (bool with_bias : {true, false}) {
            RowsCase x = make_rows(*gpu_, B, N, K, layout, ++seed), y = make_rows(*gpu_, B, N, nout, layout, 0);
            const Pair scratch = nan_pair(*gpu_, {B, N + 5, R + 5}).narrow(1, 0, N);
            check_lora_linear(*gpu_, *cpu_, c, x, y, scratch, act, with_bias, where(B, N, K, layout));
          }
}

// Per-sample vectors: 2-D x [B, K] (a column slice), the scratch one row of the [B, S, R] buffer per sample, as
// the modulation linears run; then the conditioning path's widths.
TEST_F(CudaLoraOps, LoraLinearOnVectors) {
  struct Case {
    int64_t K, nout, R;
  };
  uint64_t seed = 500;
  for (const Case s : {Case{72, 48, 12}, Case{3072, 6 * 3072, 64}}) {
    const LoraCase c = lora_case(*gpu_, s.K, s.nout, s.R, seed += 10);
    for (Activation act : kActivations) {
      RowsCase x{random_pair(*gpu_, {2, s.K + 16}, ++seed), {}}, y{nan_pair(*gpu_, {2, s.nout + 10}), {}};
      x.view = x.full.narrow(1, 8, s.K);
      y.view = y.full.narrow(1, 3, s.nout);
      const Pair scratch_rows = nan_pair(*gpu_, {2, 9, s.R + 3});
      const Pair scratch{scratch_rows.gpu.select(1, 0), scratch_rows.cpu.select(1, 0)};
      check_lora_linear(*gpu_, *cpu_, c, x, y, scratch, act, true, "vectors K " + std::to_string(s.K));
    }
  }
}

TEST_F(CudaLoraOps, LoraOpsNameThemselvesInErrors) {
  Tensor x = gpu_->empty(DType::BF16, {1, 4, 8}), w = gpu_->empty(DType::BF16, {8, 8});
  Tensor down = gpu_->empty(DType::BF16, {2, 8}), up = gpu_->empty(DType::BF16, {8, 3});
  try {
    gpu_->lora_linear(x, w, Tensor(), down, up, x, x, Activation::None);
    FAIL() << "expected an Error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("lora_linear"), std::string::npos) << e.what();
  }
  try {
    gpu_->add_matmul(w, up, down, w, 1.0f);
    FAIL() << "expected an Error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("add_matmul"), std::string::npos) << e.what();
  }
}

// FLUX.1's largest linear (a single block's linear1 at 1024x1024: 4608 tokens, 3072 -> 9216) with a rank-192
// slot: the runtime-LoRA overhead over the plain linear, without and with the GELU epilogue. Checked against the
// CPU on the first 64 rows.
TEST_F(CudaLoraOps, LoraLinearOverheadAtFluxSize) {
  const int64_t N = 4608, K = 3072, nout = 9216, R = 192;
  const LoraCase c = lora_case(*gpu_, K, nout, R, 600);
  const Pair x = random_pair(*gpu_, {1, N, K}, 610);
  const Pair scratch = nan_pair(*gpu_, {1, N, R});
  RowsCase y = poisoned(*gpu_, {1, N, nout});
  const int reps = 20;
  // Device milliseconds per call of each op fn issues, summed over the names that start with `op` (the profiler
  // may key GEMMs by shape).
  auto per_call = [&](const std::string& op, const std::function<void()>& fn) {
    fn();  // plans first
    gpu_->set_profiling(true);
    for (int i = 0; i < reps; ++i) fn();
    double sum = 0;
    for (const auto& [name, t] : gpu_->profile_ms()) sum += name.rfind(op, 0) == 0 ? t : 0.0;
    gpu_->set_profiling(false);
    return sum / reps;
  };
  // The low-rank products alone, as plain linears: x down^T, and t up^T without the accumulation.
  const Activation none = Activation::None;
  const double down_ms = per_call("linear", [&] { gpu_->linear(x.gpu, c.down.gpu, Tensor(), scratch.gpu, none); });
  const double up_ms = per_call("linear", [&] { gpu_->linear(scratch.gpu, c.up.gpu, Tensor(), y.view.gpu, none); });
  std::printf("[ lora     ] rank %lld products alone: x down^T %.3f ms, t up^T %.3f ms\n", (long long)R, down_ms,
              up_ms);
  for (Activation act : {Activation::None, Activation::GeluTanh}) {
    const double plain = per_call("linear", [&] { gpu_->linear(x.gpu, c.w.gpu, c.bias.gpu, y.view.gpu, act); });
    const double lora = per_call("lora_linear", [&] {
      gpu_->lora_linear(x.gpu, c.w.gpu, c.bias.gpu, c.down.gpu, c.up.gpu, scratch.gpu, y.view.gpu, act);
    });
    std::printf("[ lora     ] x [%lld, %lld] W [%lld, %lld] rank %lld, act %d: linear %.3f ms, lora_linear %.3f ms "
                "(+%.1f%%)\n",
                (long long)N, (long long)K, (long long)nout, (long long)K, (long long)R, int(act), plain, lora,
                100.0 * (lora / plain - 1.0));
    const int64_t rows = 64;
    Tensor ref = Tensor::empty(DType::F32, {1, rows, nout}), t = Tensor::empty(DType::F32, {1, rows, R});
    cpu_->lora_linear(x.cpu.narrow(1, 0, rows), c.w.cpu, c.bias.cpu, c.down.cpu, c.up.cpu, t, ref, act);
    EXPECT_LE(max_rel_error(gpu_->to_host_f32(y.view.gpu.narrow(1, 0, rows)), ref), kTol) << "act " << int(act);
  }
}

// ---- Text-encoder ops ----

constexpr int64_t kTextTokens[] = {1, 7, 77, 333};

TEST_F(CudaTextOps, LayerNormAndRmsNorm) {
  uint64_t seed = 1000;
  for (int64_t B : {1, 2})
    for (int64_t N : kTextTokens)
      for (int64_t C : {24, 40, 768, 4096})
        for (Layout layout : kLayouts) {
          const std::string at = where(B, N, C, layout);
          // A large common offset: the statistics must not cancel.
          RowsCase x = make_rows(*gpu_, B, N, C, layout, ++seed, 20.0f);
          const Pair w = random_pair(*gpu_, {C}, ++seed, 0.2f, 1.0f), b = random_pair(*gpu_, {C}, ++seed, 0.5f);
          for (bool with_bias : {true, false}) {
            RowsCase y = make_rows(*gpu_, B, N, C, layout, 0);
            gpu_->layer_norm(x.view.gpu, w.gpu, with_bias ? b.gpu : Tensor(), 1e-5f, y.view.gpu);
            cpu_->layer_norm(x.view.cpu, w.cpu, with_bias ? b.cpu : Tensor(), 1e-5f, y.view.cpu);
            EXPECT_LE(poisoned_output_error(*gpu_, y), kTol) << "layer_norm " << at << " bias " << with_bias;
          }
          RowsCase r = make_rows(*gpu_, B, N, C, layout, 0);
          gpu_->rms_norm(x.view.gpu, w.gpu, 1e-6f, r.view.gpu);
          cpu_->rms_norm(x.view.cpu, w.cpu, 1e-6f, r.view.cpu);
          EXPECT_LE(poisoned_output_error(*gpu_, r), kTol) << "rms_norm " << at;
          // In place, as CLIP's final norm and T5 can run them.
          RowsCase z = make_rows(*gpu_, B, N, C, layout, ++seed, 3.0f);
          gpu_->layer_norm(z.view.gpu, w.gpu, b.gpu, 1e-5f, z.view.gpu);
          cpu_->layer_norm(z.view.cpu, w.cpu, b.cpu, 1e-5f, z.view.cpu);
          gpu_->rms_norm(z.view.gpu, w.gpu, 1e-6f, z.view.gpu);
          cpu_->rms_norm(z.view.cpu, w.cpu, 1e-6f, z.view.cpu);
          EXPECT_LE(max_rel_error(gpu_->to_host_f32(z.full.gpu), z.full.cpu), kTol) << "in place " << at;
        }
}

TEST_F(CudaTextOps, EmbeddingWithAndWithoutPositions) {
  const int64_t V = 1000;
  uint64_t seed = 2000;
  for (int64_t B : {1, 2})
    for (int64_t S : kTextTokens)
      for (int64_t C : {24, 768})
        for (Layout layout : kLayouts) {
          Tensor ids = Tensor::empty(DType::I32, {B, S});
          for (int64_t i = 0; i < ids.numel(); ++i) ids.ptr<int32_t>()[i] = int32_t((i * 7919 + seed) % V);
          Tensor ids_gpu = gpu_->empty(DType::I32, {B, S});
          gpu_->copy_from_host(ids, ids_gpu);
          const Pair table = random_pair(*gpu_, {V, C}, ++seed), pos = random_pair(*gpu_, {S + 3, C}, ++seed);
          for (bool with_pos : {true, false}) {
            RowsCase out = make_rows(*gpu_, B, S, C, layout, 0);
            gpu_->embedding(ids_gpu, table.gpu, with_pos ? pos.gpu : Tensor(), out.view.gpu);
            cpu_->embedding(ids, table.cpu, with_pos ? pos.cpu : Tensor(), out.view.cpu);
            EXPECT_LE(poisoned_output_error(*gpu_, out), kTol) << where(B, S, C, layout) << " positions " << with_pos;
          }
        }
  // An id outside the table cannot throw without a host sync: its row comes out NaN, the others are written.
  Tensor ids = Tensor::empty(DType::I32, {1, 3});
  ids.ptr<int32_t>()[0] = 5, ids.ptr<int32_t>()[1] = int32_t(V), ids.ptr<int32_t>()[2] = -1;
  Tensor ids_gpu = gpu_->empty(DType::I32, {1, 3});
  gpu_->copy_from_host(ids, ids_gpu);
  Tensor out = gpu_->empty(DType::BF16, {1, 3, 24});
  gpu_->embedding(ids_gpu, random_pair(*gpu_, {V, 24}, 1).gpu, Tensor(), out);
  EXPECT_EQ(count_finite(gpu_->to_host_f32(out)), 24);
  EXPECT_THROW(gpu_->embedding(gpu_->empty(DType::F32, {1, 3}), random_pair(*gpu_, {V, 24}, 1).gpu, Tensor(), out),
               Error);
}

// q, k, v are column slices of one [B, S, 3 * H * D] projection, as the encoders split them.
TEST_F(CudaTextOps, SplitHeads) {
  struct Case {
    int64_t H, D;
  };
  uint64_t seed = 3000;
  for (const Case c : {Case{4, 6}, Case{12, 64}, Case{2, 19}, Case{64, 64}})
    for (int64_t B : {1, 2})
      for (int64_t S : kTextTokens) {
        const int64_t C = c.H * c.D;
        const Pair qkv = random_pair(*gpu_, {B, S, 3 * C}, ++seed);
        for (int part = 0; part < 3; ++part) {
          const Pair x = qkv.narrow(2, part * C, C), out = nan_pair(*gpu_, {B, c.H, S, c.D});
          gpu_->split_heads(x.gpu, out.gpu);
          cpu_->split_heads(x.cpu, out.cpu);
          const Tensor got = gpu_->to_host_f32(out.gpu);
          EXPECT_EQ(count_finite(got), got.numel());
          EXPECT_EQ(max_rel_error(got, out.cpu), 0.0) << "H " << c.H << " D " << c.D << " B " << B << " S " << S;
        }
      }
}

TEST_F(CudaTextOps, ActivationsAndMulIncludingInPlace) {
  uint64_t seed = 4000;
  for (int64_t B : {1, 2})
    for (int64_t N : kTextTokens)
      for (int64_t C : {37, 3072})
        for (Layout layout : kLayouts) {
          const std::string at = where(B, N, C, layout);
          RowsCase x = make_rows(*gpu_, B, N, C, layout, ++seed);
          for (Activation act : kActivations) {
            RowsCase y = make_rows(*gpu_, B, N, C, layout, 0);
            gpu_->activation(x.view.gpu, act, y.view.gpu);
            cpu_->activation(x.view.cpu, act, y.view.cpu);
            EXPECT_LE(poisoned_output_error(*gpu_, y), kTol) << at << " act " << int(act);
          }
          // T5's gated feed-forward: act(gate) in place, then gate *= up, both halves of one [B, N, 2C] buffer.
          RowsCase ff = make_rows(*gpu_, B, N, 2 * C, layout, ++seed);
          const Pair gate = ff.view.narrow(2, 0, C), up = ff.view.narrow(2, C, C);
          gpu_->activation(gate.gpu, Activation::GeluTanh, gate.gpu);
          cpu_->activation(gate.cpu, Activation::GeluTanh, gate.cpu);
          gpu_->mul(gate.gpu, up.gpu);
          cpu_->mul(gate.cpu, up.cpu);
          EXPECT_LE(max_rel_error(gpu_->to_host_f32(ff.full.gpu), ff.full.cpu), kTol) << "gated " << at;
        }
}

// The encoders' and the VAE's shapes, odd ones, and both chunkings of the scores: several head groups (40 heads of
// S = 1100 exceed the 256 MiB budget together) and query-row blocks (one S = 6700 head alone exceeds it).
TEST_F(CudaTextOps, AttentionEx) {
  struct Case {
    int64_t B, H, S, D;
    float scale;
    bool bias, causal;
    const char* what;
  };
  const Case cases[] = {
      {1, 64, 512, 64, 1.0f, true, false, "T5-XXL"},
      {2, 12, 77, 64, 0.125f, false, true, "CLIP-L"},
      {1, 4, 7, 6, 0.4082483f, false, true, "tiny CLIP"},
      {2, 3, 30, 19, 0.7f, true, true, "odd, bias and causal"},
      {1, 2, 1, 8, 1.0f, true, false, "one token"},
      {1, 1, 1000, 512, 0.0441942f, false, false, "VAE head"},
      {1, 40, 1100, 64, 0.125f, true, false, "head groups"},
      {1, 1, 6700, 32, 0.1767767f, true, true, "query-row blocks"},
  };
  uint64_t seed = 5000;
  for (const Case& c : cases) {
    const Shape qs{c.B, c.H, c.S, c.D};
    const Pair q = random_pair(*gpu_, qs, ++seed), k = random_pair(*gpu_, qs, ++seed);
    const Pair v = random_pair(*gpu_, qs, ++seed);
    Pair bias;
    if (c.bias) {
      bias.gpu = gpu_->empty(DType::F32, {c.H, c.S, c.S});
      gpu_->fill_normal(bias.gpu, ++seed, 0.0f, 1.0f);
      bias.cpu = gpu_->to_host_f32(bias.gpu);
    }
    RowsCase out{nan_pair(*gpu_, {c.B, c.S, c.H * c.D + 24}), {}};
    out.view = out.full.narrow(2, 0, c.H * c.D);
    gpu_->attention_ex(q.gpu, k.gpu, v.gpu, c.scale, bias.gpu, c.causal, out.view.gpu);
    cpu_->attention_ex(q.cpu, k.cpu, v.cpu, c.scale, bias.cpu, c.causal, out.view.cpu);
    const double err = poisoned_output_error(*gpu_, out);
    EXPECT_LE(err, kTol) << c.what;
    std::printf("[ attn_ex  ] %s (B %lld H %lld S %lld D %lld): max rel error %.2e\n", c.what, (long long)c.B,
                (long long)c.H, (long long)c.S, (long long)c.D, err);
  }
}

// The new ops inside a recording: no allocation or plan is made while capturing once they ran eagerly, and replays
// give the eager bits.
TEST_F(CudaTextOps, RecordedOpsReplayBitForBit) {
  const int64_t B = 2, S = 77, H = 4, D = 16, C = H * D, R = 8;
  Tensor ids_host = Tensor::empty(DType::I32, {B, S});
  for (int64_t i = 0; i < ids_host.numel(); ++i) ids_host.ptr<int32_t>()[i] = int32_t(i % 97);
  Tensor ids = gpu_->empty(DType::I32, {B, S});
  gpu_->copy_from_host(ids_host, ids);
  const Pair table = random_pair(*gpu_, {97, C}, 1), pos = random_pair(*gpu_, {S, C}, 2);
  const Pair w = random_pair(*gpu_, {C}, 3, 0.1f, 1.0f), bb = random_pair(*gpu_, {C}, 4);
  const LoraCase lc = lora_case(*gpu_, C, 3 * C, R, 5);
  Tensor bias = gpu_->empty(DType::F32, {H, S, S});
  gpu_->fill_normal(bias, 9, 0.0f, 1.0f);
  Tensor hidden = gpu_->empty(DType::BF16, {B, S, C}), normed = gpu_->empty(DType::BF16, {B, S, C});
  Tensor qkv = gpu_->empty(DType::BF16, {B, S, 3 * C}), scratch = gpu_->empty(DType::BF16, {B, S, R});
  Tensor q = gpu_->empty(DType::BF16, {B, H, S, D}), k = gpu_->empty(DType::BF16, {B, H, S, D}),
         v = gpu_->empty(DType::BF16, {B, H, S, D});
  Tensor attn = gpu_->empty(DType::BF16, {B, S, C}), out = gpu_->empty(DType::BF16, {B, S, C});
  Tensor latents = gpu_->empty(DType::F32, {B, S, C}), zeros = gpu_->empty(DType::F32, {B, S, C});
  gpu_->copy_from_host(Tensor::zeros(DType::F32, {B, S, C}), zeros);
  auto run = [&] {
    gpu_->embedding(ids, table.gpu, pos.gpu, hidden);
    gpu_->layer_norm(hidden, w.gpu, bb.gpu, 1e-5f, normed);
    gpu_->lora_linear(normed, lc.w.gpu, lc.bias.gpu, lc.down.gpu, lc.up.gpu, scratch, qkv, Activation::GeluTanh);
    gpu_->split_heads(qkv.narrow(2, 0, C), q);
    gpu_->split_heads(qkv.narrow(2, C, C), k);
    gpu_->split_heads(qkv.narrow(2, 2 * C, C), v);
    gpu_->attention_ex(q, k, v, 1.0f, bias, true, attn);
    gpu_->activation(attn, Activation::QuickGelu, attn);
    gpu_->mul(attn, hidden);
    gpu_->rms_norm(attn, w.gpu, 1e-6f, out);
    gpu_->copy(out, normed);
    gpu_->copy(zeros, latents);
    gpu_->axpy(latents, 0.5f, normed);
  };
  auto read = [&] { return std::vector<Tensor>{gpu_->to_host_f32(out), gpu_->to_host_f32(latents)}; };
  std::vector<Tensor> eager;
  auto expect_eager = [&](const std::string& when) {
    const auto got = read();
    for (size_t i = 0; i < got.size(); ++i)
      EXPECT_EQ(std::memcmp(got[i].data(), eager[i].data(), got[i].nbytes()), 0) << when << ": output " << i;
  };
  auto poison = [&] {
    gpu_->fill_normal(out, 77, 0.0f, 100.0f);
    gpu_->fill_normal(latents, 78, 0.0f, 100.0f);
  };
  run();
  eager = read();
  EXPECT_EQ(count_finite(eager[0]), eager[0].numel());
  poison();
  auto work = gpu_->record(run);
  expect_eager("after record");
  for (int i = 0; i < 2; ++i) {
    poison();
    work->replay();
    expect_eager("replay " + std::to_string(i));
  }
}

}  // namespace
}  // namespace fluxswap::test
