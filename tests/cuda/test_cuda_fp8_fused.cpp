// The FP8 linear's split form on the GPU (layer_norm_modulate_fp8, linear_fp8_quantized) and the row quantiser's
// shapes around its kernel choices.
//
//  - layer_norm_modulate_fp8 on the GPU is layer_norm_modulate + quantize_fp8_rows on the GPU bit for bit (codes,
//    scales, the sign of zero), at widths and layouts taking each kernel (packed 64, 1000: 16-byte generic; packed
//    3072, 4096: the row in registers; unaligned or odd strides: element by element), with an all-zero row and a
//    NaN row.
//  - Against the CPU reference (float32 y, not rounded to bf16): the GPU rounds y to bf16 before quantising, so a
//    code may land one e4m3 step away where y sits within 2^-9 of a rounding midpoint (measured: a few percent of
//    codes; printed). Asserted: no code more than one step away, at most 8% one step away, scales within 5e-3
//    (bf16 rounding of the row max, 2^-9, plus float32 statistics), the dequantised rows within 8e-2 of max|y|
//    (one step at the top binade is 32/448 = 7.1e-2, plus the scales' difference) and cosine >= 0.999.
//  - linear_fp8_quantized against the CPU's on the very same e4m3 codes: <= 1e-2 (float32 sums in another order,
//    bf16 output), one product or one per batch; against the GPU's linear_fp8 on the same rows: the same GEMM on
//    the same operands (printed whether bit for bit), <= 1e-2; the fused chain GPU vs CPU: <= 3e-2 (the codes
//    above, then the product).
//  - quantize_fp8_rows bit for bit against quant/fp8.h at widths around the quantiser's shared-memory limit.
#include <cmath>
#include <cstdio>
#include <cstring>

#include "cuda_test_util.h"
#include "quant/fp8.h"

namespace fluxswap::test {
namespace {

// [rows, ld] e4m3 codes, all NaN (0x7F, from quantised NaN rows): bytes an op must not write stay so.
Tensor poisoned_codes(Backend& gpu, int64_t rows, int64_t ld) {
  const Pair nan = nan_pair(gpu, {rows, ld});
  Tensor q = gpu.empty(DType::F8_E4M3, {rows, ld}), s = gpu.empty(DType::F32, {rows});
  gpu.quantize_fp8_rows(nan.gpu, q, s);
  return q;
}

int64_t round16(int64_t n) { return (n + 15) / 16 * 16; }

// Row 1 of the last batch constant under a zero shift (y all zero: the floor scale), a NaN in row 2 of batch 0
// (y all NaN: NaN codes, the floor scale); written into both copies of the inputs.
void plant_special_rows(Backend& gpu, RowsCase& x, Pair& mod, int64_t B, int64_t C) {
  const Tensor xv = x.view.cpu, shift = mod.cpu.narrow(1, 0, C);
  for (int64_t c = 0; c < C; ++c) {
    xv.ptr<float>()[(B - 1) * xv.stride(0) + xv.stride(1) + c] = 0.75f;
    shift.ptr<float>()[(B - 1) * shift.stride(0) + c] = 0.0f;
  }
  if (x.view.cpu.size(1) > 2) xv.ptr<float>()[2 * xv.stride(1) + 3] = std::nanf("");
  gpu.copy_from_host(x.full.cpu, x.full.gpu);
  gpu.copy_from_host(mod.cpu, mod.gpu);
}

struct FusedCase {
  int64_t B, N, C;
  Layout layout;
};

std::string case_name(const FusedCase& c) {
  return "B " + std::to_string(c.B) + " N " + std::to_string(c.N) + " C " + std::to_string(c.C) + " " +
         layout_name(c.layout);
}

class CudaFp8FusedNorm : public GpuAndCpu, public ::testing::WithParamInterface<FusedCase> {
 protected:
  // Inputs as the transformer has them: x rows in `layout`, shift and scale chunks of a [B, 6C] modulation.
  void make_inputs(uint64_t seed) {
    const auto [B, N, C, layout] = GetParam();
    x_ = make_rows(*gpu_, B, N, C, layout, seed, 0.3f);
    mod_ = random_pair(*gpu_, {B, 6 * C}, seed + 1, 0.5f);
    plant_special_rows(*gpu_, x_, mod_, B, C);
    shift_ = mod_.narrow(1, 0, C);
    scale_ = mod_.narrow(1, C, C);
  }
  // The fused op on the GPU into a poisoned [B, N, ldq] buffer; returns the whole buffer's codes.
  Tensor run_fused(Tensor* scales_host, int64_t ldq) {
    const auto [B, N, C, layout] = GetParam();
    const Tensor buf = poisoned_codes(*gpu_, B * N, ldq);
    const Tensor q = buf.view({B, N, ldq}).narrow(2, 0, C);
    const Tensor s = gpu_->empty(DType::F32, {B * N});
    gpu_->layer_norm_modulate_fp8(x_.view.gpu, shift_.gpu, scale_.gpu, q, s);
    *scales_host = gpu_->to_host_f32(s);
    return download_raw(*gpu_, buf);
  }
  RowsCase x_;
  Pair mod_, shift_, scale_;
};

TEST_P(CudaFp8FusedNorm, IsTheTwoGpuOpsBitForBit) {
  const auto [B, N, C, layout] = GetParam();
  SCOPED_TRACE(case_name(GetParam()));
  make_inputs(31);
  const int64_t ldq = round16(C) + 16;
  Tensor s_fused;
  const Tensor q_fused = run_fused(&s_fused, ldq);

  const Tensor y = gpu_->empty(DType::BF16, {B, N, C});
  gpu_->layer_norm_modulate(x_.view.gpu, shift_.gpu, scale_.gpu, y);
  const Tensor q2 = gpu_->empty(DType::F8_E4M3, {B * N, C}), s2 = gpu_->empty(DType::F32, {B * N});
  gpu_->quantize_fp8_rows(y.view({B * N, C}), q2, s2);
  const Tensor q_two = download_raw(*gpu_, q2), s_two = gpu_->to_host_f32(s2);

  EXPECT_EQ(std::memcmp(s_fused.data(), s_two.data(), s_two.nbytes()), 0) << "row scales";
  int64_t bad = 0, pad = 0;
  for (int64_t r = 0; r < B * N; ++r)
    for (int64_t c = 0; c < ldq; ++c) {
      const uint8_t got = q_fused.ptr<uint8_t>()[r * ldq + c];
      if (c >= C) {
        pad += got != quant::kE4m3NaN;
        continue;
      }
      const uint8_t want = q_two.ptr<uint8_t>()[r * C + c];
      if (got != want && ++bad <= 5)
        ADD_FAILURE() << "row " << r << " col " << c << ": fused 0x" << std::hex << int(got) << ", two ops 0x"
                      << int(want);
    }
  EXPECT_EQ(bad, 0) << "codes differing from layer_norm_modulate + quantize_fp8_rows";
  EXPECT_EQ(pad, 0) << "bytes written past the rows";
  EXPECT_EQ(s_fused.ptr<float>()[(B - 1) * N + 1], quant::e4m3_row_scale(0.0f)) << "all-zero row";
  if (N > 2) EXPECT_EQ(q_fused.ptr<uint8_t>()[2 * ldq + 5], quant::kE4m3NaN) << "NaN row";
}

TEST_P(CudaFp8FusedNorm, MatchesTheCpuReference) {
  const auto [B, N, C, layout] = GetParam();
  SCOPED_TRACE(case_name(GetParam()));
  make_inputs(47);
  const int64_t ldq = round16(C) + 32;
  Tensor s_gpu;
  const Tensor q_gpu = run_fused(&s_gpu, ldq);
  const int64_t ldc = round16(C);
  const Tensor q_cpu = Tensor::empty(DType::F8_E4M3, {B, N, ldc}), s_cpu = Tensor::empty(DType::F32, {B * N});
  cpu_->layer_norm_modulate_fp8(x_.view.cpu, shift_.cpu, scale_.cpu, q_cpu.narrow(2, 0, C), s_cpu);

  double scale_err = 0;
  int64_t one_step = 0, beyond = 0, pad = 0;
  Tensor dq_gpu = Tensor::zeros(DType::F32, {B * N, C}), dq_cpu = Tensor::zeros(DType::F32, {B * N, C});
  for (int64_t r = 0; r < B * N; ++r) {
    const float sg = s_gpu.ptr<float>()[r], sc = s_cpu.ptr<float>()[r];
    scale_err = std::max(scale_err, std::fabs(double(sg) - sc) / sc);
    for (int64_t c = 0; c < ldq; ++c) {
      const uint8_t a = q_gpu.ptr<uint8_t>()[r * ldq + c];
      if (c >= C) {
        pad += a != quant::kE4m3NaN;
        continue;
      }
      const uint8_t b = q_cpu.ptr<uint8_t>()[r * ldc + c];
      const float va = quant::e4m3_to_f32(a), vb = quant::e4m3_to_f32(b);
      if (std::isnan(vb)) {  // the NaN row; the GPU must keep it NaN
        beyond += !std::isnan(va);
        continue;
      }
      dq_gpu.ptr<float>()[r * C + c] = va * sg;
      dq_cpu.ptr<float>()[r * C + c] = vb * sc;
      if (a == b) continue;
      const int ma = a & 0x7f, mb = b & 0x7f;
      const bool adjacent = std::abs(ma - mb) <= 1 && ((a ^ b) & 0x80) == 0;
      const bool around_zero = ma + mb <= 1;  // +0 / -0 / the smallest subnormal of either sign
      if (adjacent || around_zero)
        ++one_step;
      else if (++beyond <= 5)
        ADD_FAILURE() << "row " << r << " col " << c << ": gpu " << va << " cpu " << vb << " (codes)";
    }
  }
  const double frac = double(one_step) / double(B * N * C);
  const double err = max_rel_error(dq_gpu, dq_cpu), cos = cosine_similarity(dq_gpu, dq_cpu);
  std::printf("[ fp8 norm ] %s: %.2f%% codes one step apart, scales %.2g, dequantised max rel error %.3g, "
              "cosine %.6f\n", case_name(GetParam()).c_str(), 100 * frac, scale_err, err, cos);
  EXPECT_EQ(beyond, 0) << "codes more than one e4m3 step from the CPU's";
  EXPECT_LE(frac, 0.08);
  EXPECT_LE(scale_err, 5e-3);
  EXPECT_LE(err, 8e-2);
  EXPECT_GE(cos, 0.999);
  EXPECT_EQ(pad, 0) << "bytes written past the rows";
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, CudaFp8FusedNorm,
    ::testing::Values(FusedCase{2, 37, 64, Layout::Contiguous}, FusedCase{2, 37, 64, Layout::Columns},
                      FusedCase{2, 5, 64, Layout::Unaligned}, FusedCase{2, 37, 3072, Layout::Columns},
                      FusedCase{2, 37, 3072, Layout::PaddedBatch}, FusedCase{1, 333, 3072, Layout::Contiguous},
                      FusedCase{2, 7, 3072, Layout::Unaligned}, FusedCase{2, 9, 4096, Layout::Contiguous},
                      FusedCase{3, 11, 1000, Layout::Contiguous}, FusedCase{3, 11, 1000, Layout::PaddedBatch}));

class CudaFp8FusedErrors : public GpuAndCpu {};

TEST_F(CudaFp8FusedErrors, LayerNormModulateFp8RefusesRowsAnFp8GemmCannotRead) {
  const Pair x = random_pair(*gpu_, {1, 3, 40}, 3), mod = random_pair(*gpu_, {1, 80}, 4);
  const Tensor s = gpu_->empty(DType::F32, {3});
  const Tensor q40 = gpu_->empty(DType::F8_E4M3, {1, 3, 40});
  EXPECT_THROW(gpu_->layer_norm_modulate_fp8(x.gpu, mod.gpu.narrow(1, 0, 40), mod.gpu.narrow(1, 40, 40), q40, s),
               Error);
  const Tensor q48 = gpu_->empty(DType::F8_E4M3, {1, 3, 48});
  EXPECT_THROW(gpu_->layer_norm_modulate_fp8(x.gpu, mod.gpu.narrow(1, 0, 40), mod.gpu.narrow(1, 40, 40), q48, s),
               Error);
  EXPECT_NO_THROW(gpu_->layer_norm_modulate_fp8(x.gpu, mod.gpu.narrow(1, 0, 40), mod.gpu.narrow(1, 40, 40),
                                                q48.narrow(2, 0, 40), s));
}

struct LinearCase {
  int64_t B, N, K, nout;
  bool bias, padded_batch_output;
  Activation act;
};

class CudaFp8QuantizedLinear : public GpuAndCpu, public ::testing::WithParamInterface<LinearCase> {};

TEST_P(CudaFp8QuantizedLinear, MatchesLinearFp8AndTheCpu) {
  const auto [B, N, K, nout, with_bias, padded, act] = GetParam();
  const std::string what = "B " + std::to_string(B) + " N " + std::to_string(N) + " K " + std::to_string(K) +
                           " nout " + std::to_string(nout) + (padded ? " per batch" : " one product");
  SCOPED_TRACE(what);
  const Pair x = random_pair(*gpu_, {B, N, K}, 61, 1.5f);
  const Pair w = random_pair(*gpu_, {nout, K}, 62, 1.0f / std::sqrt(float(K)));
  const Pair bias = with_bias ? random_pair(*gpu_, {nout}, 63, 0.3f) : Pair{};
  Pair wq{gpu_->empty(DType::F8_E4M3, {nout, K}), cpu_->empty(DType::F8_E4M3, {nout, K})};
  Pair ws{gpu_->empty(DType::F32, {nout}), cpu_->empty(DType::F32, {nout})};
  gpu_->quantize_fp8_rows(w.gpu, wq.gpu, ws.gpu);
  cpu_->quantize_fp8_rows(w.cpu, wq.cpu, ws.cpu);
  // The output: packed, or rows 1..N of a taller buffer per batch (a stream's rows: one product per batch).
  auto output = [&](Backend& be) {
    const Tensor full = be.empty(be.compute_dtype(), {B, padded ? N + 3 : N, nout});
    return padded ? full.narrow(1, 1, N) : full;
  };

  // The activations quantised as linear_fp8 lays them out (rows padded to 16 bytes).
  const int64_t ldq = round16(K);
  const Tensor xq_buf = gpu_->empty(DType::F8_E4M3, {B * N, ldq}), xs = gpu_->empty(DType::F32, {B * N});
  const Tensor xq_rows = xq_buf.narrow(1, 0, K);
  gpu_->quantize_fp8_rows(x.gpu.view({B * N, K}), xq_rows, xs);
  const Tensor xq = xq_buf.view({B, N, ldq}).narrow(2, 0, K);
  const Tensor y_q = output(*gpu_), y_lin = output(*gpu_);
  gpu_->linear_fp8_quantized(xq, xs, wq.gpu, ws.gpu, bias.gpu, y_q, act);
  gpu_->linear_fp8(x.gpu, wq.gpu, ws.gpu, bias.gpu, y_lin, act);
  const Tensor got = gpu_->to_host_f32(y_q);
  const double vs_linear = max_rel_error(got, gpu_->to_host_f32(y_lin));

  // The CPU on the GPU's own codes and scales.
  const Tensor codes = download_raw(*gpu_, xq_buf);
  const Tensor y_cpu = output(*cpu_);
  cpu_->linear_fp8_quantized(codes.view({B, N, ldq}).narrow(2, 0, K), gpu_->to_host_f32(xs), wq.cpu, ws.cpu,
                             bias.cpu, y_cpu, act);
  const double vs_cpu = max_rel_error(got, y_cpu);

  // The whole chain: LayerNorm into e4m3, then the product, on both.
  const Pair mod = random_pair(*gpu_, {B, 2 * K}, 64, 0.4f);
  const Tensor q_chain = gpu_->empty(DType::F8_E4M3, {B, N, ldq}), s_chain = gpu_->empty(DType::F32, {B * N});
  gpu_->layer_norm_modulate_fp8(x.gpu, mod.gpu.narrow(1, 0, K), mod.gpu.narrow(1, K, K), q_chain.narrow(2, 0, K),
                                s_chain);
  gpu_->linear_fp8_quantized(q_chain.narrow(2, 0, K), s_chain, wq.gpu, ws.gpu, bias.gpu, y_q, act);
  const Tensor qc = cpu_->empty(DType::F8_E4M3, {B, N, ldq}), sc = cpu_->empty(DType::F32, {B * N});
  cpu_->layer_norm_modulate_fp8(x.cpu, mod.cpu.narrow(1, 0, K), mod.cpu.narrow(1, K, K), qc.narrow(2, 0, K), sc);
  cpu_->linear_fp8_quantized(qc.narrow(2, 0, K), sc, wq.cpu, ws.cpu, bias.cpu, y_cpu, act);
  const double chain = max_rel_error(gpu_->to_host_f32(y_q), y_cpu);

  std::printf("[ fp8 lin  ] %s: vs linear_fp8 %.3g%s, vs CPU %.3g, LN chain vs CPU %.3g\n", what.c_str(),
              vs_linear, vs_linear == 0 ? " (bit for bit)" : "", vs_cpu, chain);
  EXPECT_LE(vs_linear, 1e-2);
  EXPECT_LE(vs_cpu, 1e-2);
  // The chain's LayerNorm rounds to bf16 on the GPU but not on the CPU, so some codes differ by one e4m3 step
  // (~6%); with K = 64 an output averages too few products to wash that out (measured up to 0.032 on the H100).
  EXPECT_LE(chain, K < 256 ? 5e-2 : 3e-2);
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, CudaFp8QuantizedLinear,
    ::testing::Values(LinearCase{2, 37, 64, 48, true, false, Activation::GeluTanh},
                      LinearCase{2, 37, 64, 48, true, true, Activation::None},
                      LinearCase{1, 333, 3072, 3072, true, false, Activation::None},
                      LinearCase{2, 5, 3072, 1024, false, true, Activation::GeluTanh},
                      LinearCase{3, 7, 48, 16, true, false, Activation::Silu}));

// quantize_fp8_rows against quant/fp8.h, bit for bit (+0 against -0 aside, as in test_fp8_linear.cpp): odd row
// counts, e4m3 rows padded past the values, widths on both sides of the shared-memory path's limit.
struct QuantCase {
  int64_t rows, cols, col0, extra_cols, ldq_pad;
};

class CudaFp8RowQuantiser : public GpuAndCpu, public ::testing::WithParamInterface<QuantCase> {};

TEST_P(CudaFp8RowQuantiser, MatchesTheCpuBitForBit) {
  const auto [rows, cols, col0, extra, ldq_pad] = GetParam();
  SCOPED_TRACE("rows " + std::to_string(rows) + " cols " + std::to_string(cols) + " col0 " + std::to_string(col0));
  const Pair full = random_pair(*gpu_, {rows, col0 + cols + extra}, 71, 3.0f);
  const Pair x = full.narrow(1, col0, cols);
  const int64_t ldq = cols + ldq_pad;
  const Tensor buf = poisoned_codes(*gpu_, rows, ldq);
  const Tensor s = gpu_->empty(DType::F32, {rows});
  gpu_->quantize_fp8_rows(x.gpu, buf.narrow(1, 0, cols), s);
  const Tensor got = download_raw(*gpu_, buf), s_got = gpu_->to_host_f32(s);
  const Tensor want = Tensor::empty(DType::F8_E4M3, {rows, cols}), s_want = Tensor::empty(DType::F32, {rows});
  cpu_->quantize_fp8_rows(x.cpu, want, s_want);
  EXPECT_EQ(std::memcmp(s_got.data(), s_want.data(), s_want.nbytes()), 0) << "row scales";
  int64_t bad = 0;
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < ldq; ++c) {
      const uint8_t a = got.ptr<uint8_t>()[r * ldq + c];
      if (c >= cols) {
        bad += a != quant::kE4m3NaN;
        continue;
      }
      const uint8_t b = want.ptr<uint8_t>()[r * cols + c];
      if (a != b && !((a & 0x7f) == 0 && (b & 0x7f) == 0) && ++bad <= 5)
        ADD_FAILURE() << "row " << r << " col " << c << ": gpu 0x" << std::hex << int(a) << " cpu 0x" << int(b);
    }
  EXPECT_EQ(bad, 0) << "codes differing from the CPU reference (or padding written)";
}

INSTANTIATE_TEST_SUITE_P(Shapes, CudaFp8RowQuantiser,
                         ::testing::Values(QuantCase{1023, 15360, 0, 0, 16}, QuantCase{37, 3072, 8, 24, 0},
                                           QuantCase{3, 20480, 0, 0, 0}, QuantCase{3, 20488, 0, 8, 8},
                                           QuantCase{5, 8, 0, 0, 8}, QuantCase{7, 3072, 3, 5, 16},
                                           QuantCase{9, 12288, 8, 8, 16}, QuantCase{33, 40, 0, 0, 8},
                                           QuantCase{2, 65536, 0, 0, 0}));

}  // namespace
}  // namespace fluxswap::test
